"""Measure a model the way the server uses it: candidate lists, reranking, confidence.

Every image of a split queries all the others. Its candidates are the `k`
nearest images by cosine similarity of the semantic embeddings (exact search,
`training.metrics.nearest_neighbors`),
optionally reordered by the introspective distance, and scored with
`index.scoring.confidence_features`, the functions the server calls. The
measurements here answer the serving questions the training loss leaves open:
which pair uncertainty `beta_form` to use, whether reranking by the
introspective distance helps retrieval, and how well the confidence is calibrated.

Vocabulary: a split has n images; each query gets k candidates; F confidence features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from index.preprocess import PreprocessSpec, preprocess_bytes
from index.scoring import (
    CONFIDENCE_FEATURES,
    Calibration,
    MetricSpec,
    confidence_features,
    introspective_distance,
    pair_beta,
    rerank_order,
    top_candidate_mask,
    uncertainty_scalar,
)
from training.calibrate import auroc, expected_calibration_error, fit_logistic, split_queries
from training.metrics import class_balanced_neighbors, cross_source_neighbors, nearest_neighbors, neighbors_of_rows

logger = logging.getLogger(__name__)

# Maps uint8 images (n, size, size, 3) to (embedding float32 (n, d), uncertainty float32 (n, du)).
Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

DEFAULT_CANDIDATES = 50  # candidates per query, as many as the server fetches before reranking
DEFAULT_RETURNED = 10  # results per query that a search returns, for calibration measurements


@dataclass(frozen=True)
class EmbeddedSplit:
    """Model outputs for the n images of a split."""

    embedding: np.ndarray  # float32 (n, d), L2-normalised
    uncertainty: np.ndarray  # float32 (n, du)
    labels: np.ndarray  # int64 (n,), class of each image
    sources: np.ndarray | None = None  # str (n,), source of each image (the emoji vendor), when recorded

    @property
    def uncertainty_scalar(self) -> np.ndarray:
        """||u||^2 per image, float32 (n,)."""
        return uncertainty_scalar(self.uncertainty)


def onnx_encoder(onnx_path: str | Path, *, threads: int = 0) -> Encoder:
    """Encoder running an exported graph with onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

    def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, uncertainty = session.run(["embedding", "uncertainty"], {"image": images})
        return embedding, uncertainty

    return encode


