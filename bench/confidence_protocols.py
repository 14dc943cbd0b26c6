"""Fit the confidence on one kind of candidate list and measure it on another, on validation only.

    .venv/bin/python bench/confidence_protocols.py --bundle models/default [--data-root data/emoji] \
        [--repeats 5] [--folds 5] [--json protocols.json]

A confidence is fitted on the candidate lists of one protocol
(`training.bundle_eval.calibration_candidates`), or of two together. In
cross-source lists a query searches the other sources' images. In balanced
lists every class loses one random image, and in leave-one-out lists only
the query leaves.
Each fit is measured on every protocol's lists of held-out validation
classes (5 x 5-fold cross-validation grouped by class, no duplicates among
the measured queries). The table shows how far a confidence carries from
the situation it was fitted in to another. The data set must record image
sources (the emoji vendors). The test classes are never used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from index.bundle import load_bundle
from index.scoring import top_candidate_mask
from training.bundle_eval import (
    CandidateLists,
    calibration_candidates,
    embed_samples,
    load_bundle_splits,
    onnx_encoder,
)
from training.calibrate import auroc, expected_calibration_error, fit_calibration
from training.export import ExportOptions, embed_distractors

MEASURED = ("cross-source", "balanced", "leave-one-out")
FITS = {
    "cross-source": ("cross-source",),
    "balanced": ("balanced",),
    "leave-one-out": ("leave-one-out",),
    "cross-source + balanced": ("cross-source", "balanced"),
}


def rows_of(lists: CandidateLists, queries: np.ndarray):
    """Return the flat features, labels, query ids and top-candidate mask of some queries' lists."""
    features = lists.features[queries]
    count, k, width = features.shape
    top = top_candidate_mask(lists.similarity[queries]).reshape(-1)
    return features.reshape(-1, width), lists.relevant[queries].reshape(-1), np.repeat(np.arange(count), k), top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--data-root", type=Path, default=None, help="data set folder (default: the bundle's)")
    parser.add_argument("--repeats", type=int, default=5, help="cross-validation repeats, each a new class split")
    parser.add_argument("--folds", type=int, default=5, help="folds per repeat, grouped by class")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    bundle = load_bundle(args.bundle)
    splits = load_bundle_splits(bundle.manifest.dataset, args.data_root)
    encoder = onnx_encoder(bundle.onnx_path)
    options = ExportOptions()
    val = embed_samples(splits.val, bundle.preprocess, encoder, kind=splits.kind)
    if val.sources is None:
        raise SystemExit(f"data set {splits.kind!r} records no image sources, so it has no cross-source lists")
    distractors = embed_distractors(splits, bundle.preprocess, encoder, options)
    settings = dict(rerank=bundle.manifest.metric.rerank, candidates=options.candidates, seed=options.seed)
    fit_lists = {
        protocol: calibration_candidates(val, distractors, bundle.metric, duplicates=options.calibration_duplicates,
                                         protocol=protocol, **settings)
        for protocol in MEASURED
    }
    measured_lists = {
        protocol: calibration_candidates(val, distractors, bundle.metric, protocol=protocol, **settings)
        for protocol in MEASURED
    }

    queries = len(val.labels)
    classes = np.unique(val.labels)
    scores: dict[tuple[str, str], list[tuple[float, float]]] = {(f, m): [] for f in FITS for m in MEASURED}
    for repeat in range(args.repeats):
        shuffled = np.random.default_rng(100 + repeat).permutation(classes)
        fold_of_class = dict(zip(shuffled.tolist(), np.arange(len(shuffled)) % args.folds))
        fold = np.array([fold_of_class[c] for c in val.labels.tolist()])
        rank1 = {(f, m): np.zeros(queries) for f in FITS for m in MEASURED}
        for held_fold in range(args.folds):
            train, held_out = np.flatnonzero(fold != held_fold), np.flatnonzero(fold == held_fold)
            for fit_name, protocols in FITS.items():
                parts = [rows_of(fit_lists[protocol], train) for protocol in protocols]
                calibration = fit_calibration(
                    np.concatenate([part[0] for part in parts]),
                    np.concatenate([part[1] for part in parts]),
                    np.concatenate([part[2] + offset * len(train) for offset, part in enumerate(parts)]),
                    fit_lists["cross-source"].feature_names,
                    seed=options.seed,
                    top=np.concatenate([part[3] for part in parts]),
                ).calibration
                for protocol in MEASURED:
                    features, _, _, top = rows_of(measured_lists[protocol], held_out)
                    confidence = calibration.predict(features, top=top).reshape(len(held_out), -1)
                    rank1[(fit_name, protocol)][held_out] = confidence[:, 0]
        for (fit_name, protocol), confidence in rank1.items():
            correct = measured_lists[protocol].relevant[:, 0]
            scores[(fit_name, protocol)].append(
                (auroc(confidence, correct), expected_calibration_error(confidence, correct))
            )

    print(f"{queries} validation queries; {args.repeats} x {args.folds}-fold cross-validation grouped by class; "
          "AUROC of rank-1 confidence (rank-1 ECE)")
    print(f"{'fitted on':<26}" + "".join(f"{protocol:>22}" for protocol in MEASURED))
    table = []
    for fit_name in FITS:
        cells = []
        for protocol in MEASURED:
            mean_auroc, mean_ece = np.mean(scores[(fit_name, protocol)], axis=0)
            cells.append(f"{mean_auroc:.3f} ({mean_ece:.3f})")
            table.append({"fitted_on": fit_name, "measured_on": protocol, "auroc_rank1": float(mean_auroc),
                          "ece_rank1": float(mean_ece)})
        print(f"{fit_name:<26}" + "".join(f"{cell:>22}" for cell in cells))
    for protocol in MEASURED:
        print(f"rank-1 accuracy on {protocol} lists: {measured_lists[protocol].relevant[:, 0].mean():.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
