"""Load test of POST /search beside the raw onnxruntime + FAISS cost of the same work.

    .venv/bin/python bench/load_search.py --bundle models/default --requests 10000 --clients 16

The script builds a synthetic catalog in a temporary folder, measures the raw
pipeline in-process (decode, preprocess, embed, FAISS search, rerank with the
same functions the server uses), then starts `idml-serve` as a uvicorn
process on 127.0.0.1 and drives it:

  single   one client, sequential requests: latency percentiles
  load     `--clients` concurrent clients, `--requests` requests in all,
           images of varied sizes and formats: latency, requests/s, and the
           server's resident memory (RSS, from /proc) sampled during the run

The goals printed at the end are three. Single-request p50 is within 1.3x of
the raw single-image latency. Concurrent throughput is at least 0.8x the raw
batched throughput (batch 16). RSS at the end is within 10% of RSS after the
first 10% of requests. The clients run on the same machine and take CPU from the
server, so on a small machine the throughput ratio understates the server.
Every phase is bounded by `--requests` and `--time-limit-s`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from index.bundle import load_bundle  # noqa: E402
from index.catalog import Catalog, ItemInput  # noqa: E402
from index.embedder import Embedder  # noqa: E402
from index.imaging import decode_image  # noqa: E402
from index.preprocess import preprocess_image  # noqa: E402
from service.pipeline import rank_candidates  # noqa: E402
from service.runtime import set_faiss_threads  # noqa: E402
from service.testing import ServerProcess  # noqa: E402

logger = logging.getLogger("bench.load_search")

# (width, height, format) of the query images, cycled through the requests.
QUERY_SHAPES = [(64, 64, "PNG"), (320, 240, "JPEG"), (640, 480, "JPEG"), (1024, 768, "JPEG"), (200, 300, "WEBP")]


def synthetic_image(seed: int, width: int, height: int, fmt: str) -> bytes:
    """Smooth random colour field, so JPEG sizes are realistic rather than noise-sized."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def percentiles(values_s: list[float]) -> dict:
    milliseconds = np.asarray(values_s) * 1000
    return {
        "count": len(values_s),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 3),
        "p95_ms": round(float(np.percentile(milliseconds, 95)), 3),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 3),
        "mean_ms": round(float(milliseconds.mean()), 3),
    }


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def build_catalog(folder: Path, bundle, size: int, threads: int) -> None:
    embedder = Embedder(bundle, intra_op_threads=threads)
    with Catalog.open(folder, bundle) as catalog:
        for start in range(0, size, 256):
            items = [ItemInput(f"item-{n}", synthetic_image(n, 96, 96, "PNG"), attributes={"group": n % 10})
                     for n in range(start, min(size, start + 256))]
            catalog.add_images(items, embedder)


class RawPipeline:
    """The server's per-query work without HTTP, asyncio or batching windows."""

    def __init__(self, bundle, catalog, threads: int, candidates: int, k: int):
        self.bundle, self.catalog = bundle, catalog
        self.embedder = Embedder(bundle, intra_op_threads=threads)
        self.spec = bundle.preprocess
        self.candidates, self.k = candidates, k

    def prepare(self, data: bytes) -> np.ndarray:
        decoded = decode_image(data, draft_size=self.spec.resize)
        return preprocess_image(decoded.image, self.spec)

    def finish(self, embeddings, uncertainties) -> None:
        found = self.catalog.search(embeddings, self.candidates)
        for row, candidates in enumerate(found):
            rank_candidates(self.bundle, candidates, uncertainties[row], k=self.k, min_confidence=0.0)

    def single(self, data: bytes) -> None:
        result = self.embedder.embed(self.prepare(data)[None])
        self.finish(result.embedding, result.uncertainty)

    def batch(self, images: list[bytes], pool: ThreadPoolExecutor) -> None:
        pixels = np.stack(list(pool.map(self.prepare, images)))
        result = self.embedder.embed(pixels)
        self.finish(result.embedding, result.uncertainty)


