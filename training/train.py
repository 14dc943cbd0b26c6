"""The training loop: Proxy Anchor (plain, with mixup, or introspective) on a class-disjoint split.

A run folder gets
    config.yaml     the resolved config
    metrics.jsonl   one JSON line per epoch: train loss, speed, validation metrics
    last.pt         checkpoint after every epoch (resume from it)
    best.pt         checkpoint of the epoch with the best validation MAP@R

Started by torchrun with several processes, the loop trains data-parallel
(`training.distributed`): the loss is computed on the gathered global batch,
and only rank 0 validates and writes these files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed
from training.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from training.config import TrainConfig, config_from_dict, save_config
from training.data.loader import ImageDataset, make_loader
from training.data.splits import DatasetSplits
from training.data.transforms import TrainTransform
from training.evaluate import evaluate_samples, load_splits, subset_samples
from training.losses import ProxyAnchorLoss, build_loss, mix_embeddings, mix_images, sample_mixup
from training.model import IDMLModel, build_model

logger = logging.getLogger(__name__)

BEST_METRIC = "map_at_r"


@dataclass
class TrainState:
    """Everything the loop mutates, so that one epoch can be a function."""

    config: TrainConfig
    model: IDMLModel
    loss: ProxyAnchorLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    epoch: int = 0  # finished epochs
    step: int = 0  # finished optimiser steps
    best: dict[str, Any] | None = None
    # DDP and the gathered global batch when torchrun started several processes; None in one process.
    distributed: distributed.DistributedTraining | None = None

    @property
    def device(self) -> torch.device:
        if self.distributed is not None:
            return self.distributed.context.device
        return torch.device(self.config.run.device)

    @property
    def is_main(self) -> bool:
        """Whether this process validates and writes the run's files (rank 0, or the only process)."""
        return self.distributed is None or self.distributed.context.is_main


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_optimizer(config: TrainConfig, model: IDMLModel, loss: nn.Module) -> torch.optim.AdamW:
    """AdamW with three groups: backbone and heads at optim.lr, proxies at lr * proxy_lr_multiplier.

    Frozen BatchNorm parameters are left out.
    """
    head_ids = {id(parameter) for parameter in model.head_parameters()}
    backbone = [
        parameter for parameter in model.parameters()
        if id(parameter) not in head_ids and parameter.requires_grad
    ]
    groups = [
        {"params": backbone, "lr": config.optim.lr, "name": "backbone"},
        {"params": model.head_parameters(), "lr": config.optim.lr, "name": "heads"},
        {"params": list(loss.parameters()), "lr": config.optim.lr * config.optim.proxy_lr_multiplier,
         "name": "proxies"},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay)


def build_state(config: TrainConfig, num_classes: int) -> TrainState:
    model = build_model(config.model).to(config.run.device)
    if config.run.channels_last:
        model.to(memory_format=torch.channels_last)
    loss = build_loss(
        config.loss, num_classes=num_classes, embedding_dim=config.model.embedding_dim,
        uncertainty_dim=config.model.uncertainty_dim,
    ).to(config.run.device)
    optimizer = build_optimizer(config, model, loss)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.schedule.lr_step_epochs, gamma=config.schedule.lr_gamma
    )
    return TrainState(config=config, model=model, loss=loss, optimizer=optimizer, scheduler=scheduler)


