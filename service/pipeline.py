"""The /search pipeline: decode, preprocess, embed, search, rerank, calibrate.

Decoding and preprocessing run in the request thread pool. The image then
goes through the micro-batcher, which embeds concurrent queries in one model
call and searches the catalog for the whole batch in the request thread pool
(`search_batch`). A query that arrives at an idle server does all of it in
one worker thread instead (`MicroBatcher.claim_direct`). The event loop
never does CPU work.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from index.bundle import ModelBundle
from index.embedder import Embeddings
from index.imaging import DecodedImage, ImageDecodeError, decode_image
from index.preprocess import preprocess_image
from index.scoring import (
    confidence_features,
    introspective_distance,
    pair_beta,
    rerank_order,
    top_candidate_mask,
    uncertainty_scalar,
)
from service.errors import ApiError, decode_error
from service.runtime import ServiceRuntime, run_in_thread
from service.schemas.search import SearchOptions

# Candidates reranked when the request sets none: at least this many, and at least k.
DEFAULT_MIN_CANDIDATES = 50


@functools.lru_cache(maxsize=65536)
def item_image_url(item_id: str) -> str:
    """Path of the item's image route, with the id percent-encoded as one path segment.

    The ids "." and ".." are sent as %2E and %2E%2E, because clients remove literal dot segments
    from a URL (RFC 3986 section 5.2.4) and would request another path.
    """
    segment = urllib.parse.quote(item_id, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return f"/items/{segment}/image"


def resolve_candidates(options: SearchOptions, max_candidates: int) -> int:
    """Candidates to fetch from the catalog for `options`; raises ApiError 422 when out of bounds."""
    if options.candidates is None:
        return min(max(DEFAULT_MIN_CANDIDATES, options.k), max(max_candidates, options.k))
    if options.candidates < options.k:
        raise ApiError(
            422, "invalid_request", f"candidates ({options.candidates}) must be at least k ({options.k})"
        )
    if options.candidates > max_candidates:
        raise ApiError(
            422,
            "invalid_request",
            f"candidates ({options.candidates}) is above this server's limit of {max_candidates} "
            "(IDML_MAX_CANDIDATES)",
        )
    return options.candidates


@dataclass
class _Prepared:
    decoded: DecodedImage
    pixels: np.ndarray  # uint8 (size, size, 3)
    decode_s: float
    preprocess_s: float


def _decode_and_preprocess(runtime: ServiceRuntime, data: bytes) -> _Prepared:
    spec = runtime.bundle.preprocess
    started = time.perf_counter()
    decoded = decode_image(data, max_pixels=runtime.settings.max_pixels, draft_size=spec.resize)
    decoded_at = time.perf_counter()
    pixels = preprocess_image(decoded.image, spec)
    return _Prepared(decoded, pixels, decoded_at - started, time.perf_counter() - decoded_at)


def rank_candidates(
    bundle: ModelBundle,
    candidates: list,
    query_uncertainty: np.ndarray,
    *,
    k: int,
    min_confidence: float,
) -> list[dict]:
    """Score, reorder and filter the catalog's candidates for one query.

    `candidates` are `index.catalog.Candidate`s; `query_uncertainty` is the
    query's uncertainty embedding, float32 (du,). Confidence features are
    computed over the full candidate list (the `top_margin` feature compares
    each candidate with the others) before `min_confidence` drops any.
    Results are ordered by introspective distance when the bundle's
    `metric.rerank` is true, else by similarity.
    """
    if not candidates:
        return []
    metric = bundle.metric
    calibration = bundle.calibration
    similarity = np.array([candidate.similarity for candidate in candidates], np.float32)
    item_uncertainty = np.array([candidate.uncertainty for candidate in candidates], np.float32)
    query_scalar = float(uncertainty_scalar(query_uncertainty[None, :])[0])
    if metric.beta_form == "diff":
        vectors = np.stack([np.asarray(candidate.uncertainty_vector, np.float32) for candidate in candidates])
        beta = pair_beta(metric, query_uncertainty, vectors)
    else:
        beta = pair_beta(metric, query_scalar, item_uncertainty)
    distance = introspective_distance(similarity, beta, metric)
    # Unlabelled items form a group of their own, keyed by their id.
    labels = [
        ("label", candidate.item.label) if candidate.item.label is not None else ("id", candidate.item.id)
        for candidate in candidates
    ]
    features = confidence_features(
        similarity, distance, query_scalar, item_uncertainty, calibration.features, labels=labels
    )
    confidence = calibration.predict(features, top=top_candidate_mask(similarity))

    semantic_order = np.argsort(-similarity, kind="stable")
    semantic_rank = np.empty(len(candidates), np.int64)
    semantic_rank[semantic_order] = np.arange(1, len(candidates) + 1)
    order = rerank_order(distance, similarity) if bundle.manifest.metric.rerank else semantic_order

    results = []
    for index in order:
        if confidence[index] < min_confidence:
            continue
        item = candidates[index].item
        results.append(
            {
                "id": item.id,
                "label": item.label,
                "attributes": item.attributes,
                "confidence": float(confidence[index]),
                # float32 dot products of unit vectors can exceed 1 by a few ulps.
                "similarity": min(float(similarity[index]), 1.0),
                "distance": float(distance[index]),
                "semantic_rank": int(semantic_rank[index]),
                "image_url": item_image_url(item.id),
            }
        )
        if len(results) == k:
            break
    return results


def _search_error(error: ValueError, options: SearchOptions) -> Exception:
    """Map a catalog ValueError to the request's error: a 400 when it sent a filter, else the error itself."""
    if not options.filter:
        return error
    return ApiError(400, "invalid_filter", f"filter {json.dumps(options.filter)} is invalid: {error}")


