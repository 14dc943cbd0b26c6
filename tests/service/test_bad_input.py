"""Bad input gets a clear 4xx error body naming the problem, never a 500; odd but valid images work."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.service.helpers import image_bytes


def search_file(client, data: bytes, **params):
    return client.post("/search", params=params, files={"image": ("query", data, "application/octet-stream")})


def assert_error(response, status: int, code: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for fragment in fragments:
        assert fragment in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk is rewritten to declare width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # the IHDR chunk follows the 8-byte signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def test_empty_image(app_client):
    assert_error(search_file(app_client, b""), 400, "empty", "image", "empty")


def test_non_image_bytes(app_client):
    assert_error(search_file(app_client, b"hello, this is text"), 400, "not_an_image", "not an image")


def test_truncated_image(app_client):
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert_error(search_file(app_client, data[: len(data) // 2]), 422, "truncated", "truncated")


def test_corrupt_image(app_client):
    data = bytearray(image_bytes(1, size=(64, 64), fmt="JPEG"))
    data[200:400] = b"\x00" * 200  # destroys entropy-coded data after the headers
    response = search_file(app_client, bytes(data[:300]))
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] in ("truncated", "corrupt")


def test_decompression_bomb_rejected_from_header(app_client):
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    assert_error(search_file(app_client, bomb), 413, "too_many_pixels", "4000000 pixels")


def test_image_over_pixel_limit(app_client):
    """5000 x 5000 is below Pillow's own bomb check but above the server's IDML_MAX_PIXELS of 4,000,000."""
    response = search_file(app_client, png_declaring(5000, 5000))
    assert_error(response, 413, "too_many_pixels", "5000x5000", "4000000")


def test_upload_over_limit(app_client):
    data = b"\0" * (300 * 1024)
    assert_error(search_file(app_client, data), 413, "too_large", "262144 bytes", "IDML_MAX_UPLOAD_BYTES")


def test_upload_over_limit_without_length(app_client):
    """A chunked body has no Content-Length: the bytes are counted as they stream in."""
    sent = []

    def chunks():
        for _ in range(64):
            sent.append(1)
            yield b"x" * 16384

    response = app_client.post(
        "/search",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
    )
    error = assert_error(response, 413, "too_large", "exceeds the limit of 262144 bytes")
    assert "IDML_MAX_UPLOAD_BYTES" in error["message"]


def test_unsupported_format(app_client):
    data = image_bytes(1, fmt="PPM")
    assert_error(search_file(app_client, data), 415, "unsupported_format", "PPM", "PNG")


def test_animated_gif_uses_first_frame(filled_client):
    first = Image.open(io.BytesIO(image_bytes(1))).convert("RGB")
    second = Image.open(io.BytesIO(image_bytes(4))).convert("RGB")
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    response = search_file(filled_client, buffer.getvalue(), k=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["frames"] == 2
    assert body["query"]["format"] == "GIF"
    assert body["results"][0]["id"] == "a0"


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
     ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_every_pillow_mode(filled_client, mode, fmt):
    data = image_bytes(2, mode=mode, fmt=fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith(mode[0])
    response = search_file(filled_client, data, k=1)
    assert response.status_code == 200, response.text
    assert response.json()["results"]


def test_palette_with_transparency(filled_client):
    image = Image.open(io.BytesIO(image_bytes(3))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(buffer.getvalue())).info
    response = search_file(filled_client, buffer.getvalue(), k=1)
    assert response.status_code == 200, response.text


def test_exif_orientation_applied(app_client):
    image = Image.open(io.BytesIO(image_bytes(1, size=(60, 30)))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    response = search_file(app_client, buffer.getvalue())
    assert response.status_code == 200, response.text
    query = response.json()["query"]
    assert (query["width"], query["height"]) == (30, 60)


def test_malformed_json(app_client):
    response = app_client.post("/search", content=b'{"image_base64": ', headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json", "not valid JSON")


def test_json_not_an_object(app_client):
    assert_error(app_client.post("/search", json=["x"]), 422, "invalid_request", "image_base64")


def test_malformed_base64(app_client):
    response = app_client.post("/search", json={"image_base64": "not base64!!"})
    assert_error(response, 400, "invalid_base64", "image_base64")


def test_json_missing_image(app_client):
    assert_error(app_client.post("/search", json={"k": 3}), 422, "invalid_request", "body.image_base64", "required")


def test_json_unknown_field(app_client):
    payload = {"image_base64": base64.b64encode(image_bytes(1)).decode(), "kk": 3}
    assert_error(app_client.post("/search", json=payload), 422, "invalid_request", "body.kk")


def test_multipart_missing_image(app_client):
    response = app_client.post("/search", files={"picture": ("q.png", image_bytes(1), "image/png")})
    assert_error(response, 422, "invalid_request", "'picture'", "query string")


def test_multipart_image_as_text(app_client):
    response = app_client.post("/search", files={"image": (None, b"abc")})
    assert_error(response, 422, "invalid_request", "'image' must be a file")


def test_multipart_without_any_field(app_client):
    response = app_client.post(
        "/search", content=b"--abc--\r\n", headers={"Content-Type": "multipart/form-data; boundary=abc"}
    )
    assert_error(response, 422, "missing_field", "'image' is missing")


@pytest.mark.parametrize("k", [0, 101, -1])
def test_k_out_of_range(app_client, k):
    response = search_file(app_client, image_bytes(1), k=k)
    assert_error(response, 422, "invalid_request", "query.k")


def test_k_out_of_range_in_json(app_client):
    payload = {"image_base64": base64.b64encode(image_bytes(1)).decode(), "k": 500}
    assert_error(app_client.post("/search", json=payload), 422, "invalid_request", "body.k", "100")


def test_min_confidence_out_of_range(app_client):
    assert_error(search_file(app_client, image_bytes(1), min_confidence=1.5), 422, "invalid_request", "min_confidence")


def test_min_confidence_nan(app_client):
    response = search_file(app_client, image_bytes(1), min_confidence="nan")
    assert_error(response, 422, "invalid_request", "min_confidence", "finite")


def test_unsupported_content_type(app_client):
    response = app_client.post("/search", content=image_bytes(1), headers={"Content-Type": "image/png"})
    assert_error(response, 415, "unsupported_media_type", "image/png", "multipart/form-data")


def test_filter_not_json(app_client):
    assert_error(search_file(app_client, image_bytes(1), filter="{vendor"), 400, "invalid_filter", "not valid JSON")


def test_filter_not_object(app_client):
    assert_error(search_file(app_client, image_bytes(1), filter="[1]"), 400, "invalid_filter", "JSON object")


def test_filter_bad_key(filled_client):
    response = search_file(filled_client, image_bytes(1), filter='{"a\\"b": "x"}')
    assert_error(response, 400, "invalid_filter", "double quotes")


def test_unknown_item_ids(filled_client):
    assert_error(filled_client.get("/items/nope"), 404, "item_not_found", "'nope'")
    assert_error(filled_client.get("/items/nope/image"), 404, "item_not_found", "'nope'")
    response = filled_client.delete("/items/nope", headers={"X-API-Key": "test-key-0123456789abcdef"})
    assert_error(response, 404, "item_not_found", "'nope'")


def test_unknown_route(app_client):
    assert_error(app_client.get("/nothing-here"), 404, "not_found", "/nothing-here")


def test_wrong_method(app_client):
    assert_error(app_client.get("/search"), 405, "method_not_allowed", "GET")


def test_unknown_job(app_client):
    assert_error(app_client.get("/jobs/abc"), 404, "job_not_found", "'abc'")


def test_paging_out_of_range(app_client):
    assert_error(app_client.get("/items", params={"limit": 0}), 422, "invalid_request", "query.limit")
    assert_error(app_client.get("/items", params={"offset": -1}), 422, "invalid_request", "query.offset")
