"""The service as users run it: idml-serve in a uvicorn process on 127.0.0.1 and a free port."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.testing import ServerProcess
from tests.service.helpers import API_KEY, WRITE_HEADERS, image_bytes

SERVER_ENV = {
    "API_KEY": API_KEY,
    "MAX_UPLOAD_BYTES": 256 * 1024,
    "THREADS": 1,
    "INLINE_INDEX_MAX_ITEMS": 4,
    "JOB_BATCH_SIZE": 2,
    "LOG_FORMAT": "json",
}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uvicorn")
    with ServerProcess(tiny_bundle.path, folder / "catalog", env=SERVER_ENV, log_path=folder / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        files = [("images", (f"u{seed}.png", image_bytes(seed), "image/png")) for seed in range(1, 4)]
        response = http.post("/index", files=files, data={"ids": ["u1", "u2", "u3"]}, headers=WRITE_HEADERS)
        assert response.status_code == 200, response.text
        yield http


def raw_http(port: int, head: bytes, chunks=(), timeout_s: float = 10.0) -> tuple[bytes, int]:
    """Send `head` and then `chunks` until a response arrives; returns (response bytes, chunks sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as connection:
        connection.sendall(head)
        connection.settimeout(0.05)
        response = b""
        for chunk in chunks:
            try:
                response += connection.recv(65536)
            except (socket.timeout, BlockingIOError):
                pass
            if response:
                break
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        connection.settimeout(timeout_s)
        try:
            while b"\r\n\r\n" not in response or not response.endswith(b"}"):
                data = connection.recv(65536)
                if not data:
                    break
                response += data
        except (socket.timeout, ConnectionResetError):
            pass
    return response, sent


def test_health_and_readiness(client, tiny_bundle):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["model_id"] == tiny_bundle.model_id
    assert ready["count"] >= 3


def test_search_multipart_and_json(client):
    by_file = client.post("/search", params={"k": 2}, files={"image": ("q.png", image_bytes(2), "image/png")})
    assert by_file.status_code == 200, by_file.text
    assert by_file.json()["results"][0]["id"] == "u2"
    payload = {"image_base64": base64.b64encode(image_bytes(3)).decode(), "k": 1}
    by_json = client.post("/search", json=payload)
    assert by_json.json()["results"][0]["id"] == "u3"
    assert by_json.headers["x-request-id"]


def test_items_stats_and_metrics(client):
    page = client.get("/items", params={"limit": 2}).json()
    assert page["total"] >= 3
    assert len(page["items"]) == 2
    assert client.get("/items/u1/image").content == image_bytes(1)
    stats = client.get("/stats").json()
    assert stats["threads"]["onnxruntime_intra_op"] == 1
    assert "idml_http_requests_total" in client.get("/metrics").text


def test_delete_over_http(client):
    files = [("images", ("d.png", image_bytes(40), "image/png"))]
    assert client.post("/index", files=files, data={"ids": ["gone"]}, headers=WRITE_HEADERS).status_code == 200
    assert client.delete("/items/gone").status_code == 401
    assert client.delete("/items/gone", headers=WRITE_HEADERS).status_code == 204
    assert client.get("/items/gone").status_code == 404


def test_concurrent_searches_are_each_embedded_once(client):
    def one(seed: int) -> str:
        response = client.post("/search", params={"k": 1}, files={"image": ("q.png", image_bytes(seed), "image/png")})
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["id"]

    def batch_totals() -> tuple[float, float]:
        text = client.get("/metrics").text
        count = float(re.search(r"^idml_embed_batch_size_count (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^idml_embed_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, total

    calls_before, queries_before = batch_totals()
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(one, [1, 2, 3] * 8))
    calls_after, queries_after = batch_totals()
    assert found == ["u1", "u2", "u3"] * 8
    assert queries_after - queries_before == 24
    assert 1 <= calls_after - calls_before <= 24


def test_upload_over_limit_rejected_while_streaming(server):
    """A chunked upload that would be 64 MiB gets 413 once 256 KiB have arrived, while the client still sends."""
    head = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    )
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    first = b"%x\r\n" % len(part) + part + b"\r\n"
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    response, sent = raw_http(server.port, head, [first] + [chunk] * 1024)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 1024
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "too_large"
    assert "IDML_MAX_UPLOAD_BYTES" in body["error"]["message"]


def test_declared_length_over_limit_rejected_before_body(server):
    head = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000000\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    )
    response, _ = raw_http(server.port, head)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"10000000000 bytes" in response