def compute_loss(
    state: TrainState, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator,
    *, backbone_frozen: bool, shards: distributed.BatchShards = distributed.SINGLE_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the loss of one global batch, with mixup when `config.loss.uses_mixup` is true.

    In one process the global batch is `images`. With `shards` from
    `training.distributed`, `images` are this rank's rows of the global batch:
    the embeddings are gathered and every rank returns the global-batch loss.
    `rng` must then be in the same state on every rank.

    Args:
        images: uint8 (n, 3, H, W) on the device, this rank's n rows.
        labels: int64 (n,).

    Returns:
        (loss scalar of the global batch, uncertainty of the global batch's clean images
        (W n, du), detached).
    """
    config = state.config
    model, loss_fn = state.model, state.loss
    memory_format = torch.channels_last if config.run.channels_last else torch.contiguous_format
    x = model.normalize(images).contiguous(memory_format=memory_format)
    all_labels = shards.gather_constant(labels)
    global_size = all_labels.shape[0]

    mixup = config.loss.uses_mixup
    input_mixup = mixup and config.loss.mixup_space == "input"
    if mixup:
        lam, permutation = sample_mixup(global_size, config.loss.mixup_alpha, rng)
        permutation = permutation.to(x.device)

    def embed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if backbone_frozen:
            # Warm-up: no gradient reaches the backbone, so skip its backward graph.
            with torch.no_grad():
                features = model.pool(batch)
            return model.heads(features)
        return model(batch)

    local_embedding, local_uncertainty = embed(x)
    clean_embedding = shards.gather(local_embedding)
    clean_uncertainty = shards.gather(local_uncertainty)
    total = loss_fn(clean_embedding, clean_uncertainty, all_labels)
    if mixup:
        if input_mixup:
            # A second forward pass rather than one over the concatenated batch: the same
            # result with frozen BatchNorm, and on CPU a batch of 2n images at 128 px was
            # several times slower per image than two batches of n (measured at n = 64).
            if shards.world_size == 1:
                mixed_input = mix_images(x, lam, permutation)
            else:
                # Partners come from the whole global batch, so every rank needs its rows' partners:
                # the mixed rows equal those of mix_images on the gathered batch.
                partner_rows = permutation[shards.local_rows(global_size)]
                partners = model.normalize(shards.gather_constant(images)[partner_rows])
                mixed_input = lam * x + (1.0 - lam) * partners.contiguous(memory_format=memory_format)
            local_mixed, local_mixed_uncertainty = embed(mixed_input)
            mixed = shards.gather(local_mixed)
            mixed_uncertainty = shards.gather(local_mixed_uncertainty)
        else:
            mixed, mixed_uncertainty = mix_embeddings(
                clean_embedding, clean_uncertainty, lam, permutation,
                normalize_uncertainty=config.model.uncertainty_mode == "l2norm",
            )
        total = (
            total
            + lam * loss_fn(mixed, mixed_uncertainty, all_labels)
            + (1.0 - lam) * loss_fn(mixed, mixed_uncertainty, all_labels[permutation])
        )
    return total, clean_uncertainty.detach()


def train_one_epoch(state: TrainState, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Run one epoch of optimiser steps; returns the mean loss, speed and uncertainty statistics."""
    config = state.config
    epoch = state.epoch
    backbone_frozen = epoch < config.schedule.warmup_epochs
    state.model.set_backbone_trainable(not backbone_frozen)
    state.model.train()
    state.loss.train()
    rng = np.random.default_rng([config.run.seed, epoch])

    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(config.run.seed + epoch)

    steps = len(loader)
    if config.schedule.max_steps_per_epoch is not None:
        steps = min(steps, config.schedule.max_steps_per_epoch)
    losses: list[float] = []
    uncertainty_scalars: list[np.ndarray] = []
    images_seen = 0
    progress = tqdm(
        total=steps, desc=f"epoch {epoch + 1}/{config.schedule.epochs}" + (" (warm-up)" if backbone_frozen else ""),
        disable=not (config.run.progress and state.is_main), leave=False, dynamic_ncols=True,
    )
    start = time.perf_counter()
    for index, (images, labels) in enumerate(loader):
        if index >= steps:
            break
        images = images.to(state.device, non_blocking=True)
        labels = labels.to(state.device, non_blocking=True)
        if state.distributed is None:
            loss, uncertainty = compute_loss(state, images, labels, rng, backbone_frozen=backbone_frozen)
        else:
            step = functools.partial(
                compute_loss, state, images, labels, rng,
                backbone_frozen=backbone_frozen, shards=state.distributed.shards,
            )
            loss, uncertainty = state.distributed.step(state.model, state.loss, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss.item()} at epoch {epoch + 1}, step {state.step}; "
                "lower optim.lr or check the data"
            )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip > 0:
            parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, config.optim.grad_clip)
        state.optimizer.step()
        state.step += 1

        losses.append(loss.item())
        uncertainty_scalars.append((uncertainty * uncertainty).sum(dim=1).cpu().numpy())
        images_seen += uncertainty.shape[0]  # the global batch
        elapsed = time.perf_counter() - start
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{images_seen / elapsed:.1f}")
    progress.close()
    elapsed = time.perf_counter() - start
    scalars = np.concatenate(uncertainty_scalars) if uncertainty_scalars else np.zeros(0)
    return {
        "loss": float(np.mean(losses)) if losses else math.nan,
        "steps": len(losses),
        "images": images_seen,
        "seconds": round(elapsed, 2),
        "images_per_second": round(images_seen / elapsed, 2) if elapsed > 0 else math.nan,
        "uncertainty_mean": float(scalars.mean()) if scalars.size else math.nan,
        "uncertainty_std": float(scalars.std()) if scalars.size else math.nan,
        "backbone_frozen": backbone_frozen,
    }


