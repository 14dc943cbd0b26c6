"""Any timm convolutional model as a backbone; timm is imported only when asked for."""

from __future__ import annotations

import torch
from torch import nn


class TimmBackbone(nn.Module):
    """Wrap `timm.create_model(name, num_classes=0)`; `forward_features` returns (n, C, h, w)."""

    def __init__(self, name: str, *, pretrained: bool):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ImportError(
                f"backbone 'timm:{name}' needs timm; install it with `pip install timm` "
                "(torch is pinned at 2.13.0, so pick a timm release that supports it)"
            ) from None
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        self.num_features = int(self.model.num_features)
        config = getattr(self.model, "pretrained_cfg", None) or {}
        mean = config.get("mean", (0.485, 0.456, 0.406))
        std = config.get("std", (0.229, 0.224, 0.225))
        self.input_mean = tuple(float(value) * 255 for value in mean)
        self.input_std = tuple(float(value) * 255 for value in std)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim != 4:
            raise ValueError(
                f"timm model output has shape {tuple(features.shape)}; only convolutional "
                "models with an (n, C, h, w) feature map are supported"
            )
        return features