@pytest.mark.parametrize("fast_path_shape", [True, False], ids=["fast-path", "route"])
def test_client_disconnect_counted_as_499(client, server, fast_path_shape):
    """A client that closes mid-body gets no response; metrics count 499 client_disconnected, not a 500."""
    query = "/search?k=2" if fast_path_shape else "/search?kk=1"  # an unknown parameter takes the route
    head = (
        f"POST {query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    ).encode()
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(head + part)
    deadline = time.monotonic() + 10
    pattern = re.compile(r'idml_errors_total\{code="client_disconnected"\} (\d+)')
    count = 0
    while time.monotonic() < deadline:
        match = pattern.search(client.get("/metrics").text)
        count = int(float(match.group(1))) if match else 0
        if count >= (1 if fast_path_shape else 2):
            break
        time.sleep(0.05)
    text = client.get("/metrics").text
    assert count >= 1
    assert 'status="499"' in text
    assert 'code="internal_error"' not in text


def test_log_is_json_with_request_ids(client, server):
    client.get("/items/missing-item", headers={"X-Request-ID": "uvicorn-trace-7"})
    deadline = time.monotonic() + 10
    while "uvicorn-trace-7" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    traced = [line for line in lines if line["request_id"] == "uvicorn-trace-7"]
    assert traced and traced[0]["status"] == 404
    started = [line for line in lines if line["message"].startswith("loaded model")]
    assert started and started[0]["onnxruntime_intra_op_threads"] == 1
    assert API_KEY not in server.log()


def test_graceful_shutdown_then_job_resumes(tiny_bundle, tmp_path):
    """SIGTERM during a job exits cleanly; the next server finishes the job with every item stored once."""
    catalog = tmp_path / "catalog"
    files = [("images", (f"g{seed}.png", image_bytes(100 + seed), "image/png")) for seed in range(12)]
    ids = [f"g{seed}" for seed in range(12)]
    with ServerProcess(tiny_bundle.path, catalog, env=SERVER_ENV, log_path=tmp_path / "first.log") as first:
        with httpx.Client(base_url=first.base_url, timeout=30.0) as http:
            response = http.post("/index", files=files, data={"ids": ids}, headers=WRITE_HEADERS)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
        # uvicorn re-raises the SIGTERM after its graceful shutdown, so the exit status is -SIGTERM.
        assert first.stop() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in first.log()
        assert "stopped" in first.log()

    with ServerProcess(tiny_bundle.path, catalog, env=SERVER_ENV, log_path=tmp_path / "second.log") as second:
        with httpx.Client(base_url=second.base_url, timeout=30.0) as http:
            deadline = time.monotonic() + 60
            job = http.get(f"/jobs/{job_id}").json()
            while job["status"] != "completed" and time.monotonic() < deadline:
                time.sleep(0.05)
                job = http.get(f"/jobs/{job_id}").json()
            assert job["status"] == "completed"
            assert job["counts"] == {"added": 12, "replaced": 0, "error": 0}
            assert http.get("/stats").json()["count"] == 12


def test_two_workers_search_and_write_an_existing_catalog(tiny_bundle, tmp_path):
    """With IDML_WORKERS=2 over a catalog built earlier, both workers search it and writes succeed."""
    catalog = tmp_path / "catalog"
    with ServerProcess(tiny_bundle.path, catalog, env=SERVER_ENV, log_path=tmp_path / "writer.log") as writer:
        with httpx.Client(base_url=writer.base_url, timeout=30.0) as http:
            files = [("images", ("w.png", image_bytes(7), "image/png"))]
            assert http.post("/index", files=files, data={"ids": ["w"]}, headers=WRITE_HEADERS).status_code == 200

    env = {**SERVER_ENV, "WORKERS": 2}
    with ServerProcess(tiny_bundle.path, catalog, env=env, log_path=tmp_path / "workers.log") as server:
        with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
            found = []
            deadline = time.monotonic() + 60
            while len(found) < 4 and time.monotonic() < deadline:  # the second worker may still be loading
                response = http.post("/search", files={"image": ("q.png", image_bytes(7), "image/png")})
                if response.status_code == 200:
                    found.append(response.json()["results"][0]["id"])
                else:
                    time.sleep(0.05)
            assert found == ["w"] * 4
            files = [("images", ("x.png", image_bytes(8), "image/png"))]
            response = http.post("/index", files=files, data={"ids": ["x"]}, headers=WRITE_HEADERS)
            assert response.status_code == 200, response.text
            assert http.post("/search", files={"image": ("q.png", image_bytes(8), "image/png")}).json()["results"][0]["id"] == "x"
            assert http.get("/stats").json()["threads"]["workers"] == 2
