"""Embed a split with the evaluation preprocessing and compute its retrieval metrics.

Images go through `training.data`'s EvalTransform, which is
`index.preprocess.preprocess_image`, the path the indexer and the server use.

CLI: `idml-train evaluate CHECKPOINT --split val|test --out metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.preprocess import PreprocessSpec
from training.config import DataConfig, TrainConfig, config_from_dict
from training.data.layouts import load_dataset
from training.data.loader import ImageDataset, make_loader
from training.data.splits import DatasetSplits, Sample
from training.data.transforms import EvalTransform
from training.metrics import evaluate_embeddings
from training.model import IDMLModel

logger = logging.getLogger(__name__)

SPLITS = ("val", "test")


def eval_spec(data: DataConfig) -> PreprocessSpec:
    """Return the evaluation (and serving) preprocessing of a data config."""
    return PreprocessSpec(size=data.image_size, resize=data.resolved_resize)


def subset_samples(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """Draw a seeded random subset of at most `limit` samples, kept in their original order.

    Returns every sample when `limit` is None or not smaller than the count.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return [samples[index] for index in keep]


def load_splits(data: DataConfig) -> DatasetSplits:
    return load_dataset(data.dataset, data.root, val_fraction=data.val_fraction, seed=data.split_seed)


@torch.no_grad()
def embed_samples(
    model: IDMLModel,
    samples: list[Sample],
    data: DataConfig,
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    workers: int | None = None,
    probes: dict[str, list[np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed `samples` with the evaluation preprocessing.

    When `probes` is a dict, it also collects ||u||^2 of ambiguous versions of
    each image under the keys of AMBIGUITY_PROBES (see `ambiguous_versions`).

    Returns:
        embeddings float32 (n, embedding_dim), uncertainty float32 (n, uncertainty_dim),
        labels int64 (n,), in the order of `samples`.
    """
    dataset = ImageDataset(samples, EvalTransform(eval_spec(data)))
    loader = make_loader(
        dataset, data.eval_batch_size, shuffle=False,
        workers=data.num_workers if workers is None else workers,
    )
    was_training = model.training
    model.eval()
    embeddings, uncertainties, labels = [], [], []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, batch_labels in loader:
        x = model.normalize(images.to(device)).contiguous(memory_format=memory_format)
        embedding, uncertainty = model(x)
        if probes is not None:
            for name, version in ambiguous_versions(x).items():
                _, probe_uncertainty = model(version.contiguous(memory_format=memory_format))
                probes.setdefault(name, []).append((probe_uncertainty.float() ** 2).sum(dim=1).cpu().numpy())
        embeddings.append(embedding.float().cpu().numpy())
        uncertainties.append(uncertainty.float().cpu().numpy())
        labels.append(batch_labels.numpy())
    model.train(was_training)
    return np.concatenate(embeddings), np.concatenate(uncertainties), np.concatenate(labels)


AMBIGUITY_PROBES = ("mixed", "low_resolution")


def ambiguous_versions(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ambiguous versions of a normalised batch (n, 3, S, S), each the same shape.

    mixed: the average of each image and the next one in the batch (a batch of
    one is mixed with its mirror image). low_resolution: downscaled 4x
    (area) and upscaled back (bilinear).
    """
    other = x.roll(1, dims=0) if x.shape[0] > 1 else x.flip(3)
    size = x.shape[-1]
    small = torch.nn.functional.interpolate(x, size=max(size // 4, 1), mode="area")
    low = torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return {"mixed": 0.5 * (x + other), "low_resolution": low}


def evaluate_samples(
    model: IDMLModel,
    samples: list[Sample],
    data: DataConfig,
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    seed: int = 0,
    compute_nmi: bool = True,
    probe_ambiguity: bool = True,
) -> dict[str, Any]:
    """Embed `samples` and compute `training.metrics.evaluate_embeddings` on them.

    The result also has "num_images", "num_classes" and "seconds". With
    `probe_ambiguity` (one more forward pass per probe) it has, for each probe
    of AMBIGUITY_PROBES, "uncertainty_mean_<probe>" (mean ||u||^2 of the
    ambiguous versions) and "uncertainty_raised_<probe>" (fraction of images
    whose ambiguous version has a larger ||u||^2 than the image itself).
    """
    if len(samples) < 2:
        raise ValueError(f"evaluation needs at least 2 images, got {len(samples)}")
    start = time.perf_counter()
    probes: dict[str, list[np.ndarray]] | None = {} if probe_ambiguity else None
    embeddings, uncertainty, labels = embed_samples(
        model, samples, data, device=device, channels_last=channels_last, probes=probes
    )
    metrics: dict[str, Any] = evaluate_embeddings(
        embeddings, labels, uncertainty, compute_nmi=compute_nmi, seed=seed
    )
    clean = np.einsum("nd,nd->n", uncertainty, uncertainty)
    for name, parts in (probes or {}).items():
        ambiguous = np.concatenate(parts)
        metrics[f"uncertainty_mean_{name}"] = float(ambiguous.mean())
        metrics[f"uncertainty_raised_{name}"] = float((ambiguous > clean).mean())
    metrics["num_images"] = int(len(labels))
    metrics["num_classes"] = int(len(np.unique(labels)))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def split_samples(splits: DatasetSplits, split: str) -> list[Sample]:
    """Samples of "val" or "test".

    NOTE: for In-Shop, "test" is query plus gallery and is evaluated all against
    all, not with the official query-to-gallery protocol.
    """
    if split == "val":
        return splits.val
    if split == "test":
        return splits.test
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="idml-train evaluate", description="Evaluate a checkpoint on the validation or test split."
    )
    parser.add_argument("checkpoint", help="checkpoint file (best.pt or last.pt of a run)")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="split to evaluate; choose checkpoints on val, report test once")
    parser.add_argument("--out", help="write the metrics to this JSON file")
    parser.add_argument("--data-root", help="override data.root of the checkpoint's config")
    parser.add_argument("--max-images", type=int, help="evaluate a seeded subset of this many images")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from training.checkpoint import load_model_from_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    model, config_record = load_model_from_checkpoint(args.checkpoint)
    config: TrainConfig = config_from_dict(config_record)
    if args.data_root:
        config.data.root = args.data_root
    model.to(args.device)
    if config.run.channels_last:
        model.to(memory_format=torch.channels_last)
    splits = load_splits(config.data)
    samples = subset_samples(split_samples(splits, args.split), args.max_images, config.run.seed)
    metrics = evaluate_samples(
        model, samples, config.data, device=args.device, channels_last=config.run.channels_last,
        seed=config.run.seed,
    )
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "dataset": config.data.dataset,
              "metrics": metrics}
    logger.info("%s %s: %s", args.checkpoint, args.split, json.dumps(metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    return 0
