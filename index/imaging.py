"""Decode encoded image bytes and convert every Pillow mode to 8-bit RGB.

`decode_image` is the one decoder of the project: training, indexing and
serving all call it, so an image looks the same to the model everywhere.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats decoded by default. HEIF and AVIF join when a plugin registers them.
BASE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

# 40 megapixels: a 7,300 x 5,500 photo. Pillow itself only warns at 89 MP.
DEFAULT_MAX_PIXELS = 40_000_000

# Alpha is composited on this colour, so transparent regions read as paper.
BACKGROUND_RGB = (255, 255, 255)

# Truncated files must fail loudly, never decode to a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Set by the first import attempt, so that a missing plugin costs one failed import, not one per image.
_heif_checked = False


def register_optional_formats() -> list[str]:
    """Register HEIC/HEIF and AVIF decoders from pillow-heif when it is installed.

    Returns the names of the optional formats now decodable (empty without the plugin).
    """
    global _heif_checked
    if not _heif_checked:
        _heif_checked = True
        try:
            import pillow_heif  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            pillow_heif.register_heif_opener()
            if hasattr(pillow_heif, "register_avif_opener"):
                pillow_heif.register_avif_opener()
    Image.init()
    return [name for name in ("HEIF", "AVIF") if name in Image.OPEN]


def supported_formats() -> list[str]:
    """Return the image formats `decode_image` accepts on this installation."""
    return list(BASE_FORMATS) + register_optional_formats()


class ImageDecodeError(ValueError):
    """An upload that is not a usable image.

    `reason` is a stable machine-readable code: `empty`, `not_an_image`,
    `unsupported_format`, `too_many_pixels`, `truncated` or `corrupt`.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and facts about its source."""

    image: Image.Image  # mode "RGB", EXIF orientation applied
    source_format: str  # Pillow format name, for example "PNG"
    source_mode: str  # Pillow mode before conversion, for example "P" or "I;16"
    source_size: tuple[int, int]  # (width, height) as stored, before orientation
    frame_count: int  # > 1 for animations; frame 0 is the one used


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> DecodedImage:
    """Decode `data` into an 8-bit RGB image.

    The header is read first and an image of more than `max_pixels` pixels is
    rejected before any pixel is decoded. Animated images use their first
    frame. EXIF orientation is applied. `draft_size`, if given, lets the JPEG
    decoder skip detail that a resize to that shorter side would discard. The
    result is then smaller, but still at least `draft_size` on its shorter side.

    Raises:
        ImageDecodeError: the bytes are empty, not an image, in a format not
            in `supported_formats()`, too large, truncated or corrupt.
    """
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")

    formats = supported_formats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not_an_image",
            f"the bytes are not an image in a known format (accepted: {', '.join(formats)})",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own guard fired before our limit could be checked.
        raise ImageDecodeError(
            "too_many_pixels",
            f"the image header declares too many pixels (more than the limit of {max_pixels} pixels): {error}",
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError("corrupt", f"the image header is invalid: {error}") from None

    if image.format not in formats:
        raise ImageDecodeError(
            "unsupported_format",
            f"image format {image.format} is not supported (accepted: {', '.join(formats)})",
        )

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"the image has an invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels}",
        )

    frame_count = int(getattr(image, "n_frames", 1) or 1)
    source_mode = image.mode
    try:
        if frame_count > 1:
            image.seek(0)
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size, draft_size))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(
            "too_many_pixels", f"the image has too many pixels (more than the limit of {max_pixels} pixels): {error}"
        ) from None
    except OSError as error:
        text = str(error)
        if "truncated" in text or "broken data stream" in text or "end of file" in text.lower():
            raise ImageDecodeError("truncated", f"the image data is truncated: {text}") from None
        raise ImageDecodeError("corrupt", f"the image data is corrupt: {text}") from None
    except (SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError("corrupt", f"the image data is corrupt: {error}") from None

    try:
        oriented = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        oriented = image  # an unreadable EXIF block is ignored, not fatal
    rgb = to_rgb(oriented if oriented is not None else image)
    return DecodedImage(
        image=rgb,
        source_format=str(image.format),
        source_mode=source_mode,
        source_size=(width, height),
        frame_count=frame_count,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB.

    Transparency (alpha channels and palette transparency) is composited on
    white. 16- and 32-bit integer images are scaled to 8 bits by their bit
    depth. Float images ("F") are read as [0, 1] when their maximum is at most
    1, else as [0, 255], and then clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image

    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)

    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        return image.convert("RGB")

    if mode in ("RGBa", "La"):
        image = image.convert("RGBA")  # un-premultiply before compositing
        mode = "RGBA"
    if mode in ("LA", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", image.size, BACKGROUND_RGB)
        background.paste(image, mask=image.getchannel("A"))
        return background

    if mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("LA"))
    if mode == "RGB" or mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    # Any mode Pillow adds later: its own conversion is the best guess.
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image)
    if pixels.ndim == 3:  # defensive: multi-band high-depth modes do not exist yet
        pixels = pixels[..., 0]
    values = pixels.astype(np.float64)
    if image.mode == "F":
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        # 16-bit samples, also when a 16-bit PNG opens as mode "I".
        values = values / 257.0
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
