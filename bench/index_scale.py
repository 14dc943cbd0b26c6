"""Memory, search time and recall@10 of each index kind on synthetic catalogs.

    python bench/index_scale.py --sizes 100000 [1000000] [--dim 128] [--kinds flat hnsw ivf_sq8 ivf_pq]

Vectors are L2-normalised points around 1,000 random centres (a stand-in for
real embeddings, which cluster by class). For each size and kind it reports:

    build_s            time to build (and train) the index
    bytes_per_item     serialised index size / items (the index's memory)
    sqlite_bytes_per_item  the catalog also stores each vector in SQLite:
                       4 d bytes plus about 200 bytes of metadata (estimate)
    ms_per_query       one query at a time, one thread
    ms_per_query_batch 1,000 queries in one call, all threads
    recall_at_10       against exact (flat) search; for the quantised kinds
                       also after the catalog's exact rescoring of
                       refine_factor * 10 candidates

Prints one JSON object per (size, kind).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.faiss_backend import INDEX_KINDS, FaissBackend, IndexSpec  # noqa: E402


def clustered(count: int, dimension: int, centres: int, seed: int) -> np.ndarray:
    """float32 (count, dimension) unit vectors around `centres` random centres."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dimension)).astype(np.float32)
    vectors = np.empty((count, dimension), np.float32)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        chosen = middle[rng.integers(0, centres, stop - start)]
        vectors[start:stop] = chosen + 0.8 * rng.standard_normal((stop - start, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(row[row >= 0].tolist()) & set(expected.tolist())) for row, expected in zip(found, truth))
    return hits / truth.size


def measure(kind: str, spec: IndexSpec, base: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    ids = np.arange(1, len(base) + 1, dtype=np.int64)
    started = time.perf_counter()
    backend = FaissBackend.build(base.shape[1], kind, spec, ids, base)
    build_seconds = time.perf_counter() - started
    size = backend.memory_bytes()

    started = time.perf_counter()
    _, found = backend.search(queries, 10)
    batch_ms = 1000 * (time.perf_counter() - started) / len(queries)

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    single = queries[:200]
    started = time.perf_counter()
    for row in range(len(single)):
        backend.search(single[row : row + 1], 10)
    single_ms = 1000 * (time.perf_counter() - started) / len(single)
    faiss.omp_set_num_threads(threads)

    result = {
        "kind": kind,
        "build_s": round(build_seconds, 2),
        "bytes_per_item": round(size / len(base), 1),
        "sqlite_bytes_per_item": 4 * base.shape[1] + 200,
        "ms_per_query": round(single_ms, 3),
        "ms_per_query_batch": round(batch_ms, 4),
        "recall_at_10": round(recall(found, truth), 4),
    }
    if kind in ("ivf_sq8", "ivf_pq"):
        fetch = 10 * spec.refine_factor
        _, candidates = backend.search(queries, fetch)
        rescored = np.empty((len(queries), 10), np.int64)
        for row in range(len(queries)):
            valid = candidates[row][candidates[row] >= 0]
            exact = base[valid - 1] @ queries[row]
            rescored[row] = valid[np.argsort(-exact)[:10]]
        result["recall_at_10_rescored"] = round(recall(rescored, truth), 4)
    del backend
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="catalog sizes (default 100000)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall and batch timing (default 1000)")
    parser.add_argument("--kinds", nargs="+", default=list(INDEX_KINDS), choices=INDEX_KINDS, help="index kinds")
    parser.add_argument("--ef-construction", type=int, default=IndexSpec().ef_construction, help="HNSW build list size")
    args = parser.parse_args(argv)

    results = []
    for size in args.sizes:
        base = clustered(size, args.dim, 1000, seed=0)
        # Queries: catalog vectors moved by a little noise, like a new photo of an indexed object.
        rng = np.random.default_rng(1)
        queries = base[rng.choice(size, args.queries, replace=False)] + 0.3 * rng.standard_normal(
            (args.queries, args.dim)
        ).astype(np.float32) / np.sqrt(args.dim)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = FaissBackend.build(args.dim, "flat", IndexSpec(), np.arange(1, size + 1, dtype=np.int64), base)
        _, truth = exact.search(queries, 10)
        del exact
        spec = IndexSpec(ef_construction=args.ef_construction)
        for kind in args.kinds:
            result = {"items": size, "dim": args.dim, **measure(kind, spec, base, queries, truth)}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
