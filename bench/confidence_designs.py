"""Compare designs of the top-candidate confidence model on the validation classes only.

    .venv/bin/python bench/confidence_designs.py --bundle models/default [--data-root data/emoji] \
        [--protocol auto|cross-source|balanced|leave-one-out] [--repeats 5] [--folds 5] [--json designs.json]

The rank-1 confidence comes from `Calibration.top`, a logistic regression on
each query's most similar candidate. This script measures whether another
design of that model ranks rank-1 results better, without the test classes. Validation queries search the other validation images plus the
training images as distractors, built as `idml-train export` builds them
(`fit_confidence`: 50 candidates, 5% of the queries also find themselves,
the other vendors' images only by default).
Each design is then scored by cross-validation grouped by class: fitted on
the top rows of the training folds, and measured by the AUROC of rank-1
correctness on the held-out classes' queries that did not find themselves.

The rule was fixed before the first run: a design replaces the shipped one
(all ten features, C = 1, vote temperature 0.02) only when its mean paired
AUROC gain over all folds exceeds two standard errors; among such designs the
largest gain wins. The boosted trees are a reference only. The rule is
lenient: the 25 fold gains reuse the same queries across repeats, and 20
designs are compared without a correction.

Designs:
  - the shipped features with other L2 strengths C;
  - the shipped features with all pairwise products (a quadratic logistic);
  - seven more features of the top candidate: the runner-up label's vote,
    the vote's entropy, distinct labels among the 10 nearest, the label's
    vote at T = 0.01 and 0.05, how many candidates carry its label, and the
    mean similarity of the 10 nearest minus the best;
  - those features with pairwise products;
  - other vote temperatures T for `label_vote`;
  - gradient-boosted trees on the extended features (a flexible reference
    that the server has no evaluator for).

`--protocol leave-one-out` builds the lists with only the query removed.
There the label-count features learn that a label with all its images
present cannot be the query's, and their gains measure that artefact, not a
better model. `--protocol balanced` takes one random image from every class.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from index.bundle import load_bundle
from index.scoring import CONFIDENCE_FEATURES, LABEL_VOTE_TEMPERATURE, top_candidate_mask
from training.bundle_eval import (
    PROTOCOLS,
    calibration_candidates,
    embed_samples,
    load_bundle_splits,
    onnx_encoder,
    resolve_protocol,
)
from training.calibrate import auroc
from training.export import ExportOptions, embed_distractors

SHIPPED = "shipped: 10 features, C=1"
REFERENCE = "boosted trees, 17 features (reference)"  # shown, never chosen: the server cannot evaluate it
# Fit(train rows, held-out rows) -> probabilities of the held-out rows.
Design = Callable[[np.ndarray, np.ndarray], np.ndarray]


def vote_statistics(similarity: np.ndarray, labels: np.ndarray, top: np.ndarray, temperature: float):
    """Compute per query the top candidate's label share, the best other label's share and the vote entropy."""
    weight = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
    share, runner_up, entropy = (np.empty(len(top)) for _ in range(3))
    for query in range(len(top)):
        codes = np.unique(labels[query], return_inverse=True)[1].reshape(-1)
        per_label = np.bincount(codes, weights=weight[query]) / weight[query].sum()
        own = codes[top[query]]
        share[query] = per_label[own]
        others = np.delete(per_label, own)
        runner_up[query] = others.max() if others.size else 0.0
        positive = per_label[per_label > 0]
        entropy[query] = -(positive * np.log(positive)).sum()
    return share, runner_up, entropy


def extra_features(similarity: np.ndarray, labels: np.ndarray, top: np.ndarray) -> dict[str, np.ndarray]:
    """Compute the seven candidate features beyond the shipped ten, for each query's top candidate."""
    rows = np.arange(len(top))
    order = np.argsort(-similarity, axis=1, kind="stable")
    _, runner_up, entropy = vote_statistics(similarity, labels, top, LABEL_VOTE_TEMPERATURE)
    nearest_labels = np.take_along_axis(labels, order[:, :10], axis=1)
    return {
        "vote_runner_up": runner_up,
        "vote_entropy": entropy,
        "labels_in_10": np.array([len(np.unique(row)) for row in nearest_labels], np.float64),
        "label_vote_t0.01": vote_statistics(similarity, labels, top, 0.01)[0],
        "label_vote_t0.05": vote_statistics(similarity, labels, top, 0.05)[0],
        "label_count": (labels == labels[rows, top][:, None]).sum(axis=1).astype(np.float64),
        "mean10_gap": np.take_along_axis(similarity, order[:, :10], axis=1).mean(axis=1) - similarity.max(axis=1),
    }


