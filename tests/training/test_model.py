"""IDMLModel: shapes, normalisation, heads, BatchNorm freezing, checkpoints."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from training.config import ModelConfig, TrainConfig
from training.losses import build_loss
from training.model import build_model


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(pretrained=False, **overrides))


def _images(n=4, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_output_shapes_and_norms():
    model = _model(embedding_dim=32, uncertainty_dim=8).eval()
    embedding, uncertainty = model.embed_images(_images())
    assert embedding.shape == (4, 32)
    assert uncertainty.shape == (4, 8)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(4))
    assert (uncertainty >= 0).all()


def test_normalize_uses_backbone_statistics():
    model = _model()
    assert model.input_mean == (127.0, 127.0, 127.0)
    assert model.input_std == (128.0, 128.0, 128.0)
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(pixels).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))
    resnet = build_model(ModelConfig(backbone="resnet50", pretrained=False))
    assert resnet.input_mean[0] == pytest.approx(0.485 * 255)


def test_learned_uncertainty_starts_near_init():
    torch.manual_seed(0)
    model = build_model(ModelConfig(uncertainty_init=0.5)).eval()
    _, uncertainty = model.embed_images(_images(n=8))
    scalar = (uncertainty**2).sum(dim=1)
    assert 0.25 < scalar.mean().item() < 1.0


def test_learned_uncertainty_varies_and_gets_gradient():
    # Pretrained weights: a randomly initialised backbone gives nearly constant features.
    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_dim=16, uncertainty_dim=8))
    model.train()
    loss_fn = build_loss(TrainConfig().loss, num_classes=3, embedding_dim=16, uncertainty_dim=8)
    embedding, uncertainty = model.embed_images(_images(n=6))
    scalar = (uncertainty**2).sum(dim=1)
    assert scalar.std().item() > 1e-3  # differs between images
    loss_fn(embedding, uncertainty, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    gradient = model.uncertainty_head.linear.weight.grad
    assert gradient is not None
    assert gradient.abs().max().item() > 1e-6


def test_l2norm_uncertainty_is_unit():
    model = _model(uncertainty_mode="l2norm").eval()
    _, uncertainty = model.embed_images(_images())
    torch.testing.assert_close((uncertainty**2).sum(dim=1), torch.ones(4))


def test_unknown_uncertainty_mode():
    with pytest.raises(ValueError, match="uncertainty_mode 'gauss'"):
        _model(uncertainty_mode="gauss")


def test_frozen_batchnorm_stays_eval():
    model = _model()
    model.train()
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms
    assert not any(bn.training for bn in batchnorms)
    assert not any(p.requires_grad for bn in batchnorms for p in bn.parameters())
    before = batchnorms[0].running_mean.clone()
    model.embed_images(_images())
    torch.testing.assert_close(batchnorms[0].running_mean, before)

    model.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.set_backbone_trainable(True)
    assert model.backbone._conv_stem.weight.requires_grad
    assert not any(p.requires_grad for bn in batchnorms for p in bn.parameters())


def test_unfrozen_batchnorm_trains():
    model = _model(freeze_bn=False)
    model.train()
    assert model.backbone._bn0.training


def test_channels_last_matches_contiguous():
    model = _model().eval()
    x = model.normalize(_images())
    expected, _ = model(x)
    model.to(memory_format=torch.channels_last)
    actual, _ = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    config = TrainConfig()
    config.model.pretrained = False
    config.model.embedding_dim = 16
    model = build_model(config.model).eval()
    loss = build_loss(config.loss, num_classes=3, embedding_dim=16, uncertainty_dim=64)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()))
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, model=model, proxies=loss, optimizer=optimizer, scheduler=None, epoch=3,
                    config=config.to_dict(), metrics={"map_at_r": 0.5}, best={"epoch": 2}, step=17)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left

    record = load_checkpoint(path)
    assert record["epoch"] == 3
    assert record["step"] == 17
    assert record["config"] == config.to_dict()
    restored, restored_config = load_model_from_checkpoint(path)
    assert restored_config["model"]["embedding_dim"] == 16
    images = _images()
    torch.testing.assert_close(restored.embed_images(images)[0], model.embed_images(images)[0])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an idml-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_ambiguous_versions_shapes():
    from training.evaluate import AMBIGUITY_PROBES, ambiguous_versions

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    versions = ambiguous_versions(x)
    assert tuple(versions) == AMBIGUITY_PROBES
    torch.testing.assert_close(versions["mixed"][0], 0.5 * (x[0] + x[1]))
    assert versions["low_resolution"].shape == x.shape
    single = ambiguous_versions(x[:1])["mixed"]
    torch.testing.assert_close(single, 0.5 * (x[:1] + x[:1].flip(3)))
