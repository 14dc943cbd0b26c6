"""Data-parallel training: two gloo processes against one process on the same global batch.

The two-process loss, every gradient and the parameters after two optimiser
steps must equal the single-process ones. Tolerances: 1e-9 relative in
float64, where the two sides differ only in summation order (measured 4e-16),
and 1e-5 relative plus 1e-6 absolute in float32 (measured 7e-7 on this tiny
model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from training import distributed
from training.checkpoint import load_checkpoint
from training.cli import main as train_main
from training.config import TrainConfig
from training.data.loader import MPerClassSampler, make_loader
from training.distributed import DistributedContext, ShardedBatchSampler, make_sharded_loader
from training.losses import build_loss
from training.model import IDMLModel
from training.train import TrainState, build_optimizer, compute_loss

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 120
TORCHRUN_TIMEOUT_S = 240
NUM_CLASSES = 5
# Global batch of 8 images: 4 classes, 2 images each, as MPerClassSampler(m=2) draws them.
LABELS = [3, 3, 0, 0, 4, 4, 1, 1]


class TinyBackbone(nn.Module):
    """One strided convolution: (n, 3, 16, 16) -> (n, 6, 8, 8)."""

    num_features = 6
    input_mean = (120.0, 110.0, 100.0)
    input_std = (60.0, 60.0, 60.0)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, 3, stride=2, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@dataclass(frozen=True)
class Case:
    name: str
    loss: str
    mixup_space: str
    dtype: torch.dtype
    backbone_frozen: tuple[bool, ...]  # one optimiser step per entry


CASES = (
    # Warm-up step then a full step: DDP is rebuilt when the backbone starts training.
    Case("idml_input_mixup_warmup", "idml", "input", torch.float64, (True, False)),
    Case("idml_embedding_mixup", "idml", "embedding", torch.float64, (False, False)),
    # The cosine loss leaves the uncertainty head without a gradient.
    Case("proxy_anchor", "proxy_anchor", "input", torch.float64, (False, False)),
    Case("idml_input_mixup_float32", "idml", "input", torch.float32, (False, False)),
)


def _tiny_state(case: Case) -> TrainState:
    config = TrainConfig()
    config.loss.name = case.loss
    config.loss.mixup_space = case.mixup_space
    config.model.embedding_dim = 8
    config.model.uncertainty_dim = 4
    config.run.channels_last = False
    torch.manual_seed(0)
    model = IDMLModel(TinyBackbone(), backbone_name="tiny", embedding_dim=8, uncertainty_dim=4)
    loss = build_loss(config.loss, num_classes=NUM_CLASSES, embedding_dim=8, uncertainty_dim=4)
    model.to(case.dtype)
    loss.to(case.dtype)
    optimizer = build_optimizer(config, model, loss)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return TrainState(config=config, model=model, loss=loss, optimizer=optimizer, scheduler=scheduler)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(LABELS), 3, 16, 16), generator=generator, dtype=torch.uint8)
    return images, torch.tensor(LABELS)


def _named_parameters(state: TrainState) -> dict[str, nn.Parameter]:
    named = {f"model.{name}": value for name, value in state.model.named_parameters()}
    named.update({f"loss.{name}": value for name, value in state.loss.named_parameters()})
    return named


def run_case(case: Case, shards: distributed.BatchShards, training=None) -> dict:
    """Train `case` for its steps on this process's rows; return losses, first-step gradients, parameters."""
    state = _tiny_state(case)
    state.distributed = training
    images, labels = _global_batch()
    rows = shards.local_rows(len(LABELS))
    local_images, local_labels = images[rows], labels[rows]
    losses, gradients = [], {}
    for step, frozen in enumerate(case.backbone_frozen):
        state.model.set_backbone_trainable(not frozen)
        state.model.train()
        rng = np.random.default_rng([0, step])

        def compute(frozen=frozen, rng=rng):
            return compute_loss(state, local_images, local_labels, rng, backbone_frozen=frozen, shards=shards)

        loss, _ = compute() if training is None else training.step(state.model, state.loss, compute)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            gradients = {
                name: None if value.grad is None else value.grad.detach().clone()
                for name, value in _named_parameters(state).items()
            }
        state.optimizer.step()
    parameters = {name: value.detach().clone() for name, value in _named_parameters(state).items()}
    return {"losses": losses, "gradients": gradients, "parameters": parameters}


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        context = DistributedContext(rank=rank, world_size=WORLD_SIZE, local_rank=rank, device=torch.device("cpu"))
        results = {}
        for case in CASES:
            training = distributed.DistributedTraining(
                context, find_unused_parameters=not distributed.uses_every_parameter(case.loss)
            )
            results[case.name] = run_case(case, training.shards, training)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    distributed._destroy_group()


def _spawn_workers(tmp_path: Path) -> list[dict]:
    processes = mp.spawn(
        _worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=False
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not processes.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} training processes did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    return _spawn_workers(tmp_path_factory.mktemp("ddp"))


def _tolerance(case: Case) -> dict[str, float]:
    if case.dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_two_processes_match_one(case, two_process_results):
    expected = run_case(case, distributed.SINGLE_PROCESS)
    tolerance = _tolerance(case)
    for rank, results in enumerate(two_process_results):
        got = results[case.name]
        np.testing.assert_allclose(got["losses"], expected["losses"], **tolerance, err_msg=f"rank {rank} loss")
        assert got["gradients"].keys() == expected["gradients"].keys()
        for name, gradient in expected["gradients"].items():
            if gradient is None:
                assert got["gradients"][name] is None, f"rank {rank}: {name} has a gradient in 2 processes only"
                continue
            assert got["gradients"][name] is not None, f"rank {rank}: {name} has no gradient in 2 processes"
            torch.testing.assert_close(got["gradients"][name], gradient, **tolerance, msg=f"rank {rank} grad {name}")
        for name, value in expected["parameters"].items():
            torch.testing.assert_close(got["parameters"][name], value, **tolerance, msg=f"rank {rank} {name}")


