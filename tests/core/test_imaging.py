"""Decoding and mode conversion: every Pillow mode becomes the same RGB image."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from index.imaging import ImageDecodeError, decode_image, supported_formats, to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient_rgb(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)
    y = np.linspace(0, 255, height, dtype=np.float64)
    red = np.tile(x, (height, 1))
    green = np.tile(y[:, None], (1, width))
    blue = np.full((height, width), 90.0)
    return Image.fromarray(np.stack([red, green, blue], axis=2).astype(np.uint8))


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
)
def test_every_mode_decodes_to_rgb(mode):
    source = gradient_rgb()
    if mode in ("I;16", "I"):
        array = (np.asarray(source.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array.astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(np.asarray(source.convert("L"), dtype=np.float32) / 255.0)
    else:
        image = source.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "YCbCr", "I;16") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    decoded = decode_image(encode(image, fmt))
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == source.size


def test_high_depth_matches_8bit_gray():
    gray = gradient_rgb().convert("L")
    wide = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))
    assert wide.mode == "I;16"
    converted = np.asarray(to_rgb(wide))[..., 0].astype(int)
    assert np.abs(converted - np.asarray(gray, dtype=int)).max() <= 1


def test_float_image_in_unit_range_scaled():
    values = np.full((4, 4), 0.5, dtype=np.float32)
    converted = np.asarray(to_rgb(Image.fromarray(values)))
    assert converted[0, 0, 0] in (127, 128)


def test_alpha_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    decoded = decode_image(encode(image)).image
    assert decoded.getpixel((4, 4)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    decoded = decode_image(encode(image, transparency=0)).image
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (0, 255, 0)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.image.size == (20, 40)
    assert decoded.source_size == (40, 20)


def test_animated_image_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = decode_image(data.getvalue())
    assert decoded.frame_count == 2
    red, green, blue = decoded.image.getpixel((8, 8))
    assert red > 200
    assert blue < 50


def test_empty_bytes_rejected():
    with pytest.raises(ImageDecodeError) as error:
        decode_image(b"")
    assert error.value.reason == "empty"


def test_non_image_rejected():
    with pytest.raises(ImageDecodeError) as error:
        decode_image(b"%PDF-1.4 definitely not an image")
    assert error.value.reason == "not_an_image"
    assert "PNG" in str(error.value)


def test_truncated_png_rejected():
    data = encode(gradient_rgb(200, 200))
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data[: len(data) // 2])
    assert error.value.reason in ("truncated", "corrupt")


def test_truncated_jpeg_rejected():
    data = encode(gradient_rgb(200, 200), "JPEG")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data[: len(data) // 2])
    assert error.value.reason == "truncated"


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header():
    with pytest.raises(ImageDecodeError) as error:
        decode_image(png_with_declared_size(100_000, 100_000))
    assert error.value.reason == "too_many_pixels"


def test_pixel_limit_is_configurable():
    data = encode(gradient_rgb(100, 100))
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data, max_pixels=5_000)
    assert "10000 pixels" in str(error.value)


def test_unsupported_format_rejected():
    image = gradient_rgb(8, 8)
    data = io.BytesIO()
    image.save(data, format="PPM")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data.getvalue())
    assert error.value.reason == "unsupported_format"
    assert "PPM" in str(error.value)


def test_supported_formats_include_common_ones():
    formats = supported_formats()
    for name in ("JPEG", "PNG", "WEBP", "GIF"):
        assert name in formats
