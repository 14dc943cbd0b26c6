"""ResNet-50 (He et al., 2016; torchvision's v1.5 layout, stride on the 3x3 convolution).

Parameter names match torchvision's `resnet50` state dict (`conv1`, `bn1`,
`layer1.0.conv1`, `layer1.0.downsample.0`, `fc`, ...), so ImageNet weights
saved from torchvision load with `strict=True` from a local file. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# ImageNet mean and standard deviation on the 0..255 scale.
IMAGENET_INPUT_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_INPUT_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

RESNET50_LAYERS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50; `forward_features` gives the (n, 2048, H/32, W/32) feature map.

    Input: float (n, 3, H, W), normalised with IMAGENET_INPUT_MEAN/STD.
    """

    num_features = 2048
    input_mean = IMAGENET_INPUT_MEAN
    input_std = IMAGENET_INPUT_STD

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (blocks, width) in enumerate(zip(RESNET50_LAYERS, (64, 128, 256, 512))):
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.fc: nn.Linear | None = nn.Linear(2048, num_classes) if num_classes else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (n, num_classes)."""
        if self.fc is None:
            raise RuntimeError("this ResNet50 has no classifier (num_classes=0)")
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))

    def reset_classifier(self) -> None:
        """Remove the ImageNet classifier, keeping only the feature extractor."""
        self.fc = None


def resnet50(
    *, pretrained: bool = True, weights: str | Path | None = None, num_classes: int = 1000
) -> ResNet50:
    """Build ResNet-50, loading a torchvision-style state dict from `weights` when `pretrained`.

    With `num_classes=0` the classifier is loaded (strictly) and then dropped.

    Raises:
        FileNotFoundError: `pretrained` without a `weights` path, or the file is missing.
    """
    model = ResNet50(num_classes=num_classes or 1000)
    if pretrained:
        if weights is None:
            raise FileNotFoundError(
                "resnet50 needs a local ImageNet weights file: set model.weights to a "
                "torchvision-style resnet50 .pth file (for example resnet50-11ad3fa6.pth), "
                "or model.pretrained=false to start from random weights"
            )
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"resnet50 weights file {path} does not exist; set model.weights to a "
                "torchvision-style resnet50 .pth file"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if not num_classes:
        model.reset_classifier()
    return model
