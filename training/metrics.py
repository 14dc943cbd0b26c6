"""Retrieval metrics of deep metric learning, as pytorch-metric-learning defines them.

Every image queries all other images of the same set (query = reference, the
query itself excluded), ranked by cosine similarity of the L2-normalised
embeddings (the same order as Euclidean distance). For a query with label y,
R is the number of other images labelled y.

    recall_at_k   fraction of queries with at least one same-label image in the top k
                  (recall@1 is pytorch-metric-learning's precision_at_1)
    r_precision   mean over queries of (same-label images in the top R) / R
    map_at_r      mean over queries of (1/R) sum_{i<=R} P(i) rel(i), P(i) the precision
                  of the top i and rel(i) 1 if the i-th neighbour has label y
    nmi           normalised mutual information between labels and k-means clusters
                  (one cluster per class) of the embeddings

Queries with R = 0 (the only image of their class) are left out of the
nearest-neighbour metrics, as pytorch-metric-learning leaves out "lone" query
labels; NMI uses every image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 2, 4, 8)


def nearest_neighbors(
    embeddings: np.ndarray, k: int, *, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product, each row excluding itself.

    Args:
        embeddings: float (n, d), L2-normalised rows.
        k: neighbours per query, 1 <= k <= n - 1.
        chunk_size: queries per matrix product, bounding memory to chunk_size * n floats.

    Returns:
        similarities float32 (n, k), descending per row; indices int64 (n, k).
    """
    return neighbors_of_rows(embeddings, np.arange(embeddings.shape[0]), k, chunk_size=chunk_size)


