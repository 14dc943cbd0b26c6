"""Hostile requests get a 4xx that names the problem, never a 500, and archives cannot exhaust disk, memory or CPU."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from service.logs import KeyValueFormatter, configure_logging
from service.uploads import MAX_MANIFEST_BYTES, MIN_EXPANSION_BYTES, expansion_limit
from service.validation import MAX_FILTER_KEYS, MAX_JSON_DEPTH
from tests.service.helpers import WRITE_HEADERS, image_bytes
from tests.service.test_bad_input import assert_error, search_file
from tests.service.test_indexing import manifest, post_archive, tar_archive, wait_for_job, zip_archive

DEEP = "[" * 5000 + "]" * 5000
# One level past the limit: it parses, and the depth check rejects it.
JUST_TOO_DEEP = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)


def search_json(client, **fields):
    return client.post("/search", json={"image_base64": base64.b64encode(image_bytes(1)).decode(), **fields})


def noise_png(seed: int, side: int) -> bytes:
    """An RGB noise PNG of side x side pixels; PNG cannot compress noise, so it is about 3 * side**2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def stored_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def patch_zip_member(data: bytes, name: str, local_offset: int, central_offset: int, value: bytes) -> bytes:
    """Overwrite the bytes at `local_offset` of `name`'s local header and `central_offset` of its central directory entry."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(name)
        header = info.header_offset
    patched = bytearray(data)
    patched[header + local_offset : header + local_offset + len(value)] = value
    central = patched.find(b"PK\x01\x02")
    while central >= 0:
        name_length = struct.unpack("<H", patched[central + 28 : central + 30])[0]
        if patched[central + 46 : central + 46 + name_length] == name.encode():
            patched[central + central_offset : central + central_offset + len(value)] = value
            break
        central = patched.find(b"PK\x01\x02", central + 4)
    return bytes(patched)


# Nesting deeper than the JSON limit, in each place the API parses JSON.
@pytest.mark.parametrize("nested", [DEEP, JUST_TOO_DEEP], ids=["5000-levels", "limit-plus-one"])
@pytest.mark.parametrize("place", ["search-body", "search-filter", "index-attributes", "index-items"])
def test_deeply_nested_json(app_client, place, nested):
    image = ("images", ("a.png", image_bytes(1), "image/png"))
    if place == "search-body":
        response = app_client.post("/search", content=nested, headers={"Content-Type": "application/json"})
        code, what = "invalid_json", "the request body"
    elif place == "search-filter":
        response = search_file(app_client, image_bytes(1), filter=f'{{"a": {nested}}}')
        code, what = "invalid_filter", "filter"
    elif place == "index-attributes":
        response = app_client.post("/index", files=[image], data={"ids": ["a"], "attributes": [nested]}, headers=WRITE_HEADERS)
        code, what = "invalid_json", "attributes[0]"
    else:
        response = app_client.post("/index", files=[image], data={"items": nested}, headers=WRITE_HEADERS)
        code, what = "invalid_json", "items"
    assert_error(response, 400, code, what, f"more than {MAX_JSON_DEPTH} levels")


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_filter_integer_outside_int64(filled_client, value):
    text = json.dumps({"x": value})
    assert_error(search_file(filled_client, image_bytes(1), filter=text), 400, "invalid_filter", "'x'", "64-bit")
    assert_error(search_json(filled_client, filter={"x": value}), 400, "invalid_filter", "'x'", "64-bit")
    at_limit = search_file(filled_client, image_bytes(1), filter=json.dumps({"x": 2**63 - 1}))
    assert at_limit.status_code == 200, at_limit.text
    assert at_limit.json()["results"] == []


@pytest.mark.parametrize("count", [MAX_FILTER_KEYS + 1, 998])
def test_filter_too_many_keys(filled_client, count):
    text = json.dumps({f"k{i}": "v" for i in range(count)})
    response = search_file(filled_client, image_bytes(1), filter=text)
    assert_error(response, 400, "invalid_filter", f"{count} keys", f"limit of {MAX_FILTER_KEYS}")
    at_limit = search_file(filled_client, image_bytes(1), filter=json.dumps({f"k{i}": "v" for i in range(MAX_FILTER_KEYS)}))
    assert at_limit.status_code == 200, at_limit.text


@pytest.mark.parametrize(("value", "kind"), [({"$ne": 1}, "JSON object"), ([1, 2], "JSON array")])
def test_filter_value_not_scalar(filled_client, value, kind):
    text = json.dumps({"vendor": value})
    for response in (search_file(filled_client, image_bytes(1), filter=text), search_json(filled_client, filter={"vendor": value})):
        error = assert_error(response, 400, "invalid_filter", "'vendor'", "string, number, boolean or null", kind)
        assert error["message"].count("string, number") == 1


@pytest.mark.parametrize("route", ["/items", "/jobs", "/jobs/0123456789abcdef"])
def test_paging_offset_upper_bound(app_client, route):
    response = app_client.get(route, params={"offset": 2**63})
    assert_error(response, 422, "invalid_request", "query.offset", "less than or equal to 1000000000000")
    response = app_client.get(route, params={"offset": 10**12})
    assert response.status_code in (200, 404), response.text


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [("crc", "CRC"), ("encrypted", "encrypted"), ("method", "compression method")],
)
def test_archive_unreadable_zip_member(app_client, damage, fragment):
    """A listed zip member that cannot be decompressed becomes that item's error; the other items are indexed."""
    png = image_bytes(1)
    data = stored_zip({"manifest.csv": b"path,id\na.png,za\nb.png,zb\n", "a.png": png, "b.png": image_bytes(2)})
    if damage == "crc":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            start = archive.getinfo("a.png").header_offset + 30 + len("a.png")
        patched = bytearray(data)
        patched[start + 100] ^= 0xFF
        data = bytes(patched)
    elif damage == "encrypted":
        data = patch_zip_member(data, "a.png", 6, 8, b"\x01\x00")
    else:
        data = patch_zip_member(data, "a.png", 8, 10, struct.pack("<H", 97))

    response = post_archive(app_client, "upload.zip", data)
    assert response.status_code == 202, response.text
    job = wait_for_job(app_client, response.json()["job_id"])
    outcomes = {item["id"]: item for item in job["items"]}
    assert outcomes["za"]["status"] == "error"
    assert outcomes["za"]["reason"] == "unreadable_file"
    assert "a.png cannot be extracted" in outcomes["za"]["error"]
    assert fragment in outcomes["za"]["error"]
    assert outcomes["zb"]["status"] == "added"