def embed_paths(
    paths: Sequence[str | Path],
    spec: PreprocessSpec,
    encoder: Encoder,
    *,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Read, preprocess (`index.preprocess.preprocess_bytes`) and embed image files.

    Returns:
        embedding float32 (n, d) and uncertainty float32 (n, du).

    Raises:
        index.imaging.ImageDecodeError: a file is not a usable image.
    """
    embeddings, uncertainties = [], []
    for start in range(0, len(paths), batch_size):
        batch = np.stack(
            [preprocess_bytes(Path(path).read_bytes(), spec) for path in paths[start : start + batch_size]]
        )
        embedding, uncertainty = encoder(batch)
        embeddings.append(np.asarray(embedding, np.float32))
        uncertainties.append(np.asarray(uncertainty, np.float32))
    if not embeddings:
        raise ValueError("no images to embed")
    return np.concatenate(embeddings), np.concatenate(uncertainties)


def embed_samples(
    samples: Sequence, spec: PreprocessSpec, encoder: Encoder, *, batch_size: int = 64, kind: str | None = None
) -> EmbeddedSplit:
    """Embed `training.data` samples (objects with `path` and `label`).

    `kind`, the data set kind, records each image's source where that kind has
    one (`training.data.layouts.SOURCE_OF`).
    """
    from training.data.layouts import sample_sources

    paths = [sample.path for sample in samples]
    embedding, uncertainty = embed_paths(paths, spec, encoder, batch_size=batch_size)
    labels = np.asarray([sample.label for sample in samples], np.int64)
    sources = None if kind is None else sample_sources(kind, paths)
    return EmbeddedSplit(
        embedding=embedding, uncertainty=uncertainty, labels=labels,
        sources=None if sources is None else np.asarray(sources),
    )


def load_bundle_splits(dataset: dict, data_root: str | Path | None = None):
    """Read the data set a bundle was exported from, with the same class splits.

    Args:
        dataset: the `dataset` section of model.json (name, root, val_fraction, split_seed).
        data_root: the data set folder, when it moved since export.

    Returns:
        `training.data.DatasetSplits`.
    """
    from training.data import load_dataset

    root = Path(data_root) if data_root is not None else Path(dataset["root"])
    return load_dataset(
        dataset["name"], root, val_fraction=float(dataset["val_fraction"]), seed=int(dataset["split_seed"])
    )


@dataclass(frozen=True)
class CandidateLists:
    """Candidates of every query, in the order a search returns them (nq queries, k candidates)."""

    index: np.ndarray  # int64 (nq, k), candidate positions in the split
    similarity: np.ndarray  # float32 (nq, k), cosine similarity to the query
    distance: np.ndarray  # float32 (nq, k), introspective distance to the query
    features: np.ndarray  # float64 (nq, k, F), `confidence_features` of each candidate
    feature_names: tuple[str, ...]
    relevant: np.ndarray  # bool (nq, k), candidate has the query's class
    relevant_count: np.ndarray  # int64 (nq,), same-class images in the split besides the query
    query_uncertainty: np.ndarray  # float32 (nq,), ||u||^2 of the query


def score_candidates(
    split: EmbeddedSplit,
    index: np.ndarray,
    similarity: np.ndarray,
    metric: MetricSpec,
    *,
    rerank: bool,
    feature_names: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
) -> CandidateLists:
    """Score and order every query's candidates as the server does.

    Each query gets its pair uncertainties (`pair_beta`), introspective
    distances and confidence features over the whole candidate list. With
    `rerank` the candidates then take the order of `rerank_order` (distance,
    ties by similarity). Without it they keep the similarity order of
    `training.metrics.nearest_neighbors`.
    """
    feature_names = tuple(feature_names)
    nq, k = index.shape
    scalars = split.uncertainty_scalar
    distance = np.empty((nq, k), np.float32)
    features = np.empty((nq, k, len(feature_names)), np.float64)
    ordered_index = index.copy()
    ordered_similarity = np.asarray(similarity, np.float32).copy()
    for query in range(nq):
        items = index[query]
        if metric.beta_form == "sum":
            beta = pair_beta(metric, scalars[query], scalars[items])
        else:
            beta = pair_beta(metric, split.uncertainty[query], split.uncertainty[items])
        row_distance = introspective_distance(similarity[query], beta, metric)
        row_features = confidence_features(
            similarity[query], row_distance, float(scalars[query]), scalars[items], feature_names,
            labels=split.labels[items],
        )
        order = rerank_order(row_distance, similarity[query]) if rerank else np.arange(k)
        ordered_index[query] = items[order]
        ordered_similarity[query] = similarity[query][order]
        distance[query] = row_distance[order]
        features[query] = row_features[order]

    labels = split.labels
    counts = np.bincount(labels)
    return CandidateLists(
        index=ordered_index,
        similarity=ordered_similarity,
        distance=distance,
        features=features,
        feature_names=feature_names,
        relevant=labels[ordered_index] == labels[:nq, None],
        relevant_count=(counts[labels[:nq]] - 1).astype(np.int64),
        query_uncertainty=scalars[:nq].astype(np.float32),
    )


def with_distractors(queries: EmbeddedSplit, distractors: EmbeddedSplit | None) -> EmbeddedSplit:
    """`queries` followed by `distractors` in one split; the queries keep rows 0 .. nq - 1.

    Distractors are images of other classes (the training classes) that make a
    validation catalog as crowded as a real one: a query can match them by
    mistake but never correctly.

    Raises:
        ValueError: a distractor has a query's class.
    """
    if distractors is None or len(distractors.labels) == 0:
        return queries
    shared = np.intersect1d(queries.labels, distractors.labels)
    if shared.size:
        raise ValueError(f"{shared.size} classes are both queries and distractors, for example class {shared[0]}")
    if (queries.sources is None) != (distractors.sources is None):
        raise ValueError("queries and distractors must both record image sources, or neither")
    both_sourced = queries.sources is not None
    return EmbeddedSplit(
        embedding=np.concatenate([queries.embedding, distractors.embedding]),
        uncertainty=np.concatenate([queries.uncertainty, distractors.uncertainty]),
        labels=np.concatenate([queries.labels, distractors.labels]),
        sources=np.concatenate([queries.sources, distractors.sources]) if both_sourced else None,
    )


# Candidate lists that fit and measure the confidence; see `calibration_candidates`.
PROTOCOLS = ("auto", "cross-source", "balanced", "leave-one-out")


def _check_protocol_name(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def resolve_protocol(protocol: str, split: EmbeddedSplit) -> str:
    """Return the protocol `calibration_candidates` uses on `split`.

    "auto" is cross-source where the split records at least two sources, else balanced.
    """
    _check_protocol_name(protocol)
    source_count = 0 if split.sources is None else len(np.unique(split.sources))
    if protocol == "auto":
        return "cross-source" if source_count >= 2 else "balanced"
    if protocol == "cross-source" and source_count < 2:
        raise ValueError(
            "the cross-source protocol needs images from at least two sources, and this data set records "
            f"{'no source' if split.sources is None else 'one'}; use the protocol 'balanced' or 'auto'"
        )
    return protocol


def check_protocol_for_kind(protocol: str, kind: str) -> None:
    """Raise ValueError before any embedding when `protocol` cannot serve the data set `kind`."""
    from training.data.layouts import SOURCE_OF

    _check_protocol_name(protocol)
    if protocol == "cross-source" and kind not in SOURCE_OF:
        raise ValueError(
            f"data set kind {kind!r} records no image sources, so it has no cross-source lists; "
            f"use --calibration-protocol balanced or auto (kinds with sources: {', '.join(SOURCE_OF)})"
        )


def calibration_neighbors(
    queries: EmbeddedSplit,
    distractors: EmbeddedSplit | None,
    *,
    candidates: int,
    duplicates: float = 0.0,
    seed: int = 0,
    protocol: str = "auto",
) -> tuple[EmbeddedSplit, np.ndarray, np.ndarray]:
    """Build the neighbour lists of `calibration_candidates`, before any scoring.

    Returns:
        the catalog (queries, then distractors), similarity float32 (nq, k)
        and index int64 (nq, k) into that catalog.
    """
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError(f"duplicates must be a fraction in [0, 1], got {duplicates}")
    split = with_distractors(queries, distractors)
    protocol = resolve_protocol(protocol, split)
    nq = len(queries.labels)
    n = len(split.labels)
    duplicate_stream, drop_stream, copy_stream = np.random.SeedSequence(seed).spawn(3)
    # Each search takes (k, rows=..., in_catalog=..., seed=...). Copies search k - 1 images besides
    # their own, under a limit one lower, so the same k fits both.
    if protocol == "cross-source":
        limit = n - int(np.unique(split.sources, return_counts=True)[1].max())
        search = partial(cross_source_neighbors, split.embedding, split.sources)
    elif protocol == "balanced":
        limit = n - len(np.unique(split.labels))
        search = partial(class_balanced_neighbors, split.embedding, split.labels)
    else:
        limit = n - 1

        def search(k: int, *, rows: np.ndarray, in_catalog: bool = False, seed=None):
            return neighbors_of_rows(split.embedding, rows, k)

    k = min(candidates, limit)
    if k < candidates:
        logger.warning("%s lists hold %d candidates per query, not %d: the catalog has only %d images, and "
                       "each query's list leaves out %d of them", protocol, k, candidates, n, n - k)
    similarity, index = search(k, rows=np.arange(nq), seed=drop_stream)
    chosen = np.flatnonzero(np.random.default_rng(duplicate_stream).uniform(size=nq) < duplicates)
    if chosen.size:
        # A query in the catalog: its image comes first, and the rest of its catalog loses as many
        # images as the other queries' catalogs do, so that class counts cannot single out the copies.
        own = np.einsum("ij,ij->i", queries.embedding[chosen], queries.embedding[chosen])
        similarity[chosen, 0], index[chosen, 0] = own, chosen
        if k > 1:
            similarity[chosen, 1:], index[chosen, 1:] = search(k - 1, rows=chosen, in_catalog=True, seed=copy_stream)
    return split, similarity, index


def calibration_candidates(
    queries: EmbeddedSplit,
    distractors: EmbeddedSplit | None,
    metric: MetricSpec,
    *,
    rerank: bool,
    candidates: int,
    duplicates: float = 0.0,
    seed: int = 0,
    feature_names: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
    protocol: str = "auto",
) -> CandidateLists:
    """Candidate lists of every query against the other queries and the distractors.

    The catalog each query searches depends on `protocol`:
    - "cross-source": the images of other sources only (`cross_source_neighbors`),
      as a query from outside the catalog's sources searches it. With one
      image per source and class, every class then lacks the same number of
      images, and no wrong class has a look-alike in the query's own style
      that the right class lacks.
    - "balanced": every class loses one random image (`class_balanced_neighbors`),
      for data sets that record no source.
    - "leave-one-out": only the query leaves, for comparisons. The query's
      class is then the only one short of an image, which label counts reveal.
    - "auto": cross-source where the splits record two or more sources, else balanced.

    A seeded `duplicates` fraction of the queries stands for catalog images.
    Each finds its own image first, as a query that is in the catalog does.
    Its class and source stay, and another class member or source leaves
    instead (`in_catalog` of the neighbour functions).
    """
    split, similarity, index = calibration_neighbors(
        queries, distractors, candidates=candidates, duplicates=duplicates, seed=seed, protocol=protocol
    )
    return score_candidates(split, index, similarity, metric, rerank=rerank, feature_names=feature_names)


def average_precision_at_r(relevant: np.ndarray, relevant_count: np.ndarray) -> np.ndarray:
    """Per-query average precision at R (Musgrave et al., "A Metric Learning Reality Check", 2020).

    AP@R = (1 / R) * sum over ranks i <= R of precision@i * [result i is relevant],
    with R the number of same-class images besides the query. Relevant images
    outside the k candidates count as misses.

    Args:
        relevant: bool (nq, k), in returned order.
        relevant_count: int (nq,), R of each query.

    Returns:
        float64 (nq,); NaN where R = 0.
    """
    relevant = np.asarray(relevant, bool)
    nq, k = relevant.shape
    ranks = np.arange(1, k + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    within_r = ranks[None, :] <= np.asarray(relevant_count)[:, None]
    total = np.sum(precision * relevant * within_r, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(relevant_count > 0, total / relevant_count, np.nan)


def retrieval_metrics(candidates: CandidateLists) -> dict:
    """R@1, MAP@R and R-precision over queries with at least one same-class image, as fractions."""
    has_match = candidates.relevant_count > 0
    relevant = candidates.relevant[has_match]
    counts = candidates.relevant_count[has_match]
    if relevant.shape[0] == 0:
        raise ValueError("no query has another image of its class; retrieval metrics are undefined")
    ranks = np.arange(1, relevant.shape[1] + 1)
    r_precision = np.sum(relevant * (ranks[None, :] <= counts[:, None]), axis=1) / counts
    return {
        "queries": int(relevant.shape[0]),
        "recall_at_1": float(relevant[:, 0].mean()),
        "map_at_r": float(np.mean(average_precision_at_r(relevant, counts))),
        "r_precision": float(np.mean(r_precision)),
    }


def confidence_of(candidates: CandidateLists, calibration: Calibration) -> np.ndarray:
    """Calibrated confidence of every candidate, float32 (nq, k)."""
    nq, k, feature_count = candidates.features.shape
    if tuple(calibration.features) != candidates.feature_names:
        raise ValueError(
            f"calibration uses features {list(calibration.features)}, "
            f"the candidates have {list(candidates.feature_names)}"
        )
    top = top_candidate_mask(candidates.similarity).reshape(-1)
    return calibration.predict(candidates.features.reshape(nq * k, feature_count), top=top).reshape(nq, k)


def calibration_metrics(
    candidates: CandidateLists, calibration: Calibration, *, returned: int = DEFAULT_RETURNED
) -> dict:
    """Calibration of the confidence over the first `returned` results of every query.

    Keys: `ece_returned` (all returned results), `ece_rank1` (the first result
    only), `auroc_rank1` (confidence as a score for "the first result is
    correct"), mean confidence and accuracy of the returned results, counts.
    """
    returned = min(returned, candidates.index.shape[1])
    confidence = confidence_of(candidates, calibration)[:, :returned]
    relevant = candidates.relevant[:, :returned]
    return {
        "returned": returned,
        "results": int(relevant.size),
        "ece_returned": expected_calibration_error(confidence, relevant),
        "ece_rank1": expected_calibration_error(confidence[:, 0], relevant[:, 0]),
        "auroc_rank1": auroc(confidence[:, 0], relevant[:, 0]),
        "mean_confidence_returned": float(confidence.mean()),
        "accuracy_returned": float(relevant.mean()),
        "mean_confidence_rank1": float(confidence[:, 0].mean()),
        "accuracy_rank1": float(relevant[:, 0].mean()),
    }


def flatten_for_fit(candidates: CandidateLists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (nq*k, F), labels bool (nq*k,), query ids int64 (nq*k,)) for `fit_calibration`."""
    nq, k, feature_count = candidates.features.shape
    query_ids = np.repeat(np.arange(nq, dtype=np.int64), k)
    return candidates.features.reshape(nq * k, feature_count), candidates.relevant.reshape(-1), query_ids


def _select_queries(candidates: CandidateLists, mask: np.ndarray) -> CandidateLists:
    return CandidateLists(
        index=candidates.index[mask],
        similarity=candidates.similarity[mask],
        distance=candidates.distance[mask],
        features=candidates.features[mask],
        feature_names=candidates.feature_names,
        relevant=candidates.relevant[mask],
        relevant_count=candidates.relevant_count[mask],
        query_uncertainty=candidates.query_uncertainty[mask],
    )


def holdout_calibration_scores(
    candidates: CandidateLists, *, holdout_fraction: float = 0.3, seed: int = 0, returned: int = DEFAULT_RETURNED
) -> tuple[dict, np.ndarray]:
    """Fit a logistic confidence on some queries and measure it on the held-out rest.

    Returns:
        scores: the held-out log loss over all k candidates (`log_loss`) and
            the `calibration_metrics` of the held-out queries.
        query_log_loss: float64 (nq,), each held-out query's mean log loss
            over its candidates; NaN for the queries used in the fit.
    """
    nq, k = candidates.index.shape
    held = split_queries(np.arange(nq), holdout_fraction, seed)
    fit_part = _select_queries(candidates, ~held)
    held_part = _select_queries(candidates, held)
    features, labels, _ = flatten_for_fit(fit_part)
    calibration = fit_logistic(features, labels, candidates.feature_names)
    held_features, held_labels, _ = flatten_for_fit(held_part)
    probability = np.clip(calibration.predict(held_features).astype(np.float64), 1e-7, 1 - 1e-7)
    losses = -(held_labels * np.log(probability) + (~held_labels) * np.log(1 - probability))
    query_log_loss = np.full(nq, np.nan)
    query_log_loss[held] = losses.reshape(-1, k).mean(axis=1)
    scores = calibration_metrics(held_part, calibration, returned=returned)
    scores["log_loss"] = float(losses.mean())
    return scores, query_log_loss


@dataclass(frozen=True)
class ScoringChoice:
    """Metric settings chosen from validation measurements, and the measurements."""

    beta_form: str
    rerank: bool
    measurements: dict  # JSON-ready: the table rows and the reasons


def paired_difference(base: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-query difference other - base, NaN rows dropped.

    The standard error is infinite with fewer than two rows.
    """
    keep = ~(np.isnan(base) | np.isnan(other))
    difference = other[keep] - base[keep]
    if difference.size < 2:
        return (float(difference.mean()) if difference.size else 0.0), float("inf")
    return float(difference.mean()), float(difference.std(ddof=1) / math.sqrt(difference.size))


def measure_scoring(
    split: EmbeddedSplit,
    *,
    shift: float,
    scale: float,
    candidates: int = DEFAULT_CANDIDATES,
    returned: int = DEFAULT_RETURNED,
    seed: int = 0,
    protocol: str = "auto",
) -> list[dict]:
    """Retrieval and held-out calibration for every (beta_form, rerank) pair on one split.

    Retrieval uses plain leave-one-out lists, the calibration the lists of
    `calibration_candidates` under `protocol`.

    Returns one row per setting with keys `beta_form`, `rerank`, the
    `retrieval_metrics`, the held-out calibration scores under
    `calibration`, and two per-query arrays for paired comparisons, dropped
    before storing: `_ap` (AP@R) and `_log_loss` (held-out log loss).
    """
    k = min(candidates, split.embedding.shape[0] - 1)
    similarity, index = nearest_neighbors(split.embedding, k)
    confidence_split, confidence_similarity, confidence_index = calibration_neighbors(
        split, None, candidates=candidates, seed=seed, protocol=protocol
    )
    rows = []
    for beta_form in ("sum", "diff"):
        metric = MetricSpec(beta_form=beta_form, shift=shift, scale=scale)
        for rerank in (False, True):
            lists = score_candidates(split, index, similarity, metric, rerank=rerank)
            row = {"beta_form": beta_form, "rerank": rerank, "candidates": k}
            row.update(retrieval_metrics(lists))
            confidence_lists = score_candidates(
                confidence_split, confidence_index, confidence_similarity, metric, rerank=rerank
            )
            row["calibration"], row["_log_loss"] = holdout_calibration_scores(
                confidence_lists, seed=seed, returned=returned
            )
            row["_ap"] = average_precision_at_r(lists.relevant, lists.relevant_count)
            rows.append(row)
    return rows


def _significant(mean: float, error: float) -> bool:
    """Return whether a paired gain is positive and larger than two standard errors."""
    return mean > 0 and mean > 2 * error


def choose_scoring(rows: list[dict], *, beta_form: str = "auto", rerank: str = "auto") -> ScoringChoice:
    """Choose `beta_form` and `rerank` from `measure_scoring` rows.

    Every comparison is paired over the same validation queries. A setting
    wins only when its mean gain is positive and larger than two standard
    errors. Otherwise the simpler setting stays: the similarity order over
    reranking, and "sum" (one float per catalog item) over "diff" (a whole
    uncertainty vector per item).

    - rerank: on when reranking gains MAP@R with either form.
    - beta_form: with reranking, "diff" when reranking gains with "diff"
      only, or when "diff" gains MAP@R over "sum"; without reranking the
      order does not depend on beta, so "diff" when its confidence has a
      lower held-out log loss.

    A fixed `beta_form` or `rerank` ("on"/"off") overrides the choice.
    """
    by_key = {(row["beta_form"], row["rerank"]): row for row in rows}
    forms = ("sum", "diff") if beta_form == "auto" else (beta_form,)
    rerank_gains = {
        form: paired_difference(by_key[(form, False)]["_ap"], by_key[(form, True)]["_ap"]) for form in forms
    }
    diff_gains = {
        "map_at_r_with_rerank": paired_difference(by_key[("sum", True)]["_ap"], by_key[("diff", True)]["_ap"]),
        # Lower log loss is better, so the gain of "diff" is sum's loss minus diff's.
        "log_loss_without_rerank": paired_difference(
            by_key[("diff", False)]["_log_loss"], by_key[("sum", False)]["_log_loss"]
        ),
    }

    if rerank == "auto":
        winners = [form for form in forms if _significant(*rerank_gains[form])]
        use_rerank = bool(winners)
        rerank_reason = "; ".join(
            f"MAP@R gain of reranking with {form} {100 * mean:+.2f} points (standard error {100 * error:.2f})"
            for form, (mean, error) in rerank_gains.items()
        ) + f": {'on' if use_rerank else 'off'} (on only for a gain above two standard errors)"
    else:
        use_rerank = rerank == "on"
        rerank_reason = f"fixed by the caller: {rerank}"

    if beta_form != "auto":
        chosen_form = beta_form
        form_reason = f"fixed by the caller: {beta_form}"
    elif rerank == "auto" and winners == ["diff"]:
        chosen_form = "diff"
        form_reason = "reranking gains MAP@R with diff only"
    else:
        key = "map_at_r_with_rerank" if use_rerank else "log_loss_without_rerank"
        mean, error = diff_gains[key]
        chosen_form = "diff" if _significant(mean, error) else "sum"
        measure = "MAP@R with reranking" if use_rerank else "held-out log loss of the confidence"
        form_reason = (
            f"gain of diff over sum in {measure} {mean:+.5f} (standard error {error:.5f}): {chosen_form} "
            "(diff only for a gain above two standard errors)"
        )

    table = [{key: value for key, value in row.items() if not key.startswith("_")} for row in rows]
    measurements = {
        "split": "val",
        "table": table,
        "rerank_gain_map_at_r": {
            form: {"mean": mean, "standard_error": error} for form, (mean, error) in rerank_gains.items()
        },
        "diff_over_sum_gain": {
            name: {"mean": mean, "standard_error": error} for name, (mean, error) in diff_gains.items()
        },
        "rerank_reason": rerank_reason,
        "beta_form_reason": form_reason,
    }
    logger.info("scoring choice: beta_form=%s (%s); rerank=%s (%s)", chosen_form, form_reason, use_rerank, rerank_reason)
    return ScoringChoice(beta_form=chosen_form, rerank=use_rerank, measurements=measurements)


def json_ready(value):
    """Replace NaN and infinity by None and NumPy scalars by Python ones, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def format_scoring_table(rows: list[dict]) -> str:
    """Plain-text table of `measure_scoring` rows, metrics in percent."""
    header = f"{'beta_form':<9} {'rerank':<6} {'R@1':>6} {'MAP@R':>6} {'RP':>6} {'ECE@k':>6} {'ECE@1':>6} {'AUROC1':>6} {'logloss':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        calibration = row["calibration"]
        lines.append(
            f"{row['beta_form']:<9} {'on' if row['rerank'] else 'off':<6} "
            f"{100 * row['recall_at_1']:6.2f} {100 * row['map_at_r']:6.2f} {100 * row['r_precision']:6.2f} "
            f"{100 * calibration['ece_returned']:6.2f} {100 * calibration['ece_rank1']:6.2f} "
            f"{calibration['auroc_rank1']:6.3f} {calibration['log_loss']:7.4f}"
        )
    return "\n".join(lines)