def test_cases_cover_frozen_backbone_and_unused_head():
    frozen = run_case(CASES[0], distributed.SINGLE_PROCESS)["gradients"]
    assert frozen["model.backbone.conv.weight"] is None
    assert frozen["loss.proxies"] is not None
    cosine = run_case(CASES[2], distributed.SINGLE_PROCESS)["gradients"]
    assert cosine["model.uncertainty_head.linear.weight"] is None


# Sharded batches --------------------------------------------------------------


class _IndexDataset(torch.utils.data.Dataset):
    """Item i is (i, label of i): the loader's batches show which samples they hold."""

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.labels[index]


def _epochs_of_batches(loader, epochs: int = 2, seed: int = 7) -> list[list[list[int]]]:
    # As train_one_epoch prepares the loader for each epoch.
    result = []
    for epoch in range(epochs):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        loader.generator.manual_seed(seed + epoch)
        result.append([indices.tolist() for indices, _ in loader])
    return result


@pytest.mark.parametrize("m_per_class", [None, 2])
def test_sharded_loader_splits_global_batches(m_per_class):
    labels = [index % 6 for index in range(30)]
    dataset = _IndexDataset(labels)
    single = make_loader(dataset, 8, shuffle=True, workers=0, seed=7, m_per_class=m_per_class)
    expected = _epochs_of_batches(single)
    shards = []
    for rank in range(WORLD_SIZE):
        context = DistributedContext(rank=rank, world_size=WORLD_SIZE, local_rank=rank, device=torch.device("cpu"))
        loader = make_sharded_loader(dataset, 8, context=context, workers=0, seed=7, m_per_class=m_per_class)
        shards.append(_epochs_of_batches(loader))

    assert len(expected[0]) == 3
    assert expected[0] != expected[1]
    for epoch in range(2):
        for step, batch in enumerate(expected[epoch]):
            assert [len(shard[epoch][step]) for shard in shards] == [4, 4]
            assert shards[0][epoch][step] + shards[1][epoch][step] == batch


def test_sharded_loader_rejects_indivisible_batch():
    context = DistributedContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="data.batch_size=8 must be a multiple of the 3 training processes"):
        make_sharded_loader(_IndexDataset([0, 1] * 8), 8, context=context, workers=0)


def test_sharded_sampler_rejects_bad_rank():
    sampler = MPerClassSampler([0, 1] * 8, 4, 2)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        ShardedBatchSampler(sampler, rank=2, world_size=2)


def test_rank_seeds_differ():
    seeds = {distributed.rank_seed(5, rank) for rank in range(4)}
    assert len(seeds) == 4
    assert distributed.rank_seed(5, 1) == distributed.rank_seed(5, 1)


# torchrun end to end ----------------------------------------------------------


def _write_images(root: Path) -> None:
    """8 training classes (2 become validation) of 4 images each, and 2 test classes: 40 images at 40 px."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for label in range(10):
        folder = root / ("train" if label < 8 else "test") / f"class{label}"
        folder.mkdir(parents=True)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        for index in range(4):
            image = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(0, 256, 3)))
            offset = int(rng.integers(0, 10))
            ImageDraw.Draw(image).rectangle((5 + offset, 5 + offset, 25 + offset, 25 + offset), fill=color)
            image.save(folder / f"{index}.png")


def _torchrun(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        "-m", "training.cli", *arguments,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                          check=False)


@pytest.mark.slow
def test_torchrun_resumes_and_trains_epoch(tmp_path):
    """A single-process warm-up epoch, then `torchrun --nproc_per_node 2` resumes it for a full epoch."""
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed, so torchrun cannot start")
    data = tmp_path / "shapes"
    _write_images(data)
    run_dir = tmp_path / "run"
    overrides = [
        "data.dataset=folder", f"data.root={data}", "data.val_fraction=0.25", "data.image_size=32",
        "data.batch_size=8", "data.m_per_class=2", "data.eval_batch_size=16", "data.num_workers=0",
        "model.pretrained=false", "model.embedding_dim=16", "model.uncertainty_dim=4",
        "schedule.epochs=1", "schedule.warmup_epochs=1", "schedule.max_steps_per_epoch=2",
        f"run.output_dir={run_dir}", "run.progress=false", "run.num_threads=1",
    ]
    assert train_main(["train", *[f"--set={item}" for item in overrides]]) == 0
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1

    result = _torchrun(["train", "--resume", str(run_dir), "--set", "schedule.epochs=2"], tmp_path)

    assert result.returncode == 0, result.stderr[-4000:]
    # Only rank 0 prints the result line and writes metrics.
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]
    assert [record["step"] for record in records] == [2, 4]
    assert records[1]["train"]["backbone_frozen"] is False
    assert records[1]["train"]["images"] == 16  # 2 steps of the global batch of 8
    assert np.isfinite(records[1]["train"]["loss"])
    assert records[1]["val"]["num_images"] == 8
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["epoch"] == 2
    assert checkpoint["step"] == 4
    assert not any(key.startswith("module.") for key in checkpoint["model"])
