"""Fixtures of the service tests: apps over temporary catalogs with the shared tiny bundle."""

from __future__ import annotations

import pytest

from service.testing import running_app
from tests.service.helpers import API_KEY, image_bytes, index_request

# Settings of the test apps: small limits so the limit tests need small uploads.
TEST_SETTINGS = {
    "api_key": API_KEY,
    "max_upload_bytes": 256 * 1024,
    "max_index_upload_bytes": 1024 * 1024,
    "max_pixels": 4_000_000,
    "inline_index_max_items": 4,
    "job_batch_size": 3,
    "batch_window_ms": 5.0,
    "threads": 1,
    "log_format": "text",
}


@pytest.fixture()
def app_client(tiny_bundle, tmp_path):
    """A ready TestClient over an empty catalog, with an API key and small limits."""
    with running_app(tiny_bundle.path, tmp_path / "catalog", **TEST_SETTINGS) as client:
        yield client


@pytest.fixture()
def filled_client(app_client):
    """The app over a catalog of 4 items: a0 and a1 (vendor a), b0 and b1 (vendor b)."""
    entries = [
        ("a0", image_bytes(1), "cat", {"vendor": "a"}),
        ("a1", image_bytes(2), "dog", {"vendor": "a"}),
        ("b0", image_bytes(3), "cat", {"vendor": "b"}),
        ("b1", image_bytes(4), "dog", {"vendor": "b"}),
    ]
    response = index_request(app_client, entries)
    assert response.status_code == 200, response.text
    return app_client
