"""Settle the serving questions on the validation classes: which beta form, and rerank or not.

    .venv/bin/python bench/scoring_questions.py --bundle bundles/emoji [--data-root data/emoji]
    .venv/bin/python bench/scoring_questions.py --checkpoint runs/emoji-idml/best.pt [--data-root data/emoji]

Every validation image queries the other validation images (all vendors).
For each pair uncertainty form ("sum": ||u1||^2 + ||u2||^2, "diff":
||u1 - u2||^2) and with and without reranking the top candidates by the
introspective distance, the table lists R@1, MAP@R and R-precision, and the
calibration of a logistic confidence fitted on 70% of the queries and measured
on the other 30% (ECE over the returned results, ECE and AUROC of rank 1, log
loss over all candidates). The last lines give the choice `idml-train export`
makes with `--beta-form auto --rerank auto`. The test classes are never used.

With --bundle the images go through the bundle's ONNX graph; with
--checkpoint through the torch model, with the same preprocessing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from index.bundle import load_bundle
from index.preprocess import PreprocessSpec
from training.bundle_eval import (
    DEFAULT_CANDIDATES,
    DEFAULT_RETURNED,
    choose_scoring,
    embed_samples,
    format_scoring_table,
    json_ready,
    load_bundle_splits,
    measure_scoring,
    onnx_encoder,
)


def encoder_and_settings(args: argparse.Namespace):
    """(encoder, preprocess spec, metric shift, metric scale, splits) for --bundle or --checkpoint."""
    if args.bundle is not None:
        bundle = load_bundle(args.bundle)
        manifest = bundle.manifest
        splits = load_bundle_splits(manifest.dataset, args.data_root)
        return onnx_encoder(bundle.onnx_path), bundle.preprocess, manifest.metric.shift, manifest.metric.scale, splits

    from training.checkpoint import load_model_from_checkpoint
    from training.export import torch_outputs

    model, config = load_model_from_checkpoint(args.checkpoint)
    data = config["data"]
    size = int(data["image_size"])
    resize = int(data["resize"]) if data.get("resize") is not None else round(size * 8 / 7)
    dataset = {
        "name": data["dataset"],
        "root": data["root"],
        "val_fraction": data.get("val_fraction", 0.2),
        "split_seed": data.get("split_seed", 0),
    }
    splits = load_bundle_splits(dataset, args.data_root)
    loss = config["loss"]
    return (
        lambda images: torch_outputs(model, images),
        PreprocessSpec(size=size, resize=resize),
        float(loss["metric_shift"]),
        float(loss["metric_scale"]),
        splits,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="model bundle folder")
    source.add_argument("--checkpoint", type=Path, help="idml-train checkpoint")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data set folder (default: the one recorded in the bundle or checkpoint)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="candidates per query")
    parser.add_argument("--returned", type=int, default=DEFAULT_RETURNED, help="results per query for the ECE")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    encoder, spec, shift, scale, splits = encoder_and_settings(args)
    val = embed_samples(splits.val, spec, encoder, kind=splits.kind)
    rows = measure_scoring(val, shift=shift, scale=scale, candidates=args.candidates, returned=args.returned)
    choice = choose_scoring(rows)

    classes = len(set(val.labels.tolist()))
    print(f"validation classes: {classes}, images: {len(val.labels)}, candidates per query: {rows[0]['candidates']}, "
          f"metric shift {shift}, scale {scale}")
    print("metrics in percent; calibration columns are measured on 30% held-out validation queries")
    print(format_scoring_table(rows))
    for form, gain in choice.measurements["rerank_gain_map_at_r"].items():
        print(f"MAP@R gain of reranking with {form}: {100 * gain['mean']:+.2f} points "
              f"(standard error {100 * gain['standard_error']:.2f})")
    print(f"choice: beta_form={choice.beta_form} ({choice.measurements['beta_form_reason']})")
    print(f"choice: rerank={'on' if choice.rerank else 'off'} ({choice.measurements['rerank_reason']})")
    if args.json is not None:
        args.json.write_text(json.dumps(json_ready(choice.measurements), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
