"""The service on the Milvus backend: IDML_MILVUS_URI switches the catalog's vector store."""

import importlib.util

import pytest

from service.testing import running_app
from tests.bundle_factory import make_bundle, make_image_bytes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pymilvus") is None or importlib.util.find_spec("milvus_lite") is None,
    reason="pymilvus and milvus-lite are not installed (pip install '.[milvus-lite]')",
)


def test_search_through_milvus_lite(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle")
    monkeypatch.setenv("IDML_MILVUS_URI", str(tmp_path / "milvus.db"))
    monkeypatch.setenv("IDML_MILVUS_INDEX_TYPE", "FLAT")  # Milvus Lite builds FLAT, IVF_FLAT and AUTOINDEX only
    key = "milvus-service-test-key"
    with running_app(bundle.path, tmp_path / "catalog", api_key=key) as client:
        files = [("images", (f"{i}.png", make_image_bytes(i), "image/png")) for i in range(6)]
        data = {"ids": [f"item-{i}" for i in range(6)], "labels": ["a", "a", "b", "b", "c", "c"]}
        response = client.post("/index", files=files, data=data, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text

        stats = client.get("/stats").json()
        assert stats["count"] == 6

        query = make_image_bytes(3)
        result = client.post("/search?k=3", files={"image": ("q.png", query, "image/png")}).json()
        assert result["results"][0]["id"] == "item-3"
        assert result["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)

        filtered = client.post(
            "/search?k=3", files={"image": ("q.png", query, "image/png")}, data={}, params={"filter": '{"label": "a"}'}
        ).json()
        assert {item["label"] for item in filtered["results"]} == {"a"}
