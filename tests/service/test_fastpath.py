"""The POST /search fast path: its parsers, and the same responses as the FastAPI route for every request shape."""

from __future__ import annotations

import base64
import json

import pytest

from service.fastpath import multipart_boundary, query_values, single_image_part
from service.testing import running_app
from tests.service.conftest import TEST_SETTINGS
from tests.service.helpers import API_KEY, image_bytes, index_request


def _part(name: str = "image", filename: str | None = "q.png", data: bytes = b"DATA", extra: bytes = b"") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"Content-Disposition: {disposition}\r\n".encode() + extra + b"\r\n" + data


def _body(*parts: bytes, boundary: bytes = b"XyZ", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    body = preamble
    for part in parts:
        body += b"--" + boundary + b"\r\n" + part + b"\r\n"
    return body + b"--" + boundary + b"--" + epilogue


@pytest.mark.parametrize(
    "header, expected",
    [
        ("multipart/form-data; boundary=XyZ", "XyZ"),
        ('multipart/form-data; boundary="a b:c"', "a b:c"),
        ("Multipart/Form-Data;boundary=XyZ", "XyZ"),
        ("multipart/form-data", None),
        ("multipart/mixed; boundary=XyZ", None),
        ("application/json", None),
        ("multipart/form-data; boundary=" + "b" * 71, None),
        ("multipart/form-data; boundary=XyZ; boundary=other", None),
        ('multipart/form-data; boundary="esc\\"aped"', None),
    ],
)
def test_multipart_boundary(header, expected):
    assert multipart_boundary(header) == expected


def test_single_image_part_returns_the_exact_content():
    data = b"\x89PNG\r\n--Xy\r\n--X\r\n\r\nXyZ--"
    assert single_image_part(_body(_part(data=data)), "XyZ") == data
    assert single_image_part(_body(_part(data=b"")), "XyZ") == b""
    typed = _part(data=b"abc", extra=b"Content-Type: image/png\r\n")
    assert single_image_part(_body(typed, epilogue=b"\r\nignored"), "XyZ") == b"abc"


@pytest.mark.parametrize(
    "body",
    [
        _body(_part(), preamble=b"preamble\r\n"),
        _body(_part(), _part(name="other")),
        _body(_part(filename=None)),
        _body(_part(filename="")),
        _body(_part(name="images")),
        _body(_part(extra=b"Content-Transfer-Encoding: base64\r\n")),
        _body(_part(extra=b"Content-Type : image/png\r\n")),
        _body(_part(extra=b" Content-Type: image/png\r\n")),
        _body(_part()).removesuffix(b"--XyZ--"),
        _body(_part(), boundary=b"Other"),
        _body(_part(data=b"a\r\n--XyZ-b")),
        b"",
    ],
    ids=["preamble", "two-parts", "text-field", "empty-filename", "other-name", "unknown-header",
         "space-before-colon", "space-before-name", "unclosed",
         "other-boundary", "boundary-in-content", "empty"],
)
def test_single_image_part_refuses_other_layouts(body):
    assert single_image_part(body, "XyZ") is None


@pytest.mark.parametrize(
    "query, expected",
    [
        (b"", {}),
        (b"k=5&candidates=60&min_confidence=0.25", {"k": 5, "candidates": 60, "min_confidence": 0.25}),
        (b"min_confidence=.5", {"min_confidence": 0.5}),
        (b"filter=%7B%22vendor%22%3A%22a%22%7D", {"filter": '{"vendor":"a"}'}),
        (b"filter=", {"filter": ""}),
        (b"k=5&k=6", None),
        (b"kk=5", None),
        (b"k=%2B5", None),
        (b"k=", None),
        (b"k=5.0", None),
        (b"min_confidence=nan", None),
        (b"min_confidence=1e-1", None),
    ],
)
def test_query_values(query, expected):
    assert query_values(query) == expected


def _multipart(data: bytes, boundary: str = "XyZ") -> tuple[bytes, dict]:
    body = _body(_part(data=data), boundary=boundary.encode())
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _requests() -> list[tuple[str, dict]]:
    """Requests of every shape that must get the same response on both paths: (name, httpx arguments)."""
    query_image = image_bytes(2, size=(48, 40))
    ok_body, ok_headers = _multipart(query_image)
    over_limit = b"x" * (TEST_SETTINGS["max_upload_bytes"] + 1)
    cases = {
        "plain": {"content": ok_body, "headers": ok_headers},
        "params": {"content": ok_body, "headers": ok_headers, "params": {"k": "2", "candidates": "3", "min_confidence": "0.1"}},
        "filter": {"content": ok_body, "headers": ok_headers, "params": {"filter": json.dumps({"vendor": "b"})}},
        "quoted-boundary": {"content": _multipart(query_image, "a b")[0],
                            "headers": {"Content-Type": 'multipart/form-data; boundary="a b"'}},
        "httpx-form": {"files": {"image": ("q.png", query_image, "image/png")}},
        "k-too-large": {"content": ok_body, "headers": ok_headers, "params": {"k": "101"}},
        "k-zero": {"content": ok_body, "headers": ok_headers, "params": {"k": "0"}},
        "k-not-integer": {"content": ok_body, "headers": ok_headers, "params": {"k": "two"}},
        "k-repeated": {"content": ok_body, "headers": ok_headers, "params": [("k", "2"), ("k", "3")]},
        "unknown-parameter": {"content": ok_body, "headers": ok_headers, "params": {"kk": "2"}},
        "nan-confidence": {"content": ok_body, "headers": ok_headers, "params": {"min_confidence": "nan"}},
        "bad-filter": {"content": ok_body, "headers": ok_headers, "params": {"filter": "{nope"}},
        "candidates-above-limit": {"content": ok_body, "headers": ok_headers, "params": {"candidates": "100000"}},
        "empty-image": {"content": _multipart(b"")[0], "headers": ok_headers},
        "not-an-image": {"content": _multipart(b"plain text")[0], "headers": ok_headers},
        "truncated": {"content": _multipart(query_image[:60])[0], "headers": ok_headers},
        "two-images": {"files": [("image", ("a.png", query_image, "image/png")), ("image", ("b.png", query_image, "image/png"))]},
        "text-field": {"content": _body(_part(filename=None, data=b"abc")), "headers": ok_headers},
        "extra-field": {"files": {"image": ("q.png", query_image, "image/png")}, "data": {"k": "3"}},
        "missing-image": {"files": {"other": ("q.png", query_image, "image/png")}},
        "broken-multipart": {"content": b"--XyZ\r\ngarbage", "headers": ok_headers},
        "space-before-colon": {"content": _body(_part(data=query_image, extra=b"Content-Type : image/png\r\n")),
                               "headers": ok_headers},
        "no-boundary": {"content": ok_body, "headers": {"Content-Type": "multipart/form-data"}},
        "json": {"json": {"image_base64": base64.b64encode(query_image).decode(), "k": 2}},
        "too-large-declared": {"content": _multipart(over_limit)[0], "headers": ok_headers},
        "too-large-streamed": {"content": iter([_multipart(over_limit)[0]]), "headers": ok_headers},
    }
    return list(cases.items())


def _comparable(response) -> tuple[int, object]:
    body = response.json()
    if "timings_ms" in body:
        body["timings_ms"] = sorted(body["timings_ms"])
    if "error" in body:
        body["error"].pop("request_id")
    return response.status_code, body


def test_fast_path_answers_like_the_route(tiny_bundle, tmp_path):
    catalog = tmp_path / "catalog"
    answers = {}
    for fast in (True, False):
        with running_app(tiny_bundle.path, catalog, **TEST_SETTINGS, search_fast_path=fast) as client:
            if fast:
                entries = [(f"{vendor}{n}", image_bytes(n + 1), "cat", {"vendor": vendor}) for n in range(2) for vendor in "ab"]
                assert index_request(client, entries).status_code == 200
            for name, arguments in _requests():
                answers[name, fast] = _comparable(client.post("/search", **arguments))
            metrics = client.get("/metrics").text
            assert 'idml_http_requests_total{method="POST",route="/search",status="200"}' in metrics
    for name, _ in _requests():
        assert answers[name, True] == answers[name, False], name
    statuses = {name: answers[name, True][0] for name, _ in _requests()}
    assert statuses["plain"] == statuses["params"] == statuses["filter"] == statuses["quoted-boundary"] == 200
    assert statuses["k-too-large"] == statuses["text-field"] == statuses["two-images"] == 422
    assert statuses["empty-image"] == statuses["not-an-image"] == 400
    assert statuses["too-large-declared"] == statuses["too-large-streamed"] == 413
    assert answers["params", True][1]["results"]
    assert len(answers["params", True][1]["results"]) <= 2
    assert {result["attributes"]["vendor"] for result in answers["filter", True][1]["results"]} == {"b"}


def test_fast_path_checks_the_read_key(tiny_bundle, tmp_path):
    body, headers = _multipart(image_bytes(1))
    with running_app(tiny_bundle.path, tmp_path / "catalog", **TEST_SETTINGS, read_key_required=True) as client:
        refused = client.post("/search", content=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "missing_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/search", content=body, headers={**headers, "X-API-Key": "x" * 24})
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        allowed = client.post("/search", content=body, headers={**headers, "Authorization": f"Bearer {API_KEY}"})
        assert allowed.status_code == 200, allowed.text