def _standardise(train: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    return (train - mean) / std, (held_out - mean) / std


def _pairwise(x: np.ndarray) -> np.ndarray:
    pairs = itertools.combinations_with_replacement(range(x.shape[1]), 2)
    return np.hstack([x] + [x[:, [i]] * x[:, [j]] for i, j in pairs])


def logistic(features: np.ndarray, label: np.ndarray, c: float, interactions: bool = False) -> Design:
    def fit(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        a, b = _standardise(features[train], features[held_out])
        if interactions:
            a, b = _standardise(_pairwise(a), _pairwise(b))
        model = LogisticRegression(C=c, max_iter=5000).fit(a, label[train])
        return model.predict_proba(b)[:, 1]

    return fit


def boosted_trees(features: np.ndarray, label: np.ndarray) -> Design:
    def fit(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        model = HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=200, random_state=0)
        return model.fit(features[train], label[train]).predict_proba(features[held_out])[:, 1]

    return fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--data-root", type=Path, default=None, help="data set folder (default: the bundle's)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                        help="candidate lists (default: cross-source where the data set records sources)")
    parser.add_argument("--repeats", type=int, default=5, help="cross-validation repeats, each a new class split")
    parser.add_argument("--folds", type=int, default=5, help="folds per repeat, grouped by class")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    bundle = load_bundle(args.bundle)
    splits = load_bundle_splits(bundle.manifest.dataset, args.data_root)
    encoder = onnx_encoder(bundle.onnx_path)
    options = ExportOptions()
    val = embed_samples(splits.val, bundle.preprocess, encoder, kind=splits.kind)
    distractors = embed_distractors(splits, bundle.preprocess, encoder, options)
    lists = calibration_candidates(
        val, distractors, bundle.metric, rerank=bundle.manifest.metric.rerank, candidates=options.candidates,
        duplicates=options.calibration_duplicates, seed=options.seed, protocol=args.protocol,
    )
    queries = len(val.labels)
    rows = np.arange(queries)
    top = top_candidate_mask(lists.similarity).argmax(axis=1)
    shipped = lists.features[rows, top]
    label = lists.relevant[rows, top]
    found_itself = lists.index[:, 0] == rows
    candidate_labels = np.concatenate([val.labels, distractors.labels])[lists.index]
    similarity = lists.similarity.astype(np.float64)
    extended = np.column_stack([shipped, *extra_features(similarity, candidate_labels, top).values()])

    designs: dict[str, Design] = {SHIPPED: logistic(shipped, label, 1.0)}
    for c in (0.1, 0.3, 3.0, 10.0):
        designs[f"shipped features, C={c:g}"] = logistic(shipped, label, c)
    for c in (0.03, 0.1, 0.3, 1.0):
        designs[f"shipped + pairwise products, C={c:g}"] = logistic(shipped, label, c, interactions=True)
    for c in (0.1, 0.3, 1.0, 3.0):
        designs[f"17 features, C={c:g}"] = logistic(extended, label, c)
    for c in (0.01, 0.03, 0.1):
        designs[f"17 features + pairwise products, C={c:g}"] = logistic(extended, label, c, interactions=True)
    vote_column = CONFIDENCE_FEATURES.index("label_vote")
    for temperature in (0.005, 0.01, 0.03, 0.05):
        features = shipped.copy()
        features[:, vote_column] = vote_statistics(similarity, candidate_labels, top, temperature)[0]
        designs[f"label_vote at T={temperature:g}, C=1"] = logistic(features, label, 1.0)
    designs[REFERENCE] = boosted_trees(extended, label)

    classes = np.unique(val.labels)
    fold_auroc: dict[str, list[float]] = {name: [] for name in designs}
    pooled_auroc: dict[str, list[float]] = {name: [] for name in designs}
    for repeat in range(args.repeats):
        shuffled = np.random.default_rng(100 + repeat).permutation(classes)
        fold_of_class = dict(zip(shuffled.tolist(), np.arange(len(shuffled)) % args.folds))
        fold = np.array([fold_of_class[c] for c in val.labels.tolist()])
        predictions = {name: np.empty(queries) for name in designs}
        for held_fold in range(args.folds):
            train, held_out = np.flatnonzero(fold != held_fold), fold == held_fold
            scored = held_out & ~found_itself
            for name, design in designs.items():
                predictions[name][held_out] = design(train, np.flatnonzero(held_out))
                fold_auroc[name].append(auroc(predictions[name][scored], label[scored]))
        for name in designs:
            pooled_auroc[name].append(auroc(predictions[name][~found_itself], label[~found_itself]))

    baseline = np.array(fold_auroc[SHIPPED])
    table = []
    for name in designs:
        gain = np.array(fold_auroc[name]) - baseline
        error = float(gain.std(ddof=1) / np.sqrt(gain.size)) if name != SHIPPED else 0.0
        table.append({
            "design": name,
            "auroc": float(np.mean(pooled_auroc[name])),
            "gain": float(gain.mean()),
            "standard_error": error,
            "beats_shipped": bool(name != SHIPPED and gain.mean() > 2 * error),
        })
    protocol = resolve_protocol(args.protocol, val)
    print(f"{protocol} lists; {queries} validation queries ({int(found_itself.sum())} find themselves, "
          f"left out of the AUROC), rank-1 accuracy {label[~found_itself].mean():.3f}; "
          f"{args.repeats} x {args.folds}-fold cross-validation grouped by class")
    print(f"{'design':<42} {'AUROC':>7} {'gain':>8} {'s.e.':>7}")
    for row in table:
        mark = "  beats the shipped design" if row["beats_shipped"] else ""
        print(f"{row['design']:<42} {row['auroc']:7.4f} {row['gain']:+8.4f} {row['standard_error']:7.4f}{mark}")
    winners = [row for row in table if row["beats_shipped"] and row["design"] != REFERENCE]
    best = max(winners, key=lambda row: row["gain"])["design"] if winners else SHIPPED
    print(f"choice: {best}")
    if args.json is not None:
        args.json.write_text(json.dumps({"protocol": protocol, "table": table, "choice": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
