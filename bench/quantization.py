"""Compare float32, float16 and int8 bundles of one checkpoint: size, accuracy, CPU latency.

    .venv/bin/python bench/quantization.py --checkpoint runs/emoji-idml/best.pt \
        [--data-root data/emoji] [--out-dir bundles/quantization] [--threads 1] [--json quantization.json]

Each weights dtype goes through the whole `idml-train export` (scoring
choices and calibration are refitted on that graph's outputs), so the
numbers are what a server with that bundle would give:

    float32   the exported graph
    float16   weights stored as float16 and cast back to float32 at load; float32 compute
    int8      onnxruntime static quantisation (int8 weights per channel, uint8 activations
              with ranges measured on 128 training images)

Accuracy is measured on the test classes (R@1 and MAP@R with the bundle's own
metric settings; ECE of the returned results). Latency is the median over
`--repeats` runs of onnxruntime on random images, with `--threads` intra-op
threads, at batch 1 and batch 32 (per image). Only compare latencies measured
on the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index.embedder import Embedder
from training.bundle_eval import json_ready
from training.export import QUIET_LOGGERS, WEIGHTS_DTYPES, ExportOptions, export_checkpoint


def latency_ms(embedder: Embedder, batch_size: int, repeats: int) -> float:
    """Median milliseconds per image of `embedder.embed` on random uint8 images."""
    size = embedder.input_size
    images = np.random.default_rng(0).integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8)
    embedder.embed(images)  # warm-up: onnxruntime allocates on the first run
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.embed(images)
        times.append((time.perf_counter() - started) * 1000 / batch_size)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="idml-train checkpoint")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data set folder (default: data.root of the checkpoint's config)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="keep the bundles in OUT_DIR/<dtype> (default: a temporary folder, removed)")
    parser.add_argument("--dtypes", nargs="+", choices=WEIGHTS_DTYPES, default=list(WEIGHTS_DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency runs")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="idml-quantization-") as scratch:
        base = args.out_dir if args.out_dir is not None else Path(scratch)
        rows = []
        for dtype in args.dtypes:
            bundle = export_checkpoint(
                args.checkpoint, base / dtype, data_root=args.data_root, options=ExportOptions(weights_dtype=dtype)
            )
            evaluation = bundle.manifest.evaluation
            test = evaluation.get("test", {})
            embedder = Embedder(bundle, intra_op_threads=args.threads)
            rows.append({
                "weights_dtype": dtype,
                "file_mb": bundle.onnx_path.stat().st_size / 2**20,
                "min_cosine_vs_torch": evaluation["export_check"]["min_cosine"],
                "beta_form": bundle.manifest.metric.beta_form,
                "rerank": bundle.manifest.metric.rerank,
                "test_recall_at_1": test.get("served", {}).get("recall_at_1"),
                "test_map_at_r": test.get("served", {}).get("map_at_r"),
                "test_ece_returned": test.get("calibration", {}).get("ece_returned"),
                "latency_ms_batch1": latency_ms(embedder, 1, args.repeats),
                "latency_ms_batch32": latency_ms(embedder, 32, max(3, args.repeats // 4)),
            })

    print(f"checkpoint {args.checkpoint}, onnxruntime with {args.threads} intra-op thread(s); metrics in percent")
    header = (f"{'weights':<8} {'MB':>7} {'cos':>8} {'R@1':>6} {'MAP@R':>6} {'ECE@k':>6} "
              f"{'ms/img b1':>9} {'ms/img b32':>10} {'beta':>4} {'rerank':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['weights_dtype']:<8} {row['file_mb']:7.2f} {row['min_cosine_vs_torch']:8.5f} "
              f"{100 * (row['test_recall_at_1'] or float('nan')):6.2f} {100 * (row['test_map_at_r'] or float('nan')):6.2f} "
              f"{100 * (row['test_ece_returned'] or float('nan')):6.2f} {row['latency_ms_batch1']:9.2f} "
              f"{row['latency_ms_batch32']:10.2f} {row['beta_form']:>4} {str(row['rerank']):>6}")
    if args.json is not None:
        args.json.write_text(json.dumps(json_ready(rows), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
