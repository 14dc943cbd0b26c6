"""Ablation on the emoji test classes: pretrained features, Proxy Anchor, +mixup, the authors' IDML, ours.

Every variant uses the same backbone, resolution, batch and split
(configs/emoji.yaml) and the same budget of 10 epochs (`BUDGET`). Only the
loss changes, plus the L2-normalised uncertainty head for the authors'
formulation. The best epoch is picked on the
validation classes; the test classes are only evaluated, once per variant.

    python bench/ablation.py [--config configs/emoji.yaml] [--out runs/ablation] [--retrain]

A run folder that already has `best.pt` and a finished `metrics.jsonl` is reused.
Prints a Markdown table and writes `results.json` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from training.config import load_config
from training.checkpoint import load_model_from_checkpoint
from training.evaluate import embed_samples, evaluate_samples, load_splits, split_samples
from training.metrics import evaluate_embeddings
from training.model import build_model
from training.train import train

logger = logging.getLogger("ablation")

# name -> config overrides; "pretrained" trains nothing.
VARIANTS: dict[str, list[str]] = {
    "proxy_anchor": ["loss.name=proxy_anchor"],
    "proxy_anchor_mixup": ["loss.name=proxy_anchor_mixup"],
    "idml_authors": ["loss.name=idml_authors", "model.uncertainty_mode=l2norm"],
    "idml": ["loss.name=idml", "loss.uncertainty_scope=all", "loss.uncertainty_penalty=0"],
    "idml_diff": ["loss.name=idml", "loss.beta_form=diff", "loss.uncertainty_scope=all", "loss.uncertainty_penalty=0"],
    "idml_positive": ["loss.name=idml", "loss.uncertainty_scope=positive", "loss.uncertainty_penalty=1.0"],
}
# The budget of every variant: the config's schedule with this many epochs.
BUDGET = ["schedule.epochs=10"]
LABELS = {
    "pretrained": "Pretrained features, no training",
    "proxy_anchor": "Proxy Anchor",
    "proxy_anchor_mixup": "Proxy Anchor + mixup",
    "idml_authors": "IDML, authors' formulation",
    "idml": "IDML, ours (learned uncertainty, beta = ||u1||^2 + ||u2||^2)",
    "idml_diff": "IDML, ours (learned uncertainty, beta = ||u1 - u2||^2)",
    "idml_positive": "IDML, ours (learned uncertainty on positive pairs only, penalty 1.0)",
}


def pretrained_metrics(config, samples) -> dict:
    """Metrics of the ImageNet backbone's pooled features (average + max), L2-normalised."""
    model = build_model(config.model, pretrained=True).eval()

    class PooledOnly(torch.nn.Module):
        def forward(self, x):
            pooled = model.pool(x)
            return torch.nn.functional.normalize(pooled, dim=1), pooled[:, :1] * 0

    wrapper = PooledOnly()
    wrapper.normalize = model.normalize  # type: ignore[attr-defined]
    wrapper.eval()
    embeddings, _, labels = embed_samples(wrapper, samples, config.data)  # type: ignore[arg-type]
    metrics = evaluate_embeddings(embeddings, labels, None, seed=config.run.seed)
    metrics["train_seconds"] = 0.0
    return metrics


def training_seconds(run_dir: Path) -> float:
    total = 0.0
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            total += float(record.get("train", {}).get("seconds", 0.0))
    return total


def finished(run_dir: Path, epochs: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not (run_dir / "best.pt").is_file() or not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("epoch") == epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emoji.yaml")
    parser.add_argument("--out", default="runs/ablation", help="folder for the runs and results.json")
    parser.add_argument("--retrain", action="store_true", help="train again even when a run exists")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    base = load_config(args.config)
    out = Path(args.out)
    splits = load_splits(base.data)
    test_samples = split_samples(splits, "test")
    names = args.only or ["pretrained", *VARIANTS]
    results: dict[str, dict] = {}
    results_path = out / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text(encoding="utf-8"))

    for name in names:
        if name == "pretrained":
            results[name] = pretrained_metrics(base, test_samples)
        else:
            overrides = [f"run.output_dir={out / name}", *BUDGET, *VARIANTS[name]]
            config = load_config(args.config, overrides=overrides)
            run_dir = out / name
            if args.retrain or not finished(run_dir, config.schedule.epochs):
                logger.info("training %s into %s", name, run_dir)
                train(config)
            model, _ = load_model_from_checkpoint(run_dir / "best.pt")
            metrics = evaluate_samples(model, test_samples, config.data, seed=config.run.seed)
            metrics["train_seconds"] = training_seconds(run_dir)
            results[name] = metrics
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        logger.info("%s: %s", name, {key: results[name].get(key) for key in ("recall_at_1", "map_at_r")})

    print(markdown_table(results))
    return 0


def markdown_table(results: dict[str, dict]) -> str:
    rows = [
        "| Method | R@1 | R@2 | R@4 | MAP@R | RP | NMI | u AUROC (rank-1 miss) | training time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["pretrained", *VARIANTS]:
        if name not in results:
            continue
        m = results[name]
        auroc = m.get("uncertainty_auroc")
        # Plain Proxy Anchor never trains the uncertainty head, so its AUROC means nothing.
        untrained_head = name in ("pretrained", "proxy_anchor", "proxy_anchor_mixup")
        auroc_text = "-" if auroc is None or untrained_head else f"{auroc:.3f}"
        minutes = m.get("train_seconds", 0.0) / 60.0
        rows.append(
            f"| {LABELS[name]} | {100 * m['recall_at_1']:.1f} | {100 * m['recall_at_2']:.1f} | "
            f"{100 * m['recall_at_4']:.1f} | {100 * m['map_at_r']:.1f} | {100 * m['r_precision']:.1f} | "
            f"{100 * m['nmi']:.1f} | {auroc_text} | {minutes:.1f} min |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