@dataclass
class SearchJob:
    """One query's options for `search_batch`, besides its embedding."""

    options: SearchOptions
    candidates: int
    submitted_at: float  # time.perf_counter() when the request handed its image to the batcher


def search_batch(runtime: ServiceRuntime, embedded: Embeddings, jobs: list[SearchJob]) -> list:
    """Search and rank a batch of embedded queries: one catalog search per distinct filter and candidate count.

    Returns one entry per job: (results, embed_s, search_s, rerank_s), or the
    exception that job's request should raise. `embed_s` runs from submission
    to the end of the model call; `search_s` is the shared search of its group.
    """
    embedded_at = time.perf_counter()
    outputs: list = [None] * len(jobs)
    groups: dict[tuple[str, int], list[int]] = {}
    for row, job in enumerate(jobs):
        key = (json.dumps(job.options.filter, sort_keys=True) if job.options.filter else "", job.candidates)
        groups.setdefault(key, []).append(row)
    for rows in groups.values():
        options, candidates = jobs[rows[0]].options, jobs[rows[0]].candidates
        started = time.perf_counter()
        try:
            found = runtime.catalog.search(
                embedded.embedding[rows], candidates, filter=options.filter or None, model_id=runtime.bundle.model_id
            )
        except ValueError as error:
            for row in rows:
                outputs[row] = _search_error(error, jobs[row].options)
            continue
        search_s = time.perf_counter() - started
        for row, candidates_found in zip(rows, found):
            ranked_at = time.perf_counter()
            job = jobs[row]
            results = rank_candidates(
                runtime.bundle,
                candidates_found,
                embedded.uncertainty[row],
                k=job.options.k,
                min_confidence=job.options.min_confidence,
            )
            outputs[row] = (results, embedded_at - job.submitted_at, search_s, time.perf_counter() - ranked_at)
    return outputs


def _search_alone(runtime: ServiceRuntime, claim, data: bytes, options: SearchOptions, candidates: int):
    """Run the whole query in one worker thread, for a request with a `DirectClaim`."""
    prepared = _decode_and_preprocess(runtime, data)
    job = SearchJob(options, candidates, time.perf_counter())
    embedded = claim.embed(prepared.pixels[None])
    (output,) = search_batch(runtime, embedded, [job])
    if isinstance(output, Exception):
        raise output from None
    return (prepared, embedded.embedding[0], embedded.uncertainty[0]) + output


async def run_search(runtime: ServiceRuntime, data: bytes, options: SearchOptions) -> dict:
    """Search the catalog with one query image; returns the body of a SearchResponse.

    Raises:
        ApiError: the image cannot be decoded (status by `DECODE_STATUS`) or
            the options are out of bounds.
    """
    started = time.perf_counter()
    candidates = resolve_candidates(options, runtime.settings.max_candidates)
    claim = runtime.batcher.claim_direct()
    if claim is not None:
        with claim:
            try:
                prepared, embedding, uncertainty, results, embed_s, search_s, rerank_s = await run_in_thread(
                    runtime.request_executor, _search_alone, runtime, claim, data, options, candidates
                )
            except ImageDecodeError as error:
                raise decode_error(error) from None
    else:
        with runtime.batcher.reserve() as reservation:
            try:
                prepared = await run_in_thread(runtime.request_executor, _decode_and_preprocess, runtime, data)
            except ImageDecodeError as error:
                raise decode_error(error) from None
            job = SearchJob(options, candidates, time.perf_counter())
            embedding, uncertainty, output = await runtime.batcher.submit(prepared.pixels, job, reservation)
        results, embed_s, search_s, rerank_s = output

    query_scalar = float(np.dot(uncertainty, uncertainty))
    stages = {
        "decode": prepared.decode_s,
        "preprocess": prepared.preprocess_s,
        "embed": embed_s,
        "search": search_s,
        "rerank": rerank_s,
    }
    for stage, seconds in stages.items():
        runtime.metrics.stage_children[stage].observe(seconds)
    timings = {stage: round(seconds * 1000, 3) for stage, seconds in stages.items()}
    timings["total"] = round((time.perf_counter() - started) * 1000, 3)
    width, height = prepared.decoded.image.size
    return {
        "model_id": runtime.bundle.model_id,
        "query": {
            "uncertainty": query_scalar,
            "ambiguous": query_scalar > runtime.bundle.manifest.ambiguity.threshold,
            "ambiguity_threshold": runtime.bundle.manifest.ambiguity.threshold,
            "width": width,
            "height": height,
            "format": prepared.decoded.source_format,
            "frames": prepared.decoded.frame_count,
        },
        "results": results,
        "timings_ms": timings,
    }