def test_archive_repeated_member_spooled_once(app_client):
    """Rows that list one member share one spooled file, so they do not count against the byte limit once per row."""
    big = noise_png(7, 250)  # about 190 KB, under the test's 256 KiB item limit
    assert 150_000 < len(big) < 256 * 1024
    rows = "".join(f"one.png,rep-{i}\n" for i in range(10))  # 10 copies would be 1.9 MB, over the 1 MiB limit
    data = zip_archive({"manifest.csv": ("path,id\n" + rows).encode(), "one.png": big})
    response = post_archive(app_client, "upload.zip", data)
    assert response.status_code == 202, response.text
    job = wait_for_job(app_client, response.json()["job_id"])
    assert job["counts"] == {"added": 10, "replaced": 0, "error": 0}
    assert app_client.get("/items/rep-9/image").content == big

    distinct = {f"{i}.png": noise_png(10 + i, 250) for i in range(6)}  # 1.1 MB of distinct members
    listing = "".join(f"{name},dist-{name}\n" for name in distinct)
    response = post_archive(app_client, "upload.zip", zip_archive({"manifest.csv": ("path,id\n" + listing).encode(), **distinct}))
    assert_error(response, 413, "too_large", "1048576 bytes", "IDML_MAX_INDEX_UPLOAD_BYTES")


def test_archive_manifests_checked_before_reading(app_client):
    """Several or oversized manifest.csv files are rejected from the archive's listing, without reading them."""
    unreadable = stored_zip({"d1/manifest.csv": b"path,id\n", "d2/manifest.csv": b"path,id\n"})
    for name in ("d1/manifest.csv", "d2/manifest.csv"):  # any read would raise NotImplementedError
        unreadable = patch_zip_member(unreadable, name, 8, 10, struct.pack("<H", 97))
    response = post_archive(app_client, "upload.zip", unreadable)
    assert_error(response, 422, "invalid_manifest", "2 manifest.csv files in subfolders")

    # zipfile warns on duplicate names, so the two root manifests come in a tar ("./" is normalised away).
    tar = tar_archive({"manifest.csv": b"path,id\na.png,x\n", "./manifest.csv": b"path,id\na.png,y\n", "a.png": image_bytes(1)})
    assert_error(post_archive(app_client, "upload.tar.gz", tar), 422, "invalid_manifest", "2 manifest.csv entries at its root")

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.csv", b"path,id\n" + b"#" * MAX_MANIFEST_BYTES)
    assert len(buffer.getvalue()) < 1024 * 1024
    response = post_archive(app_client, "upload.zip", buffer.getvalue())
    assert_error(response, 413, "too_large", "manifest.csv", f"{MAX_MANIFEST_BYTES} bytes")


def test_archive_decompression_bomb(app_client):
    """A tar whose unlisted member decompresses past the limit is rejected; the limit follows the archive's size."""
    files = {"manifest.csv": b"path,id\na.png,bomb-a\n", "a.png": image_bytes(1), "padding.bin": bytes(2 * 1024 * 1024)}
    data = tar_archive(files)
    assert len(data) < 64 * 1024
    response = post_archive(app_client, "upload.tar.gz", data)
    assert_error(response, 413, "too_large", "decompresses to more than 1048576 bytes")
    assert app_client.get("/jobs").json()["total"] == 0

    gib = 1024**3
    assert expansion_limit(3_600, gib) == MIN_EXPANSION_BYTES
    assert expansion_limit(1024**2, gib) == 100 * 1024**2
    assert expansion_limit(100 * 1024**2, gib) == gib


