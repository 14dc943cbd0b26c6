"""API keys: writes always need one, reads only when IDML_READ_KEY_REQUIRED is true."""

from __future__ import annotations

import logging

from service.testing import running_app
from tests.service.conftest import TEST_SETTINGS
from tests.service.helpers import API_KEY, image_bytes, index_request


def search(client, headers=None):
    return client.post("/search", files={"image": ("q.png", image_bytes(1), "image/png")}, headers=headers or {})


def test_write_without_key(app_client):
    response = index_request(app_client, [("a", image_bytes(1), None, {})], headers={})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert "X-API-Key" in response.json()["error"]["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_write_with_wrong_key(app_client):
    response = index_request(app_client, [("a", image_bytes(1), None, {})], headers={"X-API-Key": "wrong-key-0000000000"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert app_client.get("/stats").json()["count"] == 0


def test_write_with_bearer_token(app_client):
    response = index_request(app_client, [("a", image_bytes(1), None, {})], headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text


def test_delete_needs_key(filled_client):
    assert filled_client.delete("/items/a0").status_code == 401
    assert filled_client.delete("/items/a0", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert filled_client.get("/items/a0").status_code == 200


def test_reads_open_by_default(filled_client):
    assert search(filled_client).status_code == 200
    assert filled_client.get("/items").status_code == 200
    assert filled_client.get("/metrics").status_code == 200


def test_writes_disabled_without_configured_key(tiny_bundle, tmp_path):
    settings = {**TEST_SETTINGS, "api_key": None}
    with running_app(tiny_bundle.path, tmp_path / "catalog", **settings) as client:
        response = index_request(client, [("a", image_bytes(1), None, {})], headers={"X-API-Key": "anything-at-all-123"})
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "writes_disabled"
        assert "IDML_API_KEY" in error["message"]
        assert "IDML_ALLOW_UNAUTHENTICATED_WRITES" in error["message"]
        assert client.delete("/items/a").status_code == 403


def test_unauthenticated_writes_when_allowed(tiny_bundle, tmp_path):
    settings = {**TEST_SETTINGS, "api_key": None, "allow_unauthenticated_writes": True}
    with running_app(tiny_bundle.path, tmp_path / "catalog", **settings) as client:
        assert index_request(client, [("a", image_bytes(1), None, {})], headers={}).status_code == 200
        assert client.delete("/items/a").status_code == 204


def test_read_key_required(tiny_bundle, tmp_path):
    settings = {**TEST_SETTINGS, "read_key_required": True}
    with running_app(tiny_bundle.path, tmp_path / "catalog", **settings) as client:
        for response in (search(client), client.get("/items"), client.get("/stats"), client.get("/metrics"),
                         client.get("/jobs")):
            assert response.status_code == 401, response.request.url
        assert search(client, {"X-API-Key": API_KEY}).status_code == 200
        assert client.get("/items", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_key_never_logged(app_client, caplog):
    caplog.set_level(logging.DEBUG)
    index_request(app_client, [("a", image_bytes(1), None, {})])
    index_request(app_client, [("b", image_bytes(2), None, {})], headers={"X-API-Key": "wrong-key-0000000000"})
    assert caplog.records
    assert API_KEY not in caplog.text
    assert "wrong-key-0000000000" not in caplog.text
