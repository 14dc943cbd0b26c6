"""Training throughput beside raw forward + backward throughput of the same step.

    .venv/bin/python bench/train_throughput.py --config configs/emoji.yaml --steps 5 \
        [--set data.image_size=96 ...]

"raw" repeats the full training step (normalise, mixup, forward, loss,
backward, clipping, AdamW) on one batch already in memory. "loop" runs the
training loop over the data loader, with decoding, augmentation and workers.
The ratio loop / raw shows how much the input pipeline costs. Both count the
images the loader yields (input mixup embeds twice as many).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch

from training.config import load_config
from training.data.loader import ImageDataset, make_loader
from training.data.transforms import TrainTransform
from training.evaluate import load_splits, subset_samples
from training.train import build_state, compute_loss, seed_everything, train_one_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/emoji.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after one warm-up step)")
    parser.add_argument("--warmup-phase", action="store_true",
                        help="measure the warm-up epochs (backbone frozen) instead of full training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    config = load_config(args.config, args.overrides + ["run.progress=false"])
    seed_everything(config.run.seed)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    splits = load_splits(config.data)
    samples = subset_samples(splits.train, config.data.batch_size * (args.steps + 1), config.run.seed)
    dataset = ImageDataset(samples, TrainTransform(config.data.image_size))
    state = build_state(config, splits.num_train_classes)
    frozen = args.warmup_phase
    state.epoch = 0 if frozen else config.schedule.warmup_epochs
    state.model.set_backbone_trainable(not frozen)
    state.model.train()

    # A worker-free loader for the raw batch, so no worker competes for the CPU while timing.
    images, labels = next(iter(make_loader(dataset, config.data.batch_size, shuffle=True, workers=0)))
    rng = np.random.default_rng(0)

    def raw_step() -> None:
        loss, _ = compute_loss(state, images, labels, rng, backbone_frozen=frozen)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for group in state.optimizer.param_groups for p in group["params"]], config.optim.grad_clip
        )
        state.optimizer.step()

    raw_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        raw_step()
    raw = images.shape[0] * args.steps / (time.perf_counter() - start)

    loader = make_loader(
        dataset, config.data.batch_size, shuffle=True, workers=config.data.num_workers, seed=config.run.seed
    )
    config.schedule.max_steps_per_epoch = args.steps
    train_one_epoch(state, loader)  # first pass starts the workers
    loop = train_one_epoch(state, loader)["images_per_second"]
    result = {
        "image_size": config.data.image_size, "batch_size": config.data.batch_size,
        "loss": config.loss.name, "mixup_space": config.loss.mixup_space if config.loss.uses_mixup else None,
        "backbone_frozen": frozen, "threads": torch.get_num_threads(), "workers": config.data.num_workers,
        "raw_images_per_second": round(raw, 1), "loop_images_per_second": loop,
        "loop_over_raw": round(loop / raw, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
