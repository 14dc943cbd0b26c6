"""Backbones: pretrained EfficientNet-Lite0 classifies real photos; ResNet-50 and timm builds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from index.preprocess import PreprocessSpec, preprocess_image
from training.backbones import create_backbone, efficientnet_lite0, resnet50
from training.backbones.efficientnet_lite import LITE_INPUT_MEAN, LITE_INPUT_STD, same_padding
from training.backbones.resnet import IMAGENET_INPUT_MEAN, IMAGENET_INPUT_STD

# Photos that ship inside scikit-learn and scikit-image, with acceptable ImageNet classes.
EXPECTED_CLASSES = {
    "china": {698, 663, 483, 832},  # palace, monastery, castle, stupa
    "flower": {985},  # daisy
    "coffee": {504, 967, 968},  # coffee mug, espresso, cup
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
}


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """float (4, 3, 224, 224) on the 0..255 scale: resize 256, centre crop 224."""
    skimage_data = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    arrays = {"china": china, "flower": flower, "coffee": skimage_data.coffee(),
              "chelsea": skimage_data.chelsea()}
    spec = PreprocessSpec(size=224, resize=256)
    batch = np.stack([preprocess_image(Image.fromarray(arrays[name]).convert("RGB"), spec)
                      for name in EXPECTED_CLASSES])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


def _classify(model, images, mean, std):
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model.eval()(x).softmax(dim=1)
    top1_correct = 0
    log_likelihood = 0.0
    for row, expected in zip(probabilities, EXPECTED_CLASSES.values()):
        top1_correct += int(row.argmax()) in expected
        log_likelihood += math.log(float(row[list(expected)].sum()))
    return top1_correct, log_likelihood / len(EXPECTED_CLASSES), probabilities


def test_lite0_classifies_photos(photos):
    model = efficientnet_lite0(padding="same")
    correct, _, probabilities = _classify(model, photos, LITE_INPUT_MEAN, LITE_INPUT_STD)
    assert correct == len(EXPECTED_CLASSES)
    for row, expected in zip(probabilities, EXPECTED_CLASSES.values()):
        assert set(row.topk(5).indices.tolist()) & expected


def test_lite0_wrong_setup_degrades(photos):
    """TF "SAME" padding and (x - 127) / 128 scaling beat symmetric padding and ImageNet mean/std.

    Measured (this test's photos): mean log-probability of the expected classes
    -0.48 with the correct setup, -0.66 with symmetric padding, -0.76 with
    ImageNet mean/std (which also gets flower.jpg wrong at top-1).
    """
    correct, reference, _ = _classify(efficientnet_lite0(padding="same"), photos, LITE_INPUT_MEAN, LITE_INPUT_STD)
    _, symmetric, _ = _classify(efficientnet_lite0(padding="symmetric"), photos, LITE_INPUT_MEAN, LITE_INPUT_STD)
    imagenet_correct, imagenet, _ = _classify(
        efficientnet_lite0(padding="same"), photos, IMAGENET_INPUT_MEAN, IMAGENET_INPUT_STD
    )
    assert reference > symmetric
    assert reference > imagenet
    assert correct > imagenet_correct


def test_same_padding_is_tensorflow_rule():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(7, 3, 1) == (1, 1)


@pytest.mark.parametrize("size", [64, 97])
def test_lite0_feature_map_shape(size):
    backbone = create_backbone("efficientnet_lite0", pretrained=False)
    features = backbone.forward_features(torch.zeros(2, 3, size, size))
    side = math.ceil(size / 32)
    assert features.shape == (2, 1280, side, side)
    assert backbone._fc is None


def test_resnet50_loads_torchvision_keys(tmp_path):
    source = resnet50(pretrained=False)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    assert "layer4.2.bn3.running_var" in source.state_dict()
    assert "layer1.0.downsample.0.weight" in source.state_dict()

    loaded = create_backbone("resnet50", pretrained=True, weights=path)
    x = torch.randn(1, 3, 64, 64)
    source.eval(), loaded.eval()
    torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x))
    assert loaded.forward_features(x).shape == (1, 2048, 2, 2)


def test_resnet50_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights"):
        create_backbone("resnet50", pretrained=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("resnet50", pretrained=True, weights=tmp_path / "missing.pth")


def test_unknown_backbone_error():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        create_backbone("vgg", pretrained=False)


def test_timm_backbone():
    pytest.importorskip("timm")
    backbone = create_backbone("timm:resnet18", pretrained=False)
    features = backbone.forward_features(torch.zeros(1, 3, 64, 64))
    assert features.shape[1] == backbone.num_features


def test_timm_missing_error():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install timm"):
            create_backbone("timm:resnet18", pretrained=False)
    else:
        pytest.skip("timm is installed")
