"""ImageDataset, transforms, the m-per-class sampler and the seeded DataLoader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index.imaging import ImageDecodeError, decode_image
from index.preprocess import PreprocessSpec, preprocess_image
from training.data import Sample
from training.data.loader import ImageDataset, MPerClassSampler, make_loader
from training.data.transforms import EvalTransform, RandomResizedCrop, TrainTransform


def gradient(width: int = 40, height: int = 30) -> np.ndarray:
    """Return a uint8 (height, width) gradient."""
    x = np.linspace(0, 255, width)
    y = np.linspace(0, 255, height)
    return ((x[None, :] + y[:, None]) / 2).astype(np.uint8)


def image_in_mode(mode: str) -> tuple[Image.Image, str]:
    """Return an image of Pillow ``mode`` and a file format that stores that mode."""
    gray = gradient()
    rgb = Image.fromarray(np.stack([gray, 255 - gray, np.full_like(gray, 90)], axis=2))
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
        return image, "PNG"
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257), "PNG"
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257), "TIFF"
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255.0), "TIFF"
    if mode == "CMYK":
        return rgb.convert("CMYK"), "JPEG"
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)]), "PNG"
    return rgb.convert(mode), "PNG"


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_comes_out_rgb_uint8(tmp_path, mode):
    image, file_format = image_in_mode(mode)
    path = tmp_path / f"image.{file_format.lower()}"
    image.save(path, format=file_format)
    assert Image.open(path).mode == mode  # the file really stores this mode

    train_item, label = ImageDataset([Sample(path, 3, "c")], TrainTransform(24))[0]
    eval_item, _ = ImageDataset([Sample(path, 3, "c")], EvalTransform(PreprocessSpec(24, 28)))[0]

    assert label == 3
    for tensor in (train_item, eval_item):
        assert tensor.dtype == torch.uint8
        assert tuple(tensor.shape) == (3, 24, 24)


def test_eval_transform_matches_preprocess_image(tmp_path):
    path = tmp_path / "photo.png"
    image_in_mode("RGBA")[0].save(path)
    spec = PreprocessSpec(size=20, resize=24)

    tensor, _ = ImageDataset([Sample(path, 0, "c")], EvalTransform(spec))[0]

    expected = preprocess_image(decode_image(path.read_bytes()).image, spec)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def test_alpha_composited_on_white(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(path)

    tensor, _ = ImageDataset([Sample(path, 0, "c")], EvalTransform(PreprocessSpec(16, 16)))[0]

    assert int(tensor.min()) == 255


def test_corrupt_image_error_names_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")

    with pytest.raises(ImageDecodeError, match="broken.png"):
        ImageDataset([Sample(path, 0, "c")], TrainTransform(16))[0]


def test_random_resized_crop_box_inside_image():
    crop = RandomResizedCrop(32, scale=(0.35, 1.0))
    torch.manual_seed(0)
    for width, height in [(100, 60), (60, 100), (33, 33), (500, 20)]:
        for _ in range(50):
            left, top, right, bottom = crop.crop_box(width, height)
            assert 0 <= left < right <= width
            assert 0 <= top < bottom <= height


def test_random_resized_crop_area_within_scale():
    crop = RandomResizedCrop(32, scale=(0.35, 1.0))
    torch.manual_seed(1)
    fractions = []
    for _ in range(200):
        left, top, right, bottom = crop.crop_box(200, 200)
        fractions.append((right - left) * (bottom - top) / 200**2)
    assert min(fractions) >= 0.34
    assert max(fractions) <= 1.0


def test_random_resized_crop_falls_back_to_centre():
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))

    box = crop.crop_box(100, 10)  # no square covers the whole area, so every draw fails

    assert box == (45, 0, 55, 10)


def test_flip_probability_one_mirrors():
    image = Image.fromarray(np.stack([gradient(16, 16)] * 3, axis=2))
    torch.manual_seed(0)

    flipped = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)(image)
    plain = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)(image)

    np.testing.assert_array_equal(flipped.numpy(), plain.flip(2).numpy())


@pytest.mark.parametrize(
    "arguments", [{"size": 0}, {"size": 8, "scale": (0.0, 1.0)}, {"size": 8, "ratio": (2.0, 1.0)}, {"size": 8, "flip_p": 2.0}]
)
def test_train_transform_invalid_arguments_raise(arguments):
    with pytest.raises(ValueError):
        TrainTransform(**arguments)


def make_samples(root: Path, classes: int, per_class: int) -> list[Sample]:
    samples = []
    for label in range(classes):
        for index in range(per_class):
            path = root / f"{label}_{index}.png"
            Image.new("RGB", (12, 12), (20 * label, 10 * index, 100)).save(path)
            samples.append(Sample(path, label, f"class_{label}"))
    return samples


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*list(loader))
    return torch.cat(images), torch.cat(labels)


def test_loader_repeats_under_seed(tmp_path):
    dataset = ImageDataset(make_samples(tmp_path, classes=4, per_class=4), TrainTransform(10))

    first = collect(make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=5))
    again = collect(make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=5))
    other = collect(make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=6))

    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_loader_workers_repeat_under_seed(tmp_path):
    dataset = ImageDataset(make_samples(tmp_path, classes=4, per_class=4), TrainTransform(10))

    first = collect(make_loader(dataset, batch_size=4, shuffle=True, workers=2, seed=5))
    again = collect(make_loader(dataset, batch_size=4, shuffle=True, workers=2, seed=5))

    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])


def test_eval_loader_keeps_every_image_in_order(tmp_path):
    samples = make_samples(tmp_path, classes=3, per_class=3)
    dataset = ImageDataset(samples, EvalTransform(PreprocessSpec(16, 16)))

    _, labels = collect(make_loader(dataset, batch_size=4, shuffle=False, workers=0))

    assert labels.tolist() == [sample.label for sample in samples]


def test_m_per_class_batches():
    labels = [label for label in range(10) for _ in range(4)] + [10, 10]  # class 10 has 2 images
    sampler = MPerClassSampler(labels, batch_size=8, m=4, seed=0)

    batches = list(sampler)

    assert len(batches) == len(labels) // 8
    for batch in batches:
        counts = Counter(labels[index] for index in batch)
        assert len(batch) == 8
        assert sorted(counts.values()) == [4, 4]


def test_m_per_class_epochs_differ_and_repeat():
    labels = [label for label in range(6) for _ in range(4)]

    sampler = MPerClassSampler(labels, batch_size=8, m=2, seed=3)
    epoch_0, epoch_1 = list(sampler), list(sampler)
    sampler.set_epoch(0)

    assert epoch_0 != epoch_1
    assert list(sampler) == epoch_0


@pytest.mark.parametrize(("batch_size", "m", "message"), [(6, 4, "multiple"), (8, 0, "at least 1"), (40, 4, "only")])
def test_m_per_class_invalid_arguments_raise(batch_size, m, message):
    labels = [label for label in range(3) for _ in range(4)]

    with pytest.raises(ValueError, match=message):
        MPerClassSampler(labels, batch_size=batch_size, m=m)


def test_loader_with_m_per_class(tmp_path):
    dataset = ImageDataset(make_samples(tmp_path, classes=4, per_class=4), TrainTransform(10))

    loader = make_loader(dataset, batch_size=8, shuffle=True, workers=0, seed=0, m_per_class=4)
    batches = list(loader)

    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (8, 3, 10, 10)
        assert sorted(Counter(labels.tolist()).values()) == [4, 4]
