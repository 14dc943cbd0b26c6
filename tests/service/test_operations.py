"""Health, readiness, metrics, stats, request ids, logs, the OpenAPI page and the search page."""

from __future__ import annotations

import io
import json
import logging
import time

from fastapi.testclient import TestClient

from index.catalog import Catalog
from service.app import app_factory
from service.logs import JsonFormatter, RequestIdFilter
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS
from tests.service.helpers import image_bytes


def search(client, seed: int = 1, **kwargs):
    return client.post("/search", files={"image": ("q.png", image_bytes(seed), "image/png")}, **kwargs)


def test_healthz(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_model_and_count(filled_client, tiny_bundle):
    body = filled_client.get("/readyz").json()
    assert body == {"status": "ready", "model_id": tiny_bundle.model_id, "count": 4}


def test_readyz_503_before_loading(tiny_bundle, tmp_path):
    """Without the lifespan nothing is loaded: /healthz is 200, /readyz and the API 503."""
    client = TestClient(app_factory(Settings(bundle=tiny_bundle.path, index=tmp_path / "catalog", **TEST_SETTINGS)))
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    assert response.headers["retry-after"] == "1"
    assert client.get("/items").json()["error"]["code"] == "not_ready"


def test_readyz_503_when_catalog_has_other_model(tiny_bundle, other_bundle, tmp_path):
    """A catalog embedded by another model: /healthz stays 200, /readyz and the API return 503 with the reason."""
    Catalog.open(tmp_path / "catalog", other_bundle).close()
    app = app_factory(Settings(bundle=tiny_bundle.path, index=tmp_path / "catalog", **TEST_SETTINGS))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = client.get("/readyz")
            if response.json().get("error", {}).get("code") == "load_failed":
                break
            time.sleep(0.02)
        assert response.status_code == 503
        assert other_bundle.model_id in response.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200
        blocked = search(client)
        assert blocked.status_code == 503
        assert blocked.json()["error"]["code"] == "load_failed"


def test_stats(filled_client, tiny_bundle):
    body = filled_client.get("/stats").json()
    assert body["count"] == 4
    assert body["model_id"] == tiny_bundle.model_id
    assert body["index_type"] == "flat"
    assert {"JPEG", "PNG", "WEBP", "GIF"} <= set(body["formats"])
    assert body["threads"]["onnxruntime_intra_op"] == 1
    assert body["threads"]["faiss_omp"] == 1
    assert body["threads"]["workers"] == 1
    assert body["catalog"]["items"] == 4


def test_metrics_count_requests_stages_and_errors(filled_client):
    search(filled_client)
    filled_client.get("/items/nope")
    filled_client.post("/search", files={"image": ("q.png", b"", "image/png")})
    text = filled_client.get("/metrics").text
    assert 'idml_http_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'idml_http_requests_total{method="GET",route="/items/{item_id}",status="404"}' in text
    assert 'idml_http_request_duration_seconds_count{method="POST",route="/search"}' in text
    for stage in ("decode", "preprocess", "embed", "search", "rerank"):
        assert f'idml_search_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text
    assert 'idml_errors_total{code="item_not_found"} 1.0' in text
    assert 'idml_errors_total{code="empty"} 1.0' in text
    assert "idml_catalog_items 4.0" in text
    assert 'idml_indexed_items_total{status="added"} 4.0' in text
    assert "idml_embed_batch_size_count 1.0" in text


def test_request_id_echoed(app_client):
    response = app_client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    error = app_client.get("/items/x", headers={"X-Request-ID": "abc-456"}).json()["error"]
    assert error["request_id"] == "abc-456"


def test_request_id_generated_when_invalid(app_client):
    response = app_client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["x-request-id"] != "bad id with spaces"
    assert len(response.headers["x-request-id"]) == 32


def test_log_lines_carry_request_id(filled_client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    service_logger = logging.getLogger("service")
    service_logger.addHandler(handler)
    previous = service_logger.level
    service_logger.setLevel(logging.INFO)
    try:
        search(filled_client, headers={"X-Request-ID": "trace-1"})
    finally:
        service_logger.removeHandler(handler)
        service_logger.setLevel(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["message"].startswith("POST /search")]
    assert len(access) == 1
    assert access[0]["request_id"] == "trace-1"
    assert access[0]["status"] == 200
    assert access[0]["route"] == "/search"
    assert access[0]["duration_ms"] > 0


def test_openapi_documents_the_api(app_client):
    schema = app_client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/search", "/index", "/items", "/items/{item_id}", "/items/{item_id}/image", "/jobs/{job_id}",
                 "/stats", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    search_body = paths["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(search_body)
    assert "image_base64" in search_body["application/json"]["schema"]["properties"]
    parameters = {parameter["name"] for parameter in paths["/search"]["post"]["parameters"]}
    assert {"k", "candidates", "min_confidence", "filter"} <= parameters
    assert "SearchResponse" in schema["components"]["schemas"]
    assert app_client.get("/docs").status_code == 200


def test_search_page_served(app_client):
    page = app_client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert app_client.get("/static/index.html").status_code == 200
