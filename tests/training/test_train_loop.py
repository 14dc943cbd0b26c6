"""The whole training loop on a few dozen synthetic images at 64 px, plus config handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.checkpoint import load_checkpoint
from training.cli import main
from training.config import ConfigError, TrainConfig, config_from_dict, load_config
from training.data.loader import ImageDataset, make_loader
from training.data.transforms import TrainTransform
from training.evaluate import load_splits
from training.train import build_state, train_one_epoch

IMAGES_PER_CLASS = 4


def _write_class(folder, label: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    for index in range(IMAGES_PER_CLASS):
        image = Image.new("RGB", (80, 80), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        offset = int(rng.integers(0, 20))
        box = (10 + offset, 10 + offset, 50 + offset, 50 + offset)
        if label % 2:
            draw.ellipse(box, fill=color)
        else:
            draw.rectangle(box, fill=color)
        image.save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """folder layout: 8 training classes (2 become validation) and 3 test classes, 4 images each."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for label in range(8):
        _write_class(root / "train" / f"class{label:02d}", label, rng)
    for label in range(8, 11):
        _write_class(root / "test" / f"class{label:02d}", label, rng)
    return root


def _overrides(root, run_dir, epochs: int) -> list[str]:
    return [
        "data.dataset=folder", f"data.root={root}", "data.val_fraction=0.25", "data.image_size=64",
        "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
        "model.pretrained=false", "model.embedding_dim=32", "model.uncertainty_dim=8",
        f"schedule.epochs={epochs}", "schedule.warmup_epochs=1", "schedule.max_steps_per_epoch=2",
        f"run.output_dir={run_dir}", "run.progress=false", "run.num_threads=2",
    ]


def _read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_evaluate_resume(dataset_root, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *[f"--set={item}" for item in _overrides(dataset_root, run_dir, 2)]]) == 0

    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    records = _read_metrics(run_dir)
    assert [record["epoch"] for record in records] == [1, 2]
    assert records[0]["train"]["backbone_frozen"] is True
    assert records[1]["train"]["backbone_frozen"] is False
    assert records[1]["step"] == 4
    assert np.isfinite(records[1]["train"]["loss"])
    assert 0.0 <= records[1]["val"]["map_at_r"] <= 1.0
    assert records[1]["val"]["num_images"] == 8

    # The saved config is the resolved one and loads back unchanged.
    saved = load_config(run_dir / "config.yaml")
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["config"] == saved.to_dict()
    assert checkpoint["epoch"] == 2
    assert checkpoint["step"] == 4
    assert saved.data.image_size == 64

    # Resume for one more epoch: epoch and step continue, earlier lines stay.
    assert main(["train", "--resume", str(run_dir), "--set", "schedule.epochs=3"]) == 0
    resumed = _read_metrics(run_dir)
    assert [record["epoch"] for record in resumed] == [1, 2, 3]
    assert resumed[:2] == records
    assert resumed[2]["step"] == 6
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    assert load_checkpoint(run_dir / "last.pt")["config"]["schedule"]["epochs"] == 3

    out = tmp_path / "test-metrics.json"
    assert main(["evaluate", str(run_dir / "best.pt"), "--split", "test", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "test"
    assert result["metrics"]["num_images"] == 12
    for key in ("recall_at_1", "recall_at_8", "map_at_r", "r_precision", "nmi", "uncertainty_auroc",
                "uncertainty_mean_mixed", "uncertainty_raised_low_resolution"):
        assert key in result["metrics"], key
    assert 0.0 <= result["metrics"]["uncertainty_raised_mixed"] <= 1.0


def test_warmup_trains_only_heads(dataset_root, tmp_path):
    config = load_config(None, _overrides(dataset_root, tmp_path / "run", 2))
    config.loss.mixup_space = "embedding"
    torch.manual_seed(0)
    splits = load_splits(config.data)
    loader = make_loader(ImageDataset(splits.train, TrainTransform(64)), 8, shuffle=True, workers=0)
    state = build_state(config, splits.num_train_classes)
    backbone_before = {k: v.clone() for k, v in state.model.backbone.state_dict().items()}
    head_before = state.model.semantic_head.linear.weight.clone()
    proxies_before = state.loss.proxies.detach().clone()

    metrics = train_one_epoch(state, loader)
    assert metrics["backbone_frozen"] is True
    for key, value in state.model.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_before[key], msg=key)
    assert not torch.equal(state.model.semantic_head.linear.weight, head_before)
    assert not torch.equal(state.loss.proxies.detach(), proxies_before)

    state.epoch = 1
    assert train_one_epoch(state, loader)["backbone_frozen"] is False
    assert not torch.equal(state.model.backbone._conv_stem.weight, backbone_before["_conv_stem.weight"])


def test_resume_missing_run(tmp_path):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("loss:\n  name: proxy_anchor\noptim:\n  lr: 3.0e-4\n")
    config = load_config(path, ["data.image_size=96", "loss.mixup=true"])
    assert config.loss.name == "proxy_anchor"
    assert config.optim.lr == 3e-4
    assert config.data.image_size == 96
    assert config.loss.uses_mixup
    assert config_from_dict(config.to_dict()) == config

    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="loss.name='triplet'"):
        load_config(None, ["loss.name=triplet"])
    with pytest.raises(ConfigError, match="data.image_size='big' must be an integer"):
        load_config(None, ["data.image_size=big"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        load_config(None, ["schedule.warmup_epochs=50"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_committed_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), TrainConfig), path
