"""POST /search through the ASGI app: both request forms, ranking, filters and parameters."""

from __future__ import annotations

import base64
import json

import numpy as np

from index.embedder import Embedder
from index.preprocess import preprocess_bytes
from index.scoring import introspective_distance, pair_beta, uncertainty_scalar
from service.testing import running_app
from tests.service.conftest import TEST_SETTINGS
from tests.service.helpers import bundle_variant, image_bytes, index_request


def search_file(client, data: bytes, **params):
    return client.post("/search", params=params, files={"image": ("query.png", data, "image/png")})


def test_search_multipart_finds_same_image(filled_client):
    response = search_file(filled_client, image_bytes(3), k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["id"] == "b0"
    assert body["results"][0]["similarity"] > 0.999
    assert body["results"][0]["similarity"] <= 1.0
    assert body["results"][0]["image_url"] == "/items/b0/image"
    assert body["results"][0]["label"] == "cat"
    assert body["results"][0]["attributes"] == {"vendor": "b"}
    assert len(body["results"]) == 4
    assert set(body["timings_ms"]) == {"decode", "preprocess", "embed", "search", "rerank", "total"}
    assert body["query"]["format"] == "PNG"
    assert (body["query"]["width"], body["query"]["height"]) == (40, 40)
    assert body["query"]["frames"] == 1


def test_search_json_matches_multipart(filled_client):
    data = image_bytes(2)
    by_file = search_file(filled_client, data, k=3).json()
    by_json = filled_client.post("/search", json={"image_base64": base64.b64encode(data).decode(), "k": 3}).json()
    assert [r["id"] for r in by_json["results"]] == [r["id"] for r in by_file["results"]]
    assert by_json["results"][0]["id"] == "a1"
    assert np.allclose([r["confidence"] for r in by_json["results"]], [r["confidence"] for r in by_file["results"]])


def test_search_json_accepts_data_url(filled_client):
    payload = "data:image/png;base64," + base64.b64encode(image_bytes(4)).decode()
    response = filled_client.post("/search", json={"image_base64": payload})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == "b1"


def test_search_json_body_overrides_query(filled_client):
    payload = {"image_base64": base64.b64encode(image_bytes(1)).decode(), "k": 2}
    response = filled_client.post("/search", params={"k": 4}, json=payload)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_search_scores_match_reference(filled_client, tiny_bundle):
    """Distances and order equal a direct computation with the core scoring functions."""
    query = image_bytes(7)
    body = search_file(filled_client, query, k=4).json()

    bundle = tiny_bundle
    embedder = Embedder(bundle, intra_op_threads=1)
    stored = {seed: embedder.embed(preprocess_bytes(image_bytes(seed), bundle.preprocess)[None]) for seed in range(1, 5)}
    ids = {1: "a0", 2: "a1", 3: "b0", 4: "b1"}
    embedded = embedder.embed(preprocess_bytes(query, bundle.preprocess)[None])
    query_u = float(embedded.uncertainty_scalar[0])
    expected = {}
    for seed, item in stored.items():
        similarity = float(item.embedding[0] @ embedded.embedding[0])
        beta = pair_beta(bundle.metric, query_u, uncertainty_scalar(item.uncertainty))
        expected[ids[seed]] = float(introspective_distance(np.array([similarity]), beta, bundle.metric)[0])

    returned = {result["id"]: result["distance"] for result in body["results"]}
    for item_id, distance in expected.items():
        assert abs(returned[item_id] - distance) < 1e-4, item_id
    assert [result["id"] for result in body["results"]] == sorted(expected, key=expected.get)
    assert abs(body["query"]["uncertainty"] - query_u) < 1e-4


def test_search_semantic_rank_is_similarity_order(filled_client):
    results = search_file(filled_client, image_bytes(9), k=4).json()["results"]
    by_similarity = sorted(results, key=lambda result: -result["similarity"])
    assert [result["semantic_rank"] for result in by_similarity] == [1, 2, 3, 4]


def test_search_rerank_flag_decides_order(tiny_bundle, tmp_path):
    """With a small metric scale the uncertainty reorders candidates; rerank=false keeps similarity order."""
    reranking = bundle_variant(tiny_bundle, tmp_path / "rerank", shift=0.0, scale=0.05, rerank=True)
    plain = bundle_variant(tiny_bundle, tmp_path / "plain", shift=0.0, scale=0.05, rerank=False)
    catalog = tmp_path / "catalog"
    with running_app(reranking.path, catalog, **TEST_SETTINGS) as client:
        index_request(client, [(f"i{seed}", image_bytes(seed), None, {}) for seed in range(1, 5)])
        reranked = search_file(client, image_bytes(5), k=4).json()["results"]
    with running_app(plain.path, catalog, **TEST_SETTINGS) as client:
        semantic = search_file(client, image_bytes(5), k=4).json()["results"]

    assert [result["semantic_rank"] for result in semantic] == [1, 2, 3, 4]
    assert [result["semantic_rank"] for result in reranked] != [1, 2, 3, 4]
    distances = [result["distance"] for result in reranked]
    assert distances == sorted(distances)


def test_search_filter_by_attribute(filled_client):
    response = search_file(filled_client, image_bytes(1), k=4, filter=json.dumps({"vendor": "b"}))
    assert response.status_code == 200, response.text
    assert {result["id"] for result in response.json()["results"]} == {"b0", "b1"}


def test_search_filter_by_label_in_json(filled_client):
    payload = {"image_base64": base64.b64encode(image_bytes(1)).decode(), "filter": {"label": "dog"}}
    results = filled_client.post("/search", json=payload).json()["results"]
    assert {result["id"] for result in results} == {"a1", "b1"}


def test_search_filter_matching_nothing(filled_client):
    response = search_file(filled_client, image_bytes(1), filter=json.dumps({"vendor": "zzz"}))
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_search_min_confidence_drops_results(filled_client):
    everything = search_file(filled_client, image_bytes(1), k=4).json()["results"]
    confident = search_file(filled_client, image_bytes(1), k=4, min_confidence=0.5).json()["results"]
    assert [r["id"] for r in confident] == [r["id"] for r in everything if r["confidence"] >= 0.5]
    assert confident[0]["id"] == "a0"
    assert len(confident) < len(everything)


def test_search_confidence_uses_all_candidates(filled_client):
    """top_margin is computed over every candidate, so k=1 gives the top result the same confidence."""
    full = search_file(filled_client, image_bytes(1), k=4).json()["results"]
    single = search_file(filled_client, image_bytes(1), k=1).json()["results"]
    assert len(single) == 1
    assert abs(single[0]["confidence"] - full[0]["confidence"]) < 1e-6


def test_search_k_limits_results(filled_client):
    assert len(search_file(filled_client, image_bytes(1), k=2).json()["results"]) == 2


def test_search_empty_catalog(app_client):
    response = search_file(app_client, image_bytes(1))
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_search_candidates_below_k(filled_client):
    response = search_file(filled_client, image_bytes(1), k=5, candidates=2)
    assert response.status_code == 422
    assert "candidates (2) must be at least k (5)" in response.json()["error"]["message"]


def test_search_candidates_above_limit(filled_client):
    response = search_file(filled_client, image_bytes(1), candidates=5000)
    assert response.status_code == 422
    assert "IDML_MAX_CANDIDATES" in response.json()["error"]["message"]


def test_search_batch_groups_by_filter(filled_client):
    """One batch of queries with different filters and candidate counts: each gets its own results."""
    from service.pipeline import SearchJob, search_batch
    from service.schemas.search import SearchOptions

    runtime = filled_client.app.state.runtime
    pixels = np.stack([preprocess_bytes(image_bytes(seed), runtime.bundle.preprocess) for seed in (1, 3, 1, 2)])
    embedded = runtime.embedder.embed(pixels)
    jobs = [
        SearchJob(SearchOptions(k=4), 4, 0.0),
        SearchJob(SearchOptions(k=4, filter={"vendor": "b"}), 4, 0.0),
        SearchJob(SearchOptions(k=4), 20_000, 0.0),  # above the catalog's k limit: this job alone fails
        SearchJob(SearchOptions(k=2, filter={"label": "dog"}), 4, 0.0),
    ]
    outputs = search_batch(runtime, embedded, jobs)

    everything, vendor_b, too_many, dogs = outputs
    assert [result["id"] for result in everything[0]][0] == "a0"
    assert {result["id"] for result in everything[0]} == {"a0", "a1", "b0", "b1"}
    assert [result["id"] for result in vendor_b[0]][0] == "b0"
    assert {result["id"] for result in vendor_b[0]} == {"b0", "b1"}
    assert isinstance(too_many, ValueError)
    assert {result["id"] for result in dogs[0]} == {"a1", "b1"}


def test_concurrent_searches_with_different_filters(filled_client):
    """Concurrent requests share model calls; each still gets the results of its own filter."""
    from concurrent.futures import ThreadPoolExecutor

    filters = [None, {"vendor": "a"}, {"vendor": "b"}, {"label": "cat"}] * 4

    def one(position: int):
        params = {"k": 4}
        if filters[position] is not None:
            params["filter"] = json.dumps(filters[position])
        return search_file(filled_client, image_bytes(1 + position % 4), **params)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(len(filters))))
    expected = {None: {"a0", "a1", "b0", "b1"}, "a": {"a0", "a1"}, "b": {"b0", "b1"}, "cat": {"a0", "b0"}}
    for position, response in enumerate(responses):
        assert response.status_code == 200, response.text
        chosen = filters[position]
        key = None if chosen is None else next(iter(chosen.values()))
        assert {result["id"] for result in response.json()["results"]} == expected[key]
