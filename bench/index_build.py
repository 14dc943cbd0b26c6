"""Catalog build throughput against raw onnxruntime throughput of the same bundle.

    python bench/index_build.py [--bundle DIR] [--images 512] [--batch-size 32] [--image-size 320]

Both numbers come from one run on the same synthetic JPEGs and batch size:

    raw    Embedder.embed on already preprocessed uint8 batches (model only), the
           faster of onnxruntime's spinning and sleeping thread pools
    build  Catalog.add_images into a new catalog: decode, preprocess, embed,
           store originals, commit to SQLite and add to FAISS

Without --bundle it generates a test bundle: by default a random
convolutional network at 224 px whose cost dominates decoding (about a
third of EfficientNet-Lite0's time per image); with
`--proxy projection` the random projection of the tests, whose model costs
almost nothing, so the ratio then measures only the overhead of decoding and
storing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.bundle import load_bundle  # noqa: E402
from index.catalog import Catalog, ItemInput  # noqa: E402
from index.embedder import Embedder  # noqa: E402
from index.preprocess import preprocess_bytes  # noqa: E402


def synthetic_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs (size x size): smooth colour gradients plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    images = []
    for _ in range(count):
        colour = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        pixels = colour[0] * ramp[:, None, None] + colour[1] * ramp[None, :, None]
        pixels += rng.normal(0, 12, size=(size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: a generated test bundle)")
    parser.add_argument("--proxy", choices=("conv", "projection"), default="conv",
                        help="generated bundle without --bundle: 'conv' costs about 0.37 GFLOP per image like "
                        "EfficientNet-Lite0, 'projection' almost nothing (default conv)")
    parser.add_argument("--images", type=int, default=512, help="images to index (default 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model run (default 32)")
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic JPEGs in pixels (default 320)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0 = all cores)")
    parser.add_argument("--durability", choices=("full", "process"), default="full", help="catalog durability mode")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        if args.bundle:
            bundle = load_bundle(args.bundle)
        else:
            from tests.bundle_factory import make_bundle, make_conv_bundle

            factory = make_conv_bundle if args.proxy == "conv" else make_bundle
            bundle = factory(Path(work) / "bundle")
        images = synthetic_jpegs(args.images, args.image_size)
        # Raw gets the faster of onnxruntime's spinning and sleeping pools; the build uses the
        # sleeping one, as `idml-index` does.
        embedders = {spin: Embedder(bundle, intra_op_threads=args.threads, max_batch=args.batch_size, spin=spin)
                     for spin in (True, False)}

        started = time.perf_counter()
        pixels = np.stack([preprocess_bytes(image, bundle.preprocess) for image in images])
        decode_seconds = time.perf_counter() - started

        raw_by_mode = {}
        for spin, embedder in embedders.items():
            embedder.embed(pixels[: args.batch_size])  # warm-up
            started = time.perf_counter()
            for start in range(0, len(pixels), args.batch_size):
                embedder.embed(pixels[start : start + args.batch_size])
            raw_by_mode["spin" if spin else "no_spin"] = time.perf_counter() - started
        raw_seconds = min(raw_by_mode.values())
        embedder = embedders[False]

        items = [ItemInput(f"image-{i}", image) for i, image in enumerate(images)]
        with Catalog.open(Path(work) / "catalog", bundle, durability=args.durability) as catalog:
            started = time.perf_counter()
            outcomes = catalog.add_images(items, embedder, batch_size=args.batch_size)
            build_seconds = time.perf_counter() - started
        failed = sum(outcome.status == "error" for outcome in outcomes)

    result = {
        "bundle": str(args.bundle or f"generated {args.proxy} bundle"),
        "model_id": bundle.model_id,
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "durability": args.durability,
        "raw_images_per_s": round(args.images / raw_seconds, 1),
        "raw_images_per_s_by_thread_mode": {mode: round(args.images / seconds, 1) for mode, seconds in raw_by_mode.items()},
        "build_images_per_s": round(args.images / build_seconds, 1),
        "build_to_raw": round(raw_seconds / build_seconds, 3),
        "serial_decode_ms_per_image": round(1000 * decode_seconds / args.images, 3),
        "failed": failed,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