def _resume(state: TrainState, checkpoint: dict[str, Any]) -> None:
    state.model.load_state_dict(checkpoint["model"])
    state.loss.load_state_dict(checkpoint["proxies"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    state.epoch = checkpoint["epoch"]
    state.step = checkpoint["step"]
    state.best = checkpoint["best"] or None
    restore_rng(checkpoint)


def _save(state: TrainState, path: Path, metrics: dict[str, Any]) -> None:
    save_checkpoint(
        path, model=state.model, proxies=state.loss, optimizer=state.optimizer,
        scheduler=state.scheduler, epoch=state.epoch, config=state.config.to_dict(),
        metrics=metrics, best=state.best or {}, step=state.step,
    )


def resume_config(checkpoint_path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """Return the config stored in a checkpoint, with `{"section": {"key": value}}` overrides applied."""
    record = load_checkpoint(checkpoint_path)["config"]
    for section, values in (overrides or {}).items():
        record.setdefault(section, {}).update(values)
    return config_from_dict(record)


def train(config: TrainConfig, *, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns {"epoch", "step", "best", "run_dir", "last_metrics"}.

    Under torchrun with several processes, every rank trains on its slice of
    each global batch of `data.batch_size` images (see `training.distributed`)
    and returns the same result. Only rank 0 writes the run's files.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
        ValueError: data.batch_size is not a multiple of the number of processes.
    """
    with distributed.process_group(config.run.device) as context:
        return _train(config, resume_from, context)


def _train(
    config: TrainConfig, resume_from: str | Path | None, context: distributed.DistributedContext | None
) -> dict[str, Any]:
    run_dir = Path(config.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.run.seed)
    distributed.fork_rng_for_rank(context)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)

    splits: DatasetSplits = load_splits(config.data)
    train_samples = subset_samples(splits.train, config.data.max_train_images, config.run.seed)
    val_samples = subset_samples(splits.val, config.data.max_eval_images, config.run.seed)
    dataset = ImageDataset(train_samples, TrainTransform(config.data.image_size))
    if context is None:
        loader = make_loader(
            dataset, config.data.batch_size, shuffle=True, workers=config.data.num_workers,
            seed=config.run.seed, m_per_class=config.data.m_per_class,
        )
    else:
        loader = distributed.make_sharded_loader(
            dataset, config.data.batch_size, context=context, workers=config.data.num_workers,
            seed=config.run.seed, m_per_class=config.data.m_per_class,
        )
    if len(loader) == 0:
        raise ValueError(
            f"{len(train_samples)} training images make no full batch of data.batch_size="
            f"{config.data.batch_size}; lower data.batch_size"
        )

    state = build_state(config, splits.num_train_classes)
    if context is not None:
        state.distributed = distributed.DistributedTraining(
            context, find_unused_parameters=not distributed.uses_every_parameter(config.loss.name)
        )
    if resume_from is not None:
        _resume(state, load_checkpoint(resume_from))
        distributed.fork_rng_for_rank(context)
        logger.info("resumed %s at epoch %d, step %d", resume_from, state.epoch, state.step)
    if state.is_main:
        save_config(config, run_dir / "config.yaml")
    logger.info(
        "training %s on %d images of %d classes, validating on %d images; %d steps per epoch%s",
        config.loss.name, len(train_samples), splits.num_train_classes, len(val_samples), len(loader),
        "" if context is None else f" over {context.world_size} processes",
    )

    last_metrics: dict[str, Any] = {}
    while state.epoch < config.schedule.epochs:
        train_metrics = train_one_epoch(state, loader)
        state.scheduler.step()
        state.epoch += 1
        record: dict[str, Any] = {
            "epoch": state.epoch, "step": state.step, "lr": state.optimizer.param_groups[0]["lr"],
            "train": train_metrics,
        }
        if state.epoch % config.run.eval_every == 0 or state.epoch == config.schedule.epochs:
            # Rank 0 validates alone; the broadcast keeps `best` equal on every rank.
            validation = None
            if state.is_main:
                validation = evaluate_samples(
                    state.model, val_samples, config.data, device=state.device,
                    channels_last=config.run.channels_last, seed=config.run.seed,
                )
            record["val"] = distributed.broadcast_from_main(context, validation)
            score = record["val"][BEST_METRIC]
            previous = math.nan if state.best is None else state.best["value"]
            if state.best is None or math.isnan(previous) or score > previous:
                state.best = {"epoch": state.epoch, "metric": BEST_METRIC, "value": score}
                if state.is_main:
                    _save(state, run_dir / "best.pt", record)
        if state.is_main:
            _save(state, run_dir / "last.pt", record)
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        logger.info("epoch %d: %s", state.epoch, json.dumps(record))
        last_metrics = record
    return {"epoch": state.epoch, "step": state.step, "best": state.best, "run_dir": str(run_dir),
            "last_metrics": last_metrics}
