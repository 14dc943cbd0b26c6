"""Search latency and recall@10 of the Milvus backend beside FAISS, on synthetic vectors.

    python bench/index_milvus.py                      # 100,000 vectors, d = 128, Milvus Lite in a temp folder
    python bench/index_milvus.py --uri http://127.0.0.1:19530 --index-type HNSW

Vectors are random unit vectors (uniform directions by default, or
`--clusters N` overlapping Gaussian clusters), queries are fresh draws, and recall@10 is measured against exact inner
product search in numpy. Latency is per single-query call (one request per
query, as the service issues them), reported as the median over the queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.backend import BackendSearchParams  # noqa: E402
from index.faiss_backend import FaissBackend, IndexSpec  # noqa: E402
from index.milvus_backend import MilvusBackend, MilvusConfig  # noqa: E402

logger = logging.getLogger(__name__)


def clustered_vectors(count: int, dimension: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """float32 (count, dimension) unit vectors scattered around random cluster centres."""
    labels = rng.integers(0, len(centres), size=count)
    # Noise as large as the centres: clusters overlap, so IVF recall depends on nprobe.
    vectors = centres[labels] + rng.standard_normal((count, dimension)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found.tolist(), exact.tolist())]))


def measure(backend, queries: np.ndarray, exact: np.ndarray, params: BackendSearchParams) -> dict:
    backend.search(queries[:5], 10, params=params)  # warm-up
    times = []
    found = []
    for query in queries:
        started = time.perf_counter()
        _, ids = backend.search(query[None, :], 10, params=params)
        times.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return {
        "p50_ms": round(float(np.median(times)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "recall_at_10": round(recall_at_10(np.stack(found), exact), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="catalog vectors")
    parser.add_argument("--dimension", type=int, default=128, help="vector dimension d")
    parser.add_argument("--queries", type=int, default=200, help="single-query searches timed per setting")
    parser.add_argument("--uri", default="", help="Milvus uri; default: Milvus Lite on a file in a temp folder")
    parser.add_argument("--index-type", default="IVF_FLAT", choices=["FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8"])
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cluster count (Milvus and FAISS)")
    parser.add_argument("--probes", default="8,32,128", help="comma-separated nprobe (IVF) or ef (HNSW) values")
    parser.add_argument("--clusters", type=int, default=0, help="Gaussian clusters; 0 = uniform random directions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(args.clusters, 1), args.dimension)).astype(np.float32)
    if args.clusters == 0:
        centres[:] = 0  # uniform directions: the hardest case for IVF, so nprobe shows
    vectors = clustered_vectors(args.count, args.dimension, rng, centres)
    queries = clustered_vectors(args.queries, args.dimension, rng, centres)
    ids = np.arange(args.count, dtype=np.int64)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    probes = [int(value) for value in args.probes.split(",")]
    results: dict = {"count": args.count, "dimension": args.dimension, "clusters": args.clusters, "queries": args.queries, "rows": []}

    with tempfile.TemporaryDirectory() as folder:
        uri = args.uri or str(Path(folder) / "milvus.db")
        config = MilvusConfig(uri=uri, collection="bench", index_type=args.index_type, nlist=args.nlist, nprobe=min(16, args.nlist))
        started = time.perf_counter()
        milvus = MilvusBackend.open(config, "bench_vectors", args.dimension)
        try:
            milvus.recreate()
            milvus.add(ids, vectors)
            milvus.flush()
            load_s = time.perf_counter() - started
            logger.info("Milvus (%s): inserted and flushed %d vectors in %.1f s", args.index_type, args.count, load_s)
            results["milvus_insert_s"] = round(load_s, 1)
            for probe in probes:
                params = BackendSearchParams(ef_search=probe) if args.index_type == "HNSW" else BackendSearchParams(nprobe=min(probe, args.nlist))
                row = {"backend": f"milvus {args.index_type}", "probe": probe, **measure(milvus, queries, exact, params)}
                logger.info(json.dumps(row))
                results["rows"].append(row)
            milvus.drop()
        finally:
            milvus.close()

    faiss_kinds = [("flat", None), ("hnsw" if args.index_type == "HNSW" else "ivf_sq8", probes)]
    for kind, kind_probes in faiss_kinds:
        spec = IndexSpec(kind=kind, nlist=args.nlist)
        started = time.perf_counter()
        backend = FaissBackend.build(args.dimension, kind, spec, ids, vectors)
        logger.info("FAISS %s: built in %.1f s", kind, time.perf_counter() - started)
        for probe in kind_probes or [0]:
            params = BackendSearchParams(nprobe=probe or None, ef_search=probe or None)
            row = {"backend": f"faiss {kind}", "probe": probe or None, **measure(backend, queries, exact, params)}
            logger.info(json.dumps(row))
            results["rows"].append(row)

    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
