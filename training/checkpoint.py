"""Training checkpoints: model, proxies, optimiser and scheduler state, and the resolved config.

A checkpoint is a `torch.save` dict with the keys

    format_version  int, CHECKPOINT_VERSION
    model           IDMLModel state dict
    proxies         state dict of the loss module (class proxies, proxy uncertainty)
    optimizer       optimiser state dict, or None
    scheduler       learning-rate scheduler state dict, or None
    epoch           int, number of finished epochs
    step            int, number of finished optimiser steps
    config          dict, the resolved TrainConfig (`TrainConfig.to_dict()`)
    metrics         dict, validation metrics of this epoch (may be empty)
    best            dict, the best validation result so far, e.g. {"epoch": 3, "map_at_r": 0.41}
    rng             dict, torch and numpy random states to resume with

and is written atomically: to a temporary file in the same folder, then
`os.replace`, so a crash never leaves a half-written `last.pt`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import config_from_dict
from training.model import IDMLModel, build_model

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    proxies: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any],
    best: dict[str, Any],
    step: int = 0,
) -> None:
    """Write a checkpoint to `path` atomically (temporary file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format_version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "proxies": proxies.state_dict() if proxies is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "config": config,
        "metrics": metrics,
        "best": best,
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()},
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(record, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _numpy_rng_state() -> list:
    # Plain Python values, so that the checkpoint loads with weights_only=True.
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def restore_rng(record: dict[str, Any]) -> None:
    """Restore the torch and numpy random states saved in a checkpoint."""
    rng = record.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        name, keys, position, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict (tensors on the CPU).

    Raises:
        CheckpointError: the file is missing, unreadable, or not a checkpoint of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if not isinstance(record, dict) or "model" not in record or "config" not in record:
        raise CheckpointError(f"{path} is not an idml-train checkpoint (no 'model' or 'config' key)")
    version = record.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version}; this version reads {CHECKPOINT_VERSION}"
        )
    return record


def load_model_from_checkpoint(path: str | Path) -> tuple[IDMLModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its config and load its weights.

    Returns:
        (model in eval mode on the CPU, the resolved config dict stored in the checkpoint).
    """
    record = load_checkpoint(path)
    config = config_from_dict(record["config"])
    model = build_model(config.model, pretrained=False)
    try:
        model.load_state_dict(record["model"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path}: the weights do not match its config: {error}") from None
    model.eval()
    return model, record["config"]
