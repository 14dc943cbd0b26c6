"""Image transforms from a decoded RGB PIL image to a uint8 CHW tensor.

Written in PIL, numpy and torch because torchvision is not installed beside
this torch. Both transforms return uint8: the model converts to float and
normalises, so the same uint8 input also feeds the exported ONNX graph.
Random draws use torch's global generator, which DataLoader seeds in each
worker, so a seeded loader repeats its augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from index.preprocess import PreprocessSpec, preprocess_image

CROP_ATTEMPTS = 10  # tries to draw a crop that fits before falling back to a centre crop


def to_chw_tensor(pixels: np.ndarray) -> torch.Tensor:
    """Convert a uint8 ``(H, W, 3)`` array to a contiguous uint8 ``(3, H, W)`` tensor."""
    writable = np.array(pixels, dtype=np.uint8)  # a copy: arrays from Pillow are read-only
    return torch.from_numpy(writable).permute(2, 0, 1).contiguous()


def uniform(low: float, high: float) -> float:
    """Draw one float from U(low, high) with torch's global generator."""
    return low + (high - low) * torch.rand(()).item()


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize to ``size`` x ``size`` (bicubic).

    The crop covers a fraction of the image area drawn from U(scale) and has
    a width / height ratio drawn log-uniformly from ``ratio``. When no draw fits
    in ``CROP_ATTEMPTS`` tries, the largest centre crop with the ratio clamped
    to ``ratio`` is used.
    """

    size: int  # output side, pixels
    scale: tuple[float, float] = (0.35, 1.0)  # fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"crop size must be at least 1 pixel, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Draw a crop box ``(left, top, right, bottom)`` in pixels for a ``width`` x ``height`` image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(CROP_ATTEMPTS):
            target_area = area * uniform(*self.scale)
            aspect = math.exp(uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left = int(torch.randint(0, width - crop_width + 1, ()).item())
                top = int(torch.randint(0, height - crop_height + 1, ()).item())
                return left, top, left + crop_width, top + crop_height

        aspect = width / height
        if aspect < self.ratio[0]:
            crop_width, crop_height = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_width, crop_height = round(height * self.ratio[1]), height
        else:
            crop_width, crop_height = width, height
        left = (width - crop_width) // 2
        top = (height - crop_height) // 2
        return left, top, left + crop_width, top + crop_height

    def __call__(self, image: Image.Image) -> Image.Image:
        box = self.crop_box(*image.size)
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)


@dataclass(frozen=True)
class TrainTransform:
    """Training augmentation: RandomResizedCrop, then a horizontal flip with probability ``flip_p``.

    Input: an RGB PIL image (``index.imaging.decode_image(...).image``).
    Output: uint8 tensor ``(3, size, size)``.
    """

    size: int  # output side, pixels
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        RandomResizedCrop(self.size, self.scale, self.ratio)  # validates the arguments

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = RandomResizedCrop(self.size, self.scale, self.ratio)(image)
        if torch.rand(()).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_chw_tensor(np.asarray(image, dtype=np.uint8))


@dataclass(frozen=True)
class EvalTransform:
    """Evaluation transform: ``index.preprocess.preprocess_image``, the indexer's and server's own path.

    Input: an RGB PIL image. Output: uint8 tensor ``(3, spec.size, spec.size)``.
    """

    spec: PreprocessSpec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_chw_tensor(preprocess_image(image, self.spec))
