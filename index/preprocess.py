"""Turn an image into the model's input: the one preprocessing path.

Evaluation in `training/`, the indexer and the server all call
`preprocess_bytes` (or `preprocess_image` on an already decoded image), so a
catalog item and a query go through exactly the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from index.imaging import DEFAULT_MAX_PIXELS, decode_image


@dataclass(frozen=True)
class PreprocessSpec:
    """How an RGB image becomes a model input; stored in `model.json` under `input`."""

    size: int  # side of the square model input, in pixels
    resize: int  # the shorter side is resized to this before the centre crop; >= size

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"input size must be at least 16 pixels, got {self.size}")
        if self.resize < self.size:
            raise ValueError(
                f"resize ({self.resize}) must be at least the input size ({self.size})"
            )


def preprocess_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to `spec.resize` and centre-crop to `spec.size`.

    `image` must be RGB (see `index.imaging.to_rgb`). The resize uses bicubic
    filtering, which Pillow antialiases when it shrinks.

    Returns:
        uint8 array of shape (spec.size, spec.size, 3), RGB, HWC.
    """
    if image.mode != "RGB":
        raise ValueError(f"preprocess_image expects an RGB image, got mode {image.mode}")
    width, height = image.size
    scale = spec.resize / min(width, height)
    new_width = max(spec.size, round(width * scale))
    new_height = max(spec.size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - spec.size) // 2
    top = (new_height - spec.size) // 2
    image = image.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(image, dtype=np.uint8)


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes and preprocess them for the model.

    Raises:
        index.imaging.ImageDecodeError: the bytes are not a usable image.

    Returns:
        uint8 array of shape (spec.size, spec.size, 3).
    """
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=spec.resize)
    return preprocess_image(decoded.image, spec)
