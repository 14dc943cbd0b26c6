"""Calibration of a bundle's confidence on the test classes, with a reliability diagram.

    .venv/bin/python bench/calibration.py --bundle bundles/emoji [--data-root data/emoji] \
        [--plot docs/img/reliability.png] [--json calibration.json]

Every test image queries the other test images through the bundle's graph,
with the bundle's metric, reranking and calibration, as the server would
(50 candidates, 10 returned results by default). The script prints the
expected calibration error (15 equal-width bins) over all returned results
and over rank 1 only. It prints the AUROC of the confidence for "the rank-1
result is correct" next to the AUROC of the raw cosine similarity, and the
rank-1 accuracy of queries with and without the ambiguity flag, and the
confidence of an exact copy: each test image searched again with its own
image in the catalog. The goals are ECE <= 0.05 and AUROC >= 0.85.

The goals are set on cross-source lists where the data set records image
sources (balanced lists otherwise). For the emoji data each query searches
the other vendors' images only (`training.metrics.cross_source_neighbors`),
as a query from outside the catalog's sources does. `--protocol balanced`
takes one random image from every class instead, and `--protocol
leave-one-out` takes only the query away. Under leave-one-out a label with
all its images among the candidates cannot be the query's, and the right
class alone lacks an image in the query's style, which a real catalog
never shows. The exact copies search the complete test catalog. The script
also prints 95% intervals over resampled query classes and, with sources,
the AUROC per query source.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from index.bundle import load_bundle
from training.bundle_eval import (
    DEFAULT_CANDIDATES,
    DEFAULT_RETURNED,
    PROTOCOLS,
    calibration_candidates,
    calibration_metrics,
    confidence_of,
    embed_samples,
    json_ready,
    load_bundle_splits,
    onnx_encoder,
    resolve_protocol,
    retrieval_metrics,
    score_candidates,
)
from training.calibrate import ECE_BINS, auroc, expected_calibration_error, reliability_curve
from training.metrics import nearest_neighbors

ECE_GOAL = 0.05
AUROC_GOAL = 0.85


def class_bootstrap(confidence: np.ndarray, correct: np.ndarray, labels: np.ndarray, resamples: int) -> dict:
    """Return 95% intervals of the rank-1 AUROC and ECE over seeded resamples of the query classes.

    Queries of one class share their candidates, so the classes, not the queries, are resampled.
    """
    classes, code = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(code == c) for c in range(classes.size)]
    rng = np.random.default_rng(0)
    aurocs, eces = [], []
    for _ in range(resamples):
        rows = np.concatenate([members[c] for c in rng.integers(0, classes.size, classes.size)])
        aurocs.append(auroc(confidence[rows], correct[rows]))
        eces.append(expected_calibration_error(confidence[rows], correct[rows]))
    return {
        "resamples": resamples,
        "auroc_rank1": [float(v) for v in np.nanpercentile(aurocs, [2.5, 97.5])],
        "ece_rank1": [float(v) for v in np.percentile(eces, [2.5, 97.5])],
    }


def plot_reliability(confidence: np.ndarray, relevant: np.ndarray, path: Path, title: str) -> None:
    """Save a reliability diagram (returned results and rank 1) with a histogram of confidences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for values, labels, name, marker in (
        (confidence, relevant, "returned results", "o"),
        (confidence[:, 0], relevant[:, 0], "rank 1", "s"),
    ):
        curve = reliability_curve(values, labels)
        filled = curve.count > 0
        top.plot(curve.mean_probability[filled], curve.positive_rate[filled], marker=marker, label=name)
    top.set_ylabel("fraction of correct results")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title, fontsize=10)
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)
    bottom.hist(confidence.ravel(), bins=ECE_BINS, range=(0, 1), color="tab:blue", alpha=0.7)
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("results")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _rounded(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data set folder (default: the one recorded in the bundle)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="candidates per query")
    parser.add_argument("--returned", type=int, default=DEFAULT_RETURNED, help="results returned per query")
    parser.add_argument("--plot", type=Path, default=None,
                        help="save the reliability diagram (PNG) here; docs/img/reliability.png is the committed one")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                        help="candidate lists the confidence is measured on (default: cross-source where the "
                             "data set records image sources, else balanced: the lists the goals are set on)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="class resamples for the 95%% intervals of the rank-1 AUROC and ECE (0 for none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    splits = load_bundle_splits(manifest.dataset, args.data_root)
    test = embed_samples(splits.test, bundle.preprocess, onnx_encoder(bundle.onnx_path), kind=splits.kind)
    k = min(args.candidates, len(test.labels) - 1)
    similarity, index = nearest_neighbors(test.embedding, k)
    plain = score_candidates(test, index, similarity, bundle.metric, rerank=manifest.metric.rerank,
                             feature_names=bundle.calibration.features)
    protocol = resolve_protocol(args.protocol, test)
    fitted_on = (manifest.evaluation or {}).get("calibration_fit", {}).get("protocol")
    lists = calibration_candidates(test, None, bundle.metric, rerank=manifest.metric.rerank, candidates=k,
                                   feature_names=bundle.calibration.features, protocol=protocol)

    report = {
        "bundle": str(args.bundle),
        "model_id": manifest.model_id,
        "test_images": int(len(test.labels)),
        "test_classes": int(len(set(test.labels.tolist()))),
        "candidates": int(lists.index.shape[1]),
        "protocol": protocol,
        "fitted_on": fitted_on,
        "metric": manifest.metric.model_dump(),
        "retrieval": retrieval_metrics(plain),
        "calibration": calibration_metrics(lists, bundle.calibration, returned=args.returned),
        "auroc_rank1_similarity": auroc(lists.similarity[:, 0], lists.relevant[:, 0]),
    }
    ambiguous = plain.query_uncertainty > manifest.ambiguity.threshold
    hit = plain.relevant[:, 0]
    report["ambiguity"] = {
        "threshold": manifest.ambiguity.threshold,
        "flagged_fraction": float(ambiguous.mean()),
        "rank1_accuracy_flagged": float(hit[ambiguous].mean()) if ambiguous.any() else None,
        "rank1_accuracy_unflagged": float(hit[~ambiguous].mean()) if (~ambiguous).any() else None,
    }

    # A copy searches the complete catalog: its class and every other keep all their images.
    copies = calibration_candidates(test, None, bundle.metric, rerank=manifest.metric.rerank, candidates=k,
                                    duplicates=1.0, feature_names=bundle.calibration.features,
                                    protocol="leave-one-out")
    copy_confidence = confidence_of(copies, bundle.calibration)[:, 0]
    report["exact_copy_confidence"] = {
        "median": float(np.median(copy_confidence)),
        "p10": float(np.percentile(copy_confidence, 10)),
        "min": float(copy_confidence.min()),
    }

    returned = report["calibration"]["returned"]
    confidence = confidence_of(lists, bundle.calibration)[:, :returned]
    rank1 = confidence[:, 0], lists.relevant[:, 0]
    if args.bootstrap > 0:
        report["bootstrap"] = class_bootstrap(*rank1, test.labels, args.bootstrap)
    if test.sources is not None:
        report["auroc_rank1_by_source"] = {
            str(source): auroc(rank1[0][test.sources == source], rank1[1][test.sources == source])
            for source in np.unique(test.sources)
        }
    title = (f"{manifest.dataset.get('name', '?')} test classes, model {manifest.model_id}\n"
             f"{manifest.calibration.kind} confidence, {protocol} lists")
    if args.plot is not None:
        plot_reliability(confidence, lists.relevant[:, :returned], args.plot, title)

    calibration = report["calibration"]
    print(f"bundle {args.bundle} (model_id {manifest.model_id}, beta_form {manifest.metric.beta_form}, "
          f"rerank {manifest.metric.rerank}, calibration {manifest.calibration.kind})")
    print(f"test: {report['test_classes']} classes, {report['test_images']} images, {report['candidates']} "
          f"candidates per query, {returned} returned, confidence on {protocol} lists")
    if fitted_on is not None and fitted_on != protocol:
        print(f"note: the confidence was fitted on {fitted_on} lists, so these figures measure it elsewhere")
    print(f"R@1 {100 * report['retrieval']['recall_at_1']:.2f}  MAP@R {100 * report['retrieval']['map_at_r']:.2f}")
    for name, value, goal, better in (
        ("ECE, returned results", calibration["ece_returned"], ECE_GOAL, "<="),
        ("ECE, rank 1", calibration["ece_rank1"], ECE_GOAL, "<="),
        ("AUROC of confidence, rank 1 correct", calibration["auroc_rank1"], AUROC_GOAL, ">="),
    ):
        met = value <= goal if better == "<=" else value >= goal
        print(f"{name:<38} {value:.4f}   goal {better} {goal}: {'met' if met else 'NOT met'}")
    if "bootstrap" in report:
        interval = report["bootstrap"]
        print(f"95% interval over {args.bootstrap} class resamples: AUROC {interval['auroc_rank1'][0]:.4f} to "
              f"{interval['auroc_rank1'][1]:.4f}, rank-1 ECE {interval['ece_rank1'][0]:.4f} to "
              f"{interval['ece_rank1'][1]:.4f}")
    if "auroc_rank1_by_source" in report:
        print("AUROC of confidence, rank 1, by query source: " + ", ".join(
            f"{source} {value:.3f}" for source, value in report["auroc_rank1_by_source"].items()))
    print(f"{'AUROC of raw similarity, rank 1':<38} {report['auroc_rank1_similarity']:.4f}")
    print(f"mean confidence / accuracy, returned: {calibration['mean_confidence_returned']:.4f} / "
          f"{calibration['accuracy_returned']:.4f}; rank 1: {calibration['mean_confidence_rank1']:.4f} / "
          f"{calibration['accuracy_rank1']:.4f}")
    flag = report["ambiguity"]
    print(f"ambiguous queries: {100 * flag['flagged_fraction']:.1f}% flagged; rank-1 accuracy "
          f"{_rounded(flag['rank1_accuracy_flagged'])} flagged vs {_rounded(flag['rank1_accuracy_unflagged'])} "
          "not flagged")
    copy = report["exact_copy_confidence"]
    print(f"confidence of an exact copy of the query: median {copy['median']:.3f}, 10th percentile "
          f"{copy['p10']:.3f}, min {copy['min']:.3f}")
    if args.plot is not None:
        print(f"reliability diagram: {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps(json_ready(report), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
