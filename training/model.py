"""The IDML model: backbone, pooling, semantic head and uncertainty head.

    images uint8 (n, 3, H, W) --normalize--> float --backbone--> (n, C, h, w)
        --> global average pool + global max pool (summed) --> features (n, C)
        --> semantic head: linear, L2-normalise      --> embedding   (n, embedding_dim)
        --> uncertainty head                         --> uncertainty (n, uncertainty_dim)

Pixel normalisation is part of the model (`normalize`), so the exported ONNX
graph can take uint8 pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import create_backbone
from training.config import ModelConfig


class SemanticHead(nn.Module):
    """Linear projection followed by L2 normalisation: (n, C) -> (n, d), unit rows."""

    def __init__(self, in_features: int, embedding_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=1)


class LearnedUncertaintyHead(nn.Module):
    """Positive uncertainty embedding whose norm is free to learn: (n, C) -> (n, du).

    u = softplus(linear(layernorm(features))) * c. The layer norm makes the
    linear layer's input scale independent of the backbone. At initialisation
    the softplus is about 1 per component (bias softplus^-1(1)) and
    c = sqrt(init / du), so ||u||^2 starts near `init` (plus the spread of
    the random projection), and differs between images from the first step.
    """

    def __init__(self, in_features: int, uncertainty_dim: int, init: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.linear = nn.Linear(in_features, uncertainty_dim)
        nn.init.constant_(self.linear.bias, math.log(math.e - 1.0))  # softplus(bias) = 1
        self.register_buffer("output_scale", torch.tensor(math.sqrt(init / uncertainty_dim)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.linear(self.norm(features))) * self.output_scale


class L2NormUncertaintyHead(nn.Module):
    """The original IDML head: linear then L2 normalisation, so ||u||^2 = 1 for every image.

    Kept to reproduce that code: with a zero proxy uncertainty the pair
    uncertainty is the constant 1 and this head receives no gradient.
    """

    def __init__(self, in_features: int, uncertainty_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_features, uncertainty_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=1)


class IDMLModel(nn.Module):
    """Backbone with a semantic and an uncertainty head.

    Attributes:
        input_mean, input_std: per-channel mean and standard deviation on the 0..255
            scale; `normalize` computes (x - input_mean) / input_std.
        embedding_dim, uncertainty_dim: output sizes.
        backbone_name: the `ModelConfig.backbone` string.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        backbone_name: str,
        embedding_dim: int = 512,
        uncertainty_dim: int = 64,
        uncertainty_mode: str = "learned",
        uncertainty_init: float = 1.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.embedding_dim = embedding_dim
        self.uncertainty_dim = uncertainty_dim
        self.uncertainty_mode = uncertainty_mode
        self.input_mean = tuple(float(value) for value in backbone.input_mean)
        self.input_std = tuple(float(value) for value in backbone.input_std)
        self.register_buffer("_mean", torch.tensor(self.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.input_std).view(1, 3, 1, 1), persistent=False)

        features = backbone.num_features
        self.semantic_head = SemanticHead(features, embedding_dim)
        if uncertainty_mode == "learned":
            self.uncertainty_head: nn.Module = LearnedUncertaintyHead(
                features, uncertainty_dim, uncertainty_init
            )
        elif uncertainty_mode == "l2norm":
            self.uncertainty_head = L2NormUncertaintyHead(features, uncertainty_dim)
        else:
            raise ValueError(
                f"unknown uncertainty_mode {uncertainty_mode!r}; expected 'learned' or 'l2norm'"
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Convert uint8 or float 0..255 images (n, 3, H, W) to normalised float32."""
        return (images.float() - self._mean) / self._std

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (n, C): global average plus global max."""
        feature_map = self.backbone.forward_features(x)
        return feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed normalised images.

        Args:
            x: float (n, 3, H, W), the output of `normalize`.

        Returns:
            embedding: float (n, embedding_dim), L2-normalised rows.
            uncertainty: float (n, uncertainty_dim); non-negative in "learned" mode.
        """
        return self.heads(self.pool(x))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, uncertainty) from pooled features (n, C)."""
        return self.semantic_head(features), self.uncertainty_head(features)

    def embed_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward(normalize(images))` for uint8 or 0..255 float images (n, 3, H, W)."""
        return self(self.normalize(images))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the two heads (trained during warm-up; the backbone waits)."""
        return list(self.semantic_head.parameters()) + list(self.uncertainty_head.parameters())

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Switch gradients of the backbone on or off; frozen BatchNorm layers stay frozen."""
        frozen_bn = getattr(self, "_bn_frozen", False)
        for module in self.backbone.modules():
            is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(trainable and not (is_bn and frozen_bn))

    def train(self, mode: bool = True) -> "IDMLModel":
        super().train(mode)
        if mode and getattr(self, "_bn_frozen", False):
            _set_batchnorm_eval(self.backbone)
        return self

    def freeze_batchnorm(self) -> None:
        """Keep every backbone BatchNorm in eval mode with frozen statistics and affine weights."""
        self._bn_frozen = True
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for parameter in module.parameters():
                    parameter.requires_grad_(False)
        if self.training:
            _set_batchnorm_eval(self.backbone)


def _set_batchnorm_eval(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


def build_model(config: ModelConfig, *, pretrained: bool = True) -> IDMLModel:
    """Build the model a `ModelConfig` describes.

    Backbone weights load only when both `pretrained` and `config.pretrained`
    are true; a checkpoint loader passes `pretrained=False` because the
    checkpoint has all weights.

    Raises:
        ValueError: an unknown backbone or uncertainty mode.
        FileNotFoundError: a missing backbone weights file.
    """
    backbone = create_backbone(
        config.backbone, pretrained=pretrained and config.pretrained, weights=config.weights
    )
    model = IDMLModel(
        backbone,
        backbone_name=config.backbone,
        embedding_dim=config.embedding_dim,
        uncertainty_dim=config.uncertainty_dim,
        uncertainty_mode=config.uncertainty_mode,
        uncertainty_init=config.uncertainty_init,
    )
    if config.freeze_bn:
        model.freeze_batchnorm()
    return model
