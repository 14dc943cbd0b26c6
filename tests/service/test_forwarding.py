"""Forwarding over a Unix socket: forward_request against a real uvicorn InternalServer in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect

from service.forwarding import InternalServer, WriterUnavailable, forward_request, writer_socket_path

MIB = 1024 * 1024


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


class UpstreamApp:
    """A plain ASGI app that records what it received. Each path selects one behaviour."""

    def __init__(self):
        self.bytes_received = 0
        self.disconnected = asyncio.Event()

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http"
        handler = {
            "/hash": self.hash_body,
            "/reject": self.reject,
            "/stream": self.stream,
            "/wait": self.wait_for_disconnect,
            "/break": self.break_response,
        }.get(scope["path"], self.echo_request)
        await handler(scope, receive, send)

    async def hash_body(self, scope, receive, send):
        digest = hashlib.sha256()
        for _ in range(100_000):
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return
            digest.update(message.get("body", b""))
            self.bytes_received += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send_json(send, 200, {"sha256": digest.hexdigest(), "length": self.bytes_received, **framing(scope)})

    async def reject(self, scope, receive, send):
        headers = [(b"connection", b"close")] if scope["query_string"] == b"close=1" else []
        await send_json(send, 401, {"error": "unauthorized"}, headers)

    async def stream(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for index in range(5):
            await send({"type": "http.response.body", "body": f"part {index}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def wait_for_disconnect(self, scope, receive, send):
        for _ in range(1000):
            if (await receive())["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def break_response(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"first ten.", "more_body": True})
        raise RuntimeError("the app fails in the middle of its response")

    async def echo_request(self, scope, receive, send):
        headers = [
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"x-order", b"first"),
            (b"connection", b"x-private"),
            (b"x-private", b"hop"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authenticate", b"Basic"),
            (b"trailer", b"x-checksum"),
            (b"upgrade", b"h2c"),
            (b"x-order", b"second"),
        ]
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode(),
            "query_string": scope["query_string"].decode(),
            "headers": [[name.decode(), value.decode()] for name, value in scope["headers"]],
        }
        await send_json(send, 207, request, headers)


async def send_json(send, status, document, headers=()):
    body = json.dumps(document).encode()
    response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": response_headers + list(headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def framing(scope) -> dict:
    headers = dict(scope["headers"])
    return {
        "content_length": headers.get(b"content-length", b"").decode() or None,
        "transfer_encoding": headers.get(b"transfer-encoding", b"").decode() or None,
    }


class ResponseRecorder:
    """An ASGI `send` that keeps every message."""

    def __init__(self):
        self.messages = []

    async def __call__(self, message):
        self.messages.append(message)

    @property
    def status(self):
        return self.messages[0]["status"]

    @property
    def headers(self):
        return self.messages[0]["headers"]

    @property
    def body(self):
        return b"".join(message.get("body", b"") for message in self.messages[1:])

    def json(self):
        return json.loads(self.body)

    def is_complete(self):
        return self.messages[-1]["type"] == "http.response.body" and not self.messages[-1]["more_body"]


def chunked_receive(data: bytes, chunk_size: int, *, disconnect_after: int | None = None):
    """An ASGI `receive` that returns `data` in chunks, or http.disconnect from call `disconnect_after` on."""
    chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)] or [b""]
    state = {"handed": 0}

    async def receive():
        index = state["handed"]
        state["handed"] += 1
        if disconnect_after is not None and index >= disconnect_after:
            return {"type": "http.disconnect"}
        if index >= len(chunks):
            await asyncio.sleep(3600)  # ASGI servers block here until the client disconnects
        await asyncio.sleep(0)
        return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}

    receive.state = state
    return receive


def make_scope(method, path, *, raw_path=None, query_string=b"", headers=()):
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, app=None):
    server = InternalServer(app or UpstreamApp(), str(tmp_path / "writer.sock"), stop_timeout_s=2.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def forward_bodyless(tmp_path: Path, scope: dict, **options) -> ResponseRecorder:
    """Forward a request without a body to the echo server and return the relayed response."""

    async def scenario():
        async with serving(tmp_path) as server:
            response = ResponseRecorder()
            await forward_request(scope, chunked_receive(b"", 1), response, server.socket_path, **options)
            return response

    return run(scenario())


@pytest.mark.parametrize("declare_length", [True, False])
def test_large_body_arrives_intact(tmp_path, declare_length):
    data = os.urandom(8 * MIB + 12345)
    headers = [(b"content-length", str(len(data)).encode())] if declare_length else [(b"transfer-encoding", b"chunked")]

    async def scenario():
        app = UpstreamApp()
        async with serving(tmp_path, app) as server:
            receive = chunked_receive(data, 100_003)
            response = ResponseRecorder()
            await forward_request(make_scope("POST", "/hash", headers=headers), receive, response, server.socket_path)
            return response, receive.state["handed"]

    response, handed = run(scenario())

    assert response.status == 200
    assert response.is_complete()
    result = response.json()
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["length"] == len(data)
    assert handed == -(-len(data) // 100_003)
    if declare_length:
        assert result["content_length"] == str(len(data))
        assert result["transfer_encoding"] is None
    else:
        assert result["content_length"] is None
        assert result["transfer_encoding"] == "chunked"


def test_body_streams_without_buffering(tmp_path):
    data = os.urandom(16 * MIB)
    lag_by_chunk = []

    async def scenario():
        app = UpstreamApp()
        async with serving(tmp_path, app) as server:
            inner = chunked_receive(data, 64 * 1024)

            async def receive():
                message = await inner()
                lag_by_chunk.append(inner.state["handed"] * 64 * 1024 - app.bytes_received)
                return message

            headers = [(b"content-length", str(len(data)).encode())]
            response = ResponseRecorder()
            await forward_request(make_scope("POST", "/hash", headers=headers), receive, response, server.socket_path)
            return response

    response = run(scenario())

    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    # Bytes handed to forward_request but not yet read by the app stay within the socket and transport buffers.
    assert max(lag_by_chunk) < 4 * MIB


def test_status_and_repeated_headers_relayed(tmp_path):
    response = forward_bodyless(tmp_path, make_scope("GET", "/echo"))

    assert response.status == 207
    assert response.is_complete()
    assert [value for name, value in response.headers if name == b"set-cookie"] == [b"a=1", b"b=2"]
    assert [value for name, value in response.headers if name == b"x-order"] == [b"first", b"second"]
    assert all(name == name.lower() for name, _ in response.headers)
    assert all(isinstance(message.get("body", b""), bytes) for message in response.messages)


def test_response_hop_by_hop_headers_dropped(tmp_path):
    response = forward_bodyless(tmp_path, make_scope("GET", "/echo"))

    names = [name for name, _ in response.headers]
    for dropped in (b"connection", b"x-private", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert dropped not in names
    assert b"content-type" in names
    assert b"content-length" in names
    # InternalServer leaves Date and Server to the main server, which adds them to the relayed response.
    assert b"date" not in names
    assert b"server" not in names


def test_request_hop_by_hop_headers_dropped(tmp_path):
    headers = [
        (b"x-api-key", b"key-1"),
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"hop"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"websocket"),
        (b"proxy-authorization", b"Basic abc"),
        (b"x-repeated", b"one"),
        (b"x-repeated", b"two"),
    ]

    response = forward_bodyless(tmp_path, make_scope("GET", "/echo", headers=headers))

    received = [tuple(pair) for pair in response.json()["headers"]]

    assert received == [("host", "testserver"), ("x-api-key", "key-1"), ("x-repeated", "one"), ("x-repeated", "two")]


def test_extra_headers_replace_same_names(tmp_path):
    headers = [(b"x-request-id", b"from-client"), (b"x-other", b"kept")]

    response = forward_bodyless(
        tmp_path, make_scope("GET", "/echo", headers=headers), extra_headers=[(b"x-request-id", b"req-42")]
    )

    received = [tuple(pair) for pair in response.json()["headers"]]

    assert received == [("host", "testserver"), ("x-other", "kept"), ("x-request-id", "req-42")]


def test_path_and_query_survive(tmp_path):
    scope = make_scope("DELETE", "/items/a/b", raw_path=b"/items/a%2Fb", query_string=b"x=1&y=%20z")

    echoed = forward_bodyless(tmp_path, scope).json()

    assert echoed["method"] == "DELETE"
    assert echoed["raw_path"] == "/items/a%2Fb"
    assert echoed["path"] == "/items/a/b"
    assert echoed["query_string"] == "x=1&y=%20z"


def test_path_encoded_without_raw_path(tmp_path):
    scope = make_scope("DELETE", "/items/café one")
    del scope["raw_path"]

    echoed = forward_bodyless(tmp_path, scope).json()

    assert echoed["raw_path"] == "/items/caf%C3%A9%20one"
    assert echoed["path"] == "/items/café one"
    assert echoed["query_string"] == ""


def test_bodyless_request_has_no_framing(tmp_path):
    result = forward_bodyless(tmp_path, make_scope("DELETE", "/hash")).json()

    assert result["length"] == 0
    assert result["content_length"] is None
    assert result["transfer_encoding"] is None


def test_streamed_response_relayed_in_parts(tmp_path):
    response = forward_bodyless(tmp_path, make_scope("GET", "/stream"))

    assert response.status == 200
    assert response.body == b"".join(f"part {index}\n".encode() for index in range(5))
    assert response.is_complete()
    assert all(message["more_body"] for message in response.messages[1:-1])


@pytest.mark.parametrize("query_string", [b"", b"close=1"], ids=["keep-alive", "connection-close"])
def test_early_401_relayed(tmp_path, query_string):
    data = os.urandom(32 * MIB)
    headers = [(b"content-length", str(len(data)).encode())]

    async def scenario():
        results = []
        async with serving(tmp_path) as server:
            for _ in range(5):
                receive = chunked_receive(data, 256 * 1024)
                response = ResponseRecorder()
                scope = make_scope("POST", "/reject", query_string=query_string, headers=headers)
                await forward_request(scope, receive, response, server.socket_path, timeout_s=20)
                results.append((response, receive.state["handed"]))
        return results

    for response, handed in run(scenario()):
        assert response.status == 401
        assert response.json() == {"error": "unauthorized"}
        assert response.is_complete()
        # The rest of the body is not sent once the full response arrived.
        assert handed < len(data) // (256 * 1024)


class RawServer:
    """A server thread that reads each request head, then sends `response` and closes with the body unread.

    It runs outside the client's event loop, like a writer in another process, so its
    close can reach the client while the client is still sending the body.
    """

    def __init__(self, socket_path: str, response: bytes, connections: int):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.response = response
        self.thread = threading.Thread(target=self.serve, args=(connections,), daemon=True)

    def serve(self, connections: int):
        for _ in range(connections):
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                head = b""
                for _ in range(100):
                    if b"\r\n\r\n" in head:
                        break
                    head += connection.recv(65536)
                connection.recv(65536)  # part of the body, so the close finds the client mid-upload
                connection.sendall(self.response)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.listener.close()
        self.thread.join(timeout=10)


def run_in_loop(loop_name, coroutine):
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(asyncio.wait_for(coroutine, timeout=60))
    return run(coroutine)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_401_then_close_relayed(tmp_path, loop_name):
    socket_path = str(tmp_path / "raw.sock")
    response_bytes = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
    data = os.urandom(4 * MIB)
    headers = [(b"content-length", str(len(data)).encode())]
    rounds = 20

    async def scenario():
        responses = []
        for _ in range(rounds):
            response = ResponseRecorder()
            scope = make_scope("POST", "/index", headers=headers)
            await forward_request(scope, chunked_receive(data, 64 * 1024), response, socket_path, timeout_s=20)
            responses.append(response)
        return responses

    with RawServer(socket_path, response_bytes, rounds):
        responses = run_in_loop(loop_name, scenario())

    assert [response.status for response in responses] == [401] * rounds
    assert all(response.body == b"no" for response in responses)
    assert all(response.is_complete() for response in responses)


def test_close_before_response_raises_unavailable(tmp_path):
    socket_path = str(tmp_path / "raw.sock")
    data = os.urandom(MIB)
    headers = [(b"content-length", str(len(data)).encode())]
    response = ResponseRecorder()

    with RawServer(socket_path, b"", 1):
        with pytest.raises(WriterUnavailable, match="before it sent a response"):
            run(forward_request(make_scope("POST", "/index", headers=headers), chunked_receive(data, 65536), response, socket_path))

    assert response.messages == []


def test_client_disconnect_stops_upload(tmp_path):
    data = os.urandom(4 * MIB)
    headers = [(b"content-length", str(len(data)).encode())]

    async def scenario():
        app = UpstreamApp()
        async with serving(tmp_path, app) as server:
            response = ResponseRecorder()
            receive = chunked_receive(data, 64 * 1024, disconnect_after=10)
            with pytest.raises(ClientDisconnect):
                await forward_request(make_scope("POST", "/hash", headers=headers), receive, response, server.socket_path)
            await asyncio.wait_for(app.disconnected.wait(), timeout=5)
            return response, app

    response, app = run(scenario())

    assert response.messages == []
    assert app.disconnected.is_set()
    assert app.bytes_received <= 10 * 64 * 1024


def test_missing_socket_raises_unavailable(tmp_path):
    socket_path = str(tmp_path / "absent.sock")
    response = ResponseRecorder()

    with pytest.raises(WriterUnavailable, match="absent.sock") as raised:
        run(forward_request(make_scope("GET", "/echo"), chunked_receive(b"", 1), response, socket_path))

    assert raised.value.socket_path == socket_path
    assert isinstance(raised.value, OSError)
    assert response.messages == []


def test_refused_socket_raises_unavailable(tmp_path):
    async def scenario():
        # A socket that is bound but not listening refuses connections.
        path = str(tmp_path / "refusing.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
            unbound.bind(path)
            response = ResponseRecorder()
            with pytest.raises(WriterUnavailable, match="refusing.sock"):
                await forward_request(make_scope("GET", "/echo"), chunked_receive(b"", 1), response, path)
            return response

    assert run(scenario()).messages == []


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_foreign_socket_raises_unavailable(tmp_path):
    async def scenario():
        async with serving(tmp_path) as server:
            os.chown(server.socket_path, 65534, -1)
            response = ResponseRecorder()
            with pytest.raises(WriterUnavailable, match="owned by user id 65534"):
                await forward_request(make_scope("GET", "/echo"), chunked_receive(b"", 1), response, server.socket_path)
            return response

    assert run(scenario()).messages == []


def test_timeout_before_response_raises_unavailable(tmp_path):
    async def scenario():
        app = UpstreamApp()
        async with serving(tmp_path, app) as server:
            response = ResponseRecorder()
            with pytest.raises(WriterUnavailable, match="timed out"):
                await forward_request(
                    make_scope("GET", "/wait"), chunked_receive(b"", 1), response, server.socket_path, timeout_s=0.5
                )
            await asyncio.wait_for(app.disconnected.wait(), timeout=5)
            return response

    assert run(scenario()).messages == []


def test_broken_response_left_incomplete(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="service.forwarding")

    response = forward_bodyless(tmp_path, make_scope("GET", "/break"))

    assert response.status == 200
    assert response.body == b"first ten."
    assert not response.is_complete()
    errors = [record for record in caplog.records if record.name == "service.forwarding"]
    assert len(errors) == 1
    assert "truncated" in errors[0].getMessage()


def test_socket_mode_is_0600(tmp_path):
    async def scenario():
        async with serving(tmp_path) as server:
            return os.stat(server.socket_path).st_mode

    mode = run(scenario())

    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_stop_removes_socket_file(tmp_path):
    async def scenario():
        server = InternalServer(UpstreamApp(), str(tmp_path / "writer.sock"), stop_timeout_s=2.0)
        await server.start()
        existed = os.path.exists(server.socket_path)
        await server.stop()
        await server.stop()  # a second stop does nothing
        return existed, server.socket_path

    existed, socket_path = run(scenario())

    assert existed
    assert not os.path.exists(socket_path)


def test_start_replaces_stale_socket(tmp_path):
    socket_path = str(tmp_path / "writer.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(socket_path)

    async def scenario():
        async with serving(tmp_path) as server:
            response = ResponseRecorder()
            await forward_request(make_scope("GET", "/echo"), chunked_receive(b"", 1), response, server.socket_path)
            return response

    assert run(scenario()).status == 207


def test_start_rejects_regular_file(tmp_path):
    (tmp_path / "writer.sock").write_text("not a socket")

    async def scenario():
        server = InternalServer(UpstreamApp(), str(tmp_path / "writer.sock"))
        with pytest.raises(FileExistsError, match="not a socket"):
            await server.start()

    run(scenario())

    assert (tmp_path / "writer.sock").read_text() == "not a socket"


def test_stop_keeps_replaced_socket(tmp_path):
    async def scenario():
        server = InternalServer(UpstreamApp(), str(tmp_path / "writer.sock"), stop_timeout_s=2.0)
        await server.start()
        # Another writer binds the same path, as after a restart, and stop() must leave its socket alone.
        os.unlink(server.socket_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
            newer.bind(server.socket_path)
            await server.stop()
            return os.path.exists(server.socket_path)

    assert run(scenario())


def test_socket_path_short_folder(tmp_path):
    catalog = tmp_path / "catalog"

    path = writer_socket_path(catalog)

    assert path == str(catalog.resolve() / "writer.sock")
    assert os.path.isabs(path)


def test_socket_path_relative_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    path = writer_socket_path(Path("catalog"))

    assert path == str(tmp_path.resolve() / "catalog" / "writer.sock")


def test_socket_path_long_folder(tmp_path):
    catalog = tmp_path / ("deep-" * 30) / "catalog"

    path = writer_socket_path(catalog)

    digest = hashlib.sha256(str(catalog.resolve()).encode()).hexdigest()[:16]
    assert path == os.path.join(tempfile.gettempdir(), f"idml-writer-{digest}.sock")
    assert len(path.encode()) <= 100
    assert writer_socket_path(catalog) == path
    assert writer_socket_path(tmp_path / ("other-" * 30)) != path