def _group_rows(
    embeddings: np.ndarray, groups: np.ndarray, name: str, query_count: int | None, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Check a per-row array against the embeddings; return its integer codes (n,) and the query rows."""
    groups = np.asarray(groups)
    n = groups.shape[0]
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings and {name} differ in length: {embeddings.shape[0]} rows, {n} {name}")
    if rows is not None and query_count is not None:
        raise ValueError("give query_count or rows, not both")
    if rows is None:
        nq = n if query_count is None else int(query_count)
        if not 0 <= nq <= n:
            raise ValueError(f"query_count={nq} must be between 0 and {n}")
        rows = np.arange(nq)
    rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
    if rows.size and not (0 <= rows.min() and rows.max() < n):
        raise ValueError(f"query rows must be between 0 and {n - 1}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1), rows


def _masked_neighbors(
    embeddings: np.ndarray, k: int, rows: np.ndarray, chunk_size: int,
    mask: Callable[[np.ndarray, torch.Tensor], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Find the k nearest neighbours of the query `rows` after `mask(chunk_rows, block)` sets the
    excluded entries of each block of similarities (one line per row of the chunk) to -inf."""
    x = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    similarities = np.empty((rows.size, k), dtype=np.float32)
    indices = np.empty((rows.size, k), dtype=np.int64)
    for start in range(0, rows.size, chunk_size):
        stop = min(start + chunk_size, rows.size)
        block = x[torch.as_tensor(rows[start:stop])] @ x.t()
        block[torch.arange(stop - start), torch.as_tensor(rows[start:stop])] = -torch.inf  # never the query itself
        mask(rows[start:stop], block)
        top = block.topk(k, dim=1)
        similarities[start:stop] = top.values.numpy()
        indices[start:stop] = top.indices.numpy()
    return similarities, indices


def neighbors_of_rows(
    embeddings: np.ndarray, rows: np.ndarray, k: int, *, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Find the exact k nearest neighbours of the given rows among all other rows (as `nearest_neighbors`)."""
    rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
    if not 1 <= k <= embeddings.shape[0] - 1:
        raise ValueError(f"k={k} must be between 1 and n - 1 = {embeddings.shape[0] - 1}")
    return _masked_neighbors(embeddings, k, rows, chunk_size, lambda queries, block: None)


def class_balanced_neighbors(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int,
    *,
    query_count: int | None = None,
    rows: np.ndarray | None = None,
    in_catalog: bool = False,
    seed: int | np.random.SeedSequence = 0,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the exact k nearest neighbours when every class loses one image per query.

    The query's class loses the query, as in `nearest_neighbors`, and every
    other class loses one member drawn at random (seeded, per query). Under
    plain leave-one-out the query's class always has one image fewer than
    any other class of its size. A confidence feature that counts a label
    among the candidates then learns that a label with all its images
    present cannot be the query's. On the emoji data, with 4 images a class,
    no rank-1 candidate whose label appeared 4 times was right. A real
    catalog gives no such signal. These lists serve data sets that record no
    image source; `cross_source_neighbors` serves those that do.

    With `in_catalog` the query stands for a catalog image: its class loses
    another random member instead, and the caller puts the query first. The
    query itself is never among the neighbours.

    NOTE: equal losses remove the count signal only when classes have equal
    sizes. A class of one image always loses it and never appears.

    Args:
        embeddings: float (n, d), L2-normalised rows.
        labels: (n,) class of each row.
        k: neighbours per query, at most n minus the number of classes (minus 1 with `in_catalog`).
        query_count: only the first `query_count` rows query (default all).
        rows: the rows that query, in place of `query_count`.

    Returns:
        similarities float32 (nq, k), descending per row; indices int64 (nq, k).
    """
    code, rows = _group_rows(embeddings, labels, "labels", query_count, rows)
    n = code.size
    counts = np.bincount(code)
    limit = n - counts.size - int(in_catalog)
    if not 1 <= k <= limit:
        raise ValueError(f"k={k} must be between 1 and n - classes{' - 1' if in_catalog else ''} = {limit}")
    members = np.argsort(code, kind="stable")  # rows grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(n, np.int64)  # each row's place among its class's members
    position[members] = np.arange(n) - starts[code[members]]
    rng = np.random.default_rng(seed)

    def drop_one_per_class(queries: np.ndarray, block: torch.Tensor) -> None:
        local = np.arange(queries.size)
        # One draw per query and class, plus one for the own class's loss with `in_catalog`: a single
        # draw per chunk keeps the lists independent of the chunk size.
        draws = rng.random((queries.size, counts.size + int(in_catalog)))
        dropped = members[starts[None, :] + (draws[:, : counts.size] * counts[None, :]).astype(np.int64)]
        own = code[queries]
        if in_catalog:
            # Another member of the query's class: a draw among the others, skipping the query's place.
            others = counts[own] - 1
            offset = (draws[:, -1] * others).astype(np.int64)
            offset += offset >= position[queries]
            dropped[local, own] = np.where(others > 0, members[starts[own] + np.minimum(offset, counts[own] - 1)], queries)
        else:
            dropped[local, own] = queries  # the query's class loses the query
        block[torch.as_tensor(np.repeat(local, counts.size)), torch.as_tensor(dropped.reshape(-1))] = -torch.inf

    return _masked_neighbors(embeddings, k, rows, chunk_size, drop_one_per_class)


def cross_source_neighbors(
    embeddings: np.ndarray,
    sources: np.ndarray,
    k: int,
    *,
    query_count: int | None = None,
    rows: np.ndarray | None = None,
    in_catalog: bool = False,
    seed: int | np.random.SeedSequence = 0,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the exact k nearest neighbours of each query among the images of other sources.

    A source is where an image comes from: the vendor that drew an emoji, a
    camera, a studio. A query from outside a catalog's sources has no image
    in its own style there, for its class or any other. Leave-one-out lists
    break that symmetry: the query's class lacks the query's style, while
    most wrong classes keep a look-alike in it.

    With `in_catalog` the query stands for a catalog image. Its own source
    then stays, a random other source (seeded, per query) leaves instead, and
    the caller puts the query first. The query itself is never among the neighbours.

    NOTE: every class keeps the same number of images only when each class has
    one image from each source, as the emoji data does. Otherwise a class
    without an image of the left-out source keeps all its images.

    Args:
        embeddings: float (n, d), L2-normalised rows.
        sources: (n,) source of each row, at least two distinct.
        k: neighbours per query, at most n minus the largest source's image count (minus 1 with `in_catalog`).
        query_count: only the first `query_count` rows query (default all).
        rows: the rows that query, in place of `query_count`.

    Returns:
        similarities float32 (nq, k), descending per row; indices int64 (nq, k).
    """
    code, rows = _group_rows(embeddings, sources, "sources", query_count, rows)
    counts = np.bincount(code)
    if counts.size < 2:
        raise ValueError("cross-source lists need images from at least two sources")
    limit = code.size - int(counts.max()) - int(in_catalog)
    if not 1 <= k <= limit:
        raise ValueError(
            f"k={k} must be between 1 and n minus the largest source's images{' minus 1' if in_catalog else ''} "
            f"= {limit}"
        )
    rng = np.random.default_rng(seed)

    def drop_a_source(queries: np.ndarray, block: torch.Tensor) -> None:
        left_out = code[queries]
        if in_catalog:
            draw = (rng.random(queries.size) * (counts.size - 1)).astype(np.int64)
            left_out = draw + (draw >= left_out)  # any source but the query's
        block[torch.as_tensor(left_out[:, None] == code[None, :])] = -torch.inf

    return _masked_neighbors(embeddings, k, rows, chunk_size, drop_a_source)


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """recall@k, R-precision and MAP@R of a set of embeddings against itself.

    Args:
        embeddings: float (n, d), L2-normalised rows.
        labels: int (n,) class labels.

    Returns:
        metrics: {"recall_at_{k}", "r_precision", "map_at_r", "num_queries"}; the
            averages are NaN when no query has another image of its class.
        first_hit: bool (n,), whether the nearest neighbour has the query's label.
        counted: bool (n,), the queries included (R >= 1).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings and labels differ in length: {embeddings.shape[0]} rows, {n} labels")
    if n < 2:
        raise ValueError(f"retrieval metrics need at least 2 images, got {n}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    relevant_count = counts[inverse] - 1  # R per query
    counted = relevant_count > 0
    k = int(min(n - 1, max(max(ks), relevant_count.max())))
    _, indices = nearest_neighbors(embeddings, k, chunk_size=chunk_size)
    relevant = labels[indices] == labels[:, None]  # (n, k)

    metrics: dict[str, float] = {"num_queries": int(counted.sum())}
    for cutoff in ks:
        hits = relevant[:, : min(cutoff, k)].any(axis=1)
        metrics[f"recall_at_{cutoff}"] = _mean(hits[counted])

    ranks = np.arange(1, k + 1)
    within_r = ranks[None, :] <= relevant_count[:, None]
    relevant_within_r = relevant & within_r
    safe_r = np.maximum(relevant_count, 1)
    r_precision = relevant_within_r.sum(axis=1) / safe_r
    precision_at_i = np.cumsum(relevant, axis=1) / ranks[None, :]
    average_precision = (precision_at_i * relevant_within_r).sum(axis=1) / safe_r
    metrics["r_precision"] = _mean(r_precision[counted])
    metrics["map_at_r"] = _mean(average_precision[counted])
    return metrics, relevant[:, 0], counted


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def nmi(embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """NMI between labels and k-means clusters of the embeddings, one cluster per class.

    Uses scikit-learn's KMeans (one initialisation, seeded) and arithmetic-mean
    normalisation; pytorch-metric-learning clusters with FAISS k-means, so its
    value differs slightly for the same embeddings.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    if num_classes < 2 or num_classes >= labels.shape[0]:
        return float("nan")
    kmeans = KMeans(n_clusters=num_classes, n_init=1, random_state=seed)
    clusters = kmeans.fit_predict(np.asarray(embeddings, dtype=np.float32))
    return float(normalized_mutual_info_score(labels, clusters))


def uncertainty_auroc(uncertainty_scalar: np.ndarray, first_hit: np.ndarray) -> float:
    """AUROC of ||u||^2 as a score for "the nearest neighbour has another label".

    0.5 is chance and 1.0 a perfect predictor of rank-1 misses; NaN when all
    queries hit or all miss.

    Args:
        uncertainty_scalar: float (m,), ||u||^2 of each counted query.
        first_hit: bool (m,), whether the query's nearest neighbour is of its class.
    """
    from sklearn.metrics import roc_auc_score

    miss = ~np.asarray(first_hit, dtype=bool)
    if miss.all() or not miss.any():
        return float("nan")
    return float(roc_auc_score(miss, np.asarray(uncertainty_scalar, dtype=np.float64)))


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    uncertainty: np.ndarray | None = None,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    compute_nmi: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """All evaluation metrics of one split.

    Args:
        embeddings: float (n, d), L2-normalised rows.
        labels: int (n,).
        uncertainty: float (n, du) uncertainty embeddings, or None.

    Returns:
        The keys of `retrieval_metrics`, plus "nmi", and with `uncertainty`
        "uncertainty_auroc" and "uncertainty_mean"/"uncertainty_std" (of ||u||^2).
    """
    metrics, first_hit, counted = retrieval_metrics(embeddings, labels, ks=ks)
    if compute_nmi:
        metrics["nmi"] = nmi(embeddings, labels, seed=seed)
    if uncertainty is not None:
        scalar = np.einsum("nd,nd->n", uncertainty, uncertainty)
        metrics["uncertainty_mean"] = float(scalar.mean())
        metrics["uncertainty_std"] = float(scalar.std())
        metrics["uncertainty_auroc"] = uncertainty_auroc(scalar[counted], first_hit[counted])
    return metrics
