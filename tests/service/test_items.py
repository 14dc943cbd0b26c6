"""The /items resource: read, page, fetch originals, delete."""

from __future__ import annotations

from tests.service.helpers import WRITE_HEADERS, image_bytes, index_request


def test_get_item(filled_client):
    response = filled_client.get("/items/a1")
    assert response.status_code == 200, response.text
    item = response.json()
    assert item["id"] == "a1"
    assert item["label"] == "dog"
    assert item["attributes"] == {"vendor": "a"}
    assert item["image_url"] == "/items/a1/image"
    assert len(item["content_hash"]) == 64
    assert item["uncertainty"] > 0


def test_get_item_image_returns_original(filled_client):
    response = filled_client.get("/items/b0/image")
    assert response.status_code == 200
    assert response.content == image_bytes(3)
    assert response.headers["content-type"] == "image/png"
    assert response.headers["etag"].strip('"') == filled_client.get("/items/b0").json()["content_hash"]


def test_item_id_with_space_and_unicode(app_client):
    item_id = "grinning face 😀"
    response = index_request(app_client, [(item_id, image_bytes(8), None, {})])
    assert response.status_code == 200, response.text
    result = app_client.post("/search", files={"image": ("q.png", image_bytes(8), "image/png")}).json()["results"][0]
    assert result["id"] == item_id
    assert app_client.get(result["image_url"]).content == image_bytes(8)


def test_item_id_with_slashes(app_client):
    """idml-index uses relative paths as ids, so ids with "/" work in every item route."""
    item_id = "1f680/google.png"
    assert index_request(app_client, [(item_id, image_bytes(9), None, {})]).status_code == 200
    result = app_client.post("/search", files={"image": ("q.png", image_bytes(9), "image/png")}).json()["results"][0]
    assert result["id"] == item_id
    assert result["image_url"] == "/items/1f680%2Fgoogle.png/image"
    assert app_client.get(result["image_url"]).content == image_bytes(9)
    assert app_client.get("/items/1f680/google.png/image").content == image_bytes(9)
    assert app_client.get("/items/1f680/google.png").json()["id"] == item_id
    assert app_client.delete("/items/1f680/google.png", headers=WRITE_HEADERS).status_code == 204
    assert app_client.get("/items/1f680/google.png").status_code == 404


def test_list_items_pages(filled_client):
    first = filled_client.get("/items", params={"limit": 3}).json()
    second = filled_client.get("/items", params={"offset": 3, "limit": 3}).json()
    assert first["total"] == 4
    assert (first["offset"], first["limit"]) == (0, 3)
    assert len(first["items"]) == 3
    assert len(second["items"]) == 1
    ids = [item["id"] for item in first["items"] + second["items"]]
    assert sorted(ids) == ["a0", "a1", "b0", "b1"]


def test_list_items_past_end(filled_client):
    page = filled_client.get("/items", params={"offset": 10}).json()
    assert page["items"] == []
    assert page["total"] == 4


def test_delete_item(filled_client):
    response = filled_client.delete("/items/a0", headers=WRITE_HEADERS)
    assert response.status_code == 204
    assert filled_client.get("/items/a0").status_code == 404
    assert filled_client.get("/items/a0/image").status_code == 404
    assert filled_client.get("/stats").json()["count"] == 3
    results = filled_client.post("/search", files={"image": ("q.png", image_bytes(1), "image/png")}).json()["results"]
    assert "a0" not in {result["id"] for result in results}


def test_replace_item_by_id(filled_client):
    before = filled_client.get("/items/a0").json()
    response = index_request(filled_client, [("a0", image_bytes(20), "bird", {"vendor": "c"})])
    assert response.json()["items"][0]["status"] == "replaced"
    after = filled_client.get("/items/a0").json()
    assert after["label"] == "bird"
    assert after["content_hash"] != before["content_hash"]
    assert filled_client.get("/stats").json()["count"] == 4
