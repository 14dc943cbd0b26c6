"""Backbones: convolutional feature extractors with their input normalisation.

Every backbone module has `num_features` (channels of the last feature map),
`input_mean` and `input_std` (per channel, on the 0..255 pixel scale), and
`forward_features(x) -> (n, num_features, h, w)`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from training.backbones.efficientnet_lite import EfficientNetLite0, efficientnet_lite0
from training.backbones.resnet import ResNet50, resnet50

BUILTIN_BACKBONES = ("efficientnet_lite0", "resnet50")
TIMM_PREFIX = "timm:"


def create_backbone(name: str, *, pretrained: bool, weights: str | Path | None = None) -> nn.Module:
    """Build the feature extractor `name` without its classifier.

    `name` is one of BUILTIN_BACKBONES or "timm:<model name>"; timm backbones
    load timm's own pretrained weights and ignore `weights`.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: `pretrained` and the weights file is missing.
        ImportError: a timm backbone without timm installed.
    """
    if name == "efficientnet_lite0":
        return efficientnet_lite0(pretrained=pretrained, weights=weights, num_classes=0)
    if name == "resnet50":
        return resnet50(pretrained=pretrained, weights=weights, num_classes=0)
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        from training.backbones.timm_backbone import TimmBackbone

        return TimmBackbone(name[len(TIMM_PREFIX):], pretrained=pretrained)
    raise ValueError(
        f"unknown backbone {name!r}; choose one of {', '.join(BUILTIN_BACKBONES)} "
        "or 'timm:<model name>'"
    )


__all__ = ["BUILTIN_BACKBONES", "EfficientNetLite0", "ResNet50", "create_backbone",
           "efficientnet_lite0", "resnet50"]