def measure_raw(pipeline: RawPipeline, queries: list[bytes], count: int, decode_threads: int, limit_s: float) -> dict:
    for data in queries[:8]:
        pipeline.single(data)
    latencies = []
    deadline = time.monotonic() + limit_s
    for index in range(count):
        started = time.perf_counter()
        pipeline.single(queries[index % len(queries)])
        latencies.append(time.perf_counter() - started)
        if time.monotonic() > deadline:
            break

    batches = max(1, count // 16)
    done = 0
    with ThreadPoolExecutor(decode_threads) as pool:
        pipeline.batch(queries[:16], pool)
        started = time.perf_counter()
        deadline = time.monotonic() + limit_s
        for index in range(batches):
            images = [queries[(index * 16 + offset) % len(queries)] for offset in range(16)]
            pipeline.batch(images, pool)
            done += 16
            if time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - started
    return {"single": percentiles(latencies), "batched_16_images_per_s": round(done / elapsed, 2)}


def run_clients(base_url: str, queries: list[bytes], total: int, clients: int, limit_s: float, k: int,
                server_pid: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(total))
    deadline = time.monotonic() + limit_s
    rss_samples: list[tuple[int, int]] = []
    stop_sampling = threading.Event()
    completed = [0]

    def sample_rss() -> None:
        while not stop_sampling.wait(0.25):
            rss_samples.append((completed[0], rss_bytes(server_pid)))

    def client_loop() -> None:
        with httpx.Client(base_url=base_url, timeout=60.0) as http:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                data = queries[index % len(queries)]
                started = time.perf_counter()
                response = http.post("/search", params={"k": k}, files={"image": ("q", data, "application/octet-stream")})
                elapsed = time.perf_counter() - started
                with lock:
                    completed[0] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[response.status_code] = errors.get(response.status_code, 0) + 1

    rss_start = rss_bytes(server_pid)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - started
    stop_sampling.set()
    sampler.join()
    rss_end = rss_bytes(server_pid)
    done = len(latencies)
    after_tenth = [rss for count, rss in rss_samples if count >= done // 10] or [rss_start]
    return {
        "clients": clients,
        "requests": done,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(done / elapsed, 2) if elapsed else 0.0,
        "latency": percentiles(latencies) if latencies else None,
        "rss_mb": {
            "before": round(rss_start / 2**20, 1),
            "after_first_tenth": round(after_tenth[0] / 2**20, 1),
            "max": round(max([rss for _, rss in rss_samples] + [rss_end]) / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="model bundle folder")
    parser.add_argument("--catalog-size", type=int, default=1000, help="synthetic catalog items")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the concurrent phase")
    parser.add_argument("--single-requests", type=int, default=200, help="requests of the one-client phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=None, help="IDML_THREADS of the server and raw pipeline")
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="upper bound of each phase, seconds")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    threads = args.threads or max(1, os.cpu_count() or 1)
    decode_threads = max(2, threads)
    bundle = load_bundle(args.bundle)
    queries = [synthetic_image(10_000 + n, *QUERY_SHAPES[n % len(QUERY_SHAPES)]) for n in range(40)]
    set_faiss_threads(threads)

    with tempfile.TemporaryDirectory(prefix="idml-load-") as scratch:
        catalog_folder = Path(scratch) / "catalog"
        logger.info("building a catalog of %d synthetic items", args.catalog_size)
        build_catalog(catalog_folder, bundle, args.catalog_size, threads)

        logger.info("measuring the raw pipeline")
        with Catalog.open(catalog_folder, bundle) as catalog:
            raw_pipeline = RawPipeline(bundle, catalog, threads, candidates=max(50, args.k), k=args.k)
            raw = measure_raw(raw_pipeline, queries, args.single_requests, decode_threads, args.time_limit_s)

        env = {"THREADS": threads, "BATCH_WINDOW_MS": args.batch_window_ms, "LOG_LEVEL": "warning",
               "MAX_UPLOAD_BYTES": 64 * 2**20}
        with ServerProcess(bundle.path, catalog_folder, env=env, log_path=Path(scratch) / "server.log") as server:
            import httpx

            logger.info("single client: %d requests", args.single_requests)
            single = run_clients(server.base_url, queries, args.single_requests, 1, args.time_limit_s, args.k, server.pid)
            logger.info("%d clients: %d requests", args.clients, args.requests)
            load = run_clients(server.base_url, queries, args.requests, args.clients, args.time_limit_s, args.k, server.pid)
            with httpx.Client(base_url=server.base_url) as http:
                metrics = http.get("/metrics").text
        batches = [line for line in metrics.splitlines() if line.startswith("idml_embed_batch_size_")]

    single_p50 = single["latency"]["p50_ms"]
    raw_p50 = raw["single"]["p50_ms"]
    rss = load["rss_mb"]
    goals = {
        "single_p50_within_1.3x_raw": {"ratio": round(single_p50 / raw_p50, 2), "met": single_p50 <= 1.3 * raw_p50},
        "throughput_at_least_0.8x_raw_batched": {
            "ratio": round(load["requests_per_s"] / raw["batched_16_images_per_s"], 2),
            "met": load["requests_per_s"] >= 0.8 * raw["batched_16_images_per_s"],
        },
        "rss_flat_within_10pct": {
            "ratio": round(rss["end"] / rss["after_first_tenth"], 3),
            "met": rss["end"] <= 1.1 * rss["after_first_tenth"],
        },
    }
    report = {
        "bundle": str(bundle.path),
        "model_id": bundle.model_id,
        "input_size": bundle.manifest.input.size,
        "catalog_size": args.catalog_size,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "raw": raw,
        "server_single_client": single,
        "server_concurrent": load,
        "embed_batch_size_metric": batches,
        "goals": goals,
    }
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
