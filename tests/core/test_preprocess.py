"""The shared preprocessing: resize the shorter side, centre-crop, uint8 HWC."""

import io

import numpy as np
import pytest
from PIL import Image

from index.preprocess import PreprocessSpec, preprocess_bytes, preprocess_image


def test_output_shape_and_dtype():
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    array = preprocess_image(image, PreprocessSpec(size=64, resize=72))
    assert array.shape == (64, 64, 3)
    assert array.dtype == np.uint8


def test_small_image_upscaled():
    image = Image.new("RGB", (10, 20), (200, 0, 0))
    array = preprocess_image(image, PreprocessSpec(size=64, resize=64))
    assert array.shape == (64, 64, 3)
    assert tuple(array[32, 32]) == (200, 0, 0)


def test_centre_crop_keeps_centre():
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, 100:200] = 255  # white centre third
    result = preprocess_image(Image.fromarray(array), PreprocessSpec(size=64, resize=64))
    assert result[:, 16:48].min() > 200


def test_bytes_and_image_paths_agree():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    spec = PreprocessSpec(size=48, resize=56)
    np.testing.assert_array_equal(preprocess_bytes(buffer.getvalue(), spec), preprocess_image(image, spec))


def test_invalid_spec_rejected():
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(size=64, resize=32)