def test_search_two_image_parts(app_client):
    files = [("image", ("a.png", image_bytes(1), "image/png")), ("image", ("b.png", image_bytes(2), "image/png"))]
    response = app_client.post("/search", files=files)
    assert_error(response, 422, "invalid_request", "'image' was sent 2 times", "one query image")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", True, "valid integer"),
        ("k", 2.0, "valid integer"),
        ("candidates", True, "valid integer"),
        ("min_confidence", True, "valid number"),
    ],
)
def test_search_json_numbers_strict(filled_client, field, value, message):
    assert_error(search_json(filled_client, **{field: value}), 422, "invalid_request", f"body.{field}", message)


def test_search_json_body_overrides_query(filled_client):
    payload = {"image_base64": base64.b64encode(image_bytes(1)).decode(), "k": 2}
    response = filled_client.post("/search", params={"k": 500}, json=payload)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2

    response = filled_client.post("/search", params={"k": 500}, json={"image_base64": payload["image_base64"]})
    assert_error(response, 422, "invalid_request", "query.k", "100")


@pytest.mark.parametrize(("item_id", "url"), [(".", "/items/%2E/image"), ("..", "/items/%2E%2E/image")])
def test_dot_ids_get_encoded_image_url(app_client, item_id, url):
    data = image_bytes(3)
    response = app_client.post(
        "/index", files=[("images", ("a.png", data, "image/png"))], data={"ids": [item_id]}, headers=WRITE_HEADERS
    )
    assert response.status_code == 200, response.text
    item = app_client.get("/items/" + url.split("/")[2]).json()
    assert item["id"] == item_id
    assert item["image_url"] == url
    assert app_client.get(url).content == data
    results = search_file(app_client, data).json()["results"]
    assert results[0]["image_url"] == url


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("upload.zip", zip_archive({"manifest.csv": b"path,id\na.png,t\n", "a.png": image_bytes(1)})[:-30]),
        ("upload.tar.gz", tar_archive({"manifest.csv": b"path,id\na.png,t\n", "a.png": noise_png(1, 60)})[:6000]),
    ],
    ids=["zip", "tar.gz"],
)
def test_truncated_archive_is_corrupt(app_client, name, data):
    response = post_archive(app_client, name, data)
    assert_error(response, 422, "corrupt_archive", "cannot be read")
    assert app_client.get("/jobs").json()["total"] == 0


def test_api_docs_need_no_internet(app_client):
    for page in ("/docs", "/redoc"):
        response = app_client.get(page)
        assert response.status_code == 200
        html = response.text
        assert "http://" not in html, html
        assert "https://" not in html, html
        assert "//cdn" not in html, html
    docs = app_client.get("/docs").text
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png"):
        assert asset in docs
        assert app_client.get(asset).status_code == 200
    assert app_client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_image_if_none_match(filled_client):
    first = filled_client.get("/items/a0/image")
    etag = first.headers["etag"]
    cached = filled_client.get("/items/a0/image", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == etag
    assert filled_client.get("/items/a0/image", headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    changed = filled_client.get("/items/a0/image", headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200
    assert changed.content == first.content


def test_logging_drops_uvicorn_color_and_faiss_info():
    record = logging.makeLogRecord(
        {"name": "uvicorn.error", "levelno": logging.INFO, "levelname": "INFO", "msg": "Started server process",
         "color_message": "Started server process [\x1b[36m%d\x1b[0m]"}
    )
    line = KeyValueFormatter().format(record)
    assert "Started server process" in line
    assert "color_message" not in line
    assert "\x1b" not in line

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    faiss_logger = logging.getLogger("faiss.loader")
    faiss_level = faiss_logger.level
    try:
        configure_logging("info", "text")
        assert faiss_logger.getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        faiss_logger.setLevel(faiss_level)


# json.loads would keep the last of two equal keys, so each place that parses JSON rejects them.
@pytest.mark.parametrize("place", ["search-body", "search-filter", "index-attributes", "index-items"])
def test_duplicate_json_keys(app_client, place):
    image = ("images", ("a.png", image_bytes(1), "image/png"))
    encoded = base64.b64encode(image_bytes(1)).decode()
    if place == "search-body":
        body = f'{{"image_base64": "{encoded}", "k": 1, "k": 5}}'
        response = app_client.post("/search", content=body, headers={"Content-Type": "application/json"})
        code, what, key = "invalid_json", "the request body", "'k'"
    elif place == "search-filter":
        response = search_file(app_client, image_bytes(1), filter='{"vendor": "a", "vendor": "b"}')
        code, what, key = "invalid_filter", "filter", "'vendor'"
    elif place == "index-attributes":
        attributes = '{"shop": {"name": "x", "name": "y"}}'
        response = app_client.post("/index", files=[image], data={"ids": ["a"], "attributes": [attributes]},
                                   headers=WRITE_HEADERS)
        code, what, key = "invalid_json", "attributes[0]", "'name'"
    else:
        items = '[{"id": "a", "id": "b"}]'
        response = app_client.post("/index", files=[image], data={"items": items}, headers=WRITE_HEADERS)
        code, what, key = "invalid_json", "items", "'id'"
    assert_error(response, 400, code, what, key, "twice")
    assert app_client.get("/items").json()["items"] == []
