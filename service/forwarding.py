"""Forward HTTP requests from one worker process to another over a Unix domain socket.

The writing worker serves the app a second time on a Unix socket (`InternalServer`),
and the other workers relay write requests to it (`forward_request`), so all
writes go through the one process that holds the catalog's write lock.

`forward_request` streams both bodies chunk by chunk, so memory use does not
grow with the size of an upload. It drops hop-by-hop headers in both
directions and keeps all other headers in order. It raises `WriterUnavailable`
only while nothing has been sent to the client, so the caller can still respond with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import h11
import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# Headers that describe one connection rather than the message (RFC 9110 section 7.6.1),
# plus every `proxy-*` header and every header named in a Connection header.
HOP_BY_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade"})

# Bytes read from the socket per call, so at most this much of a response is held at once.
READ_SIZE = 64 * 1024

# sun_path in struct sockaddr_un is 108 bytes long on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 100


class WriterUnavailable(OSError):
    """Raised when the writing worker cannot be reached or fails before it starts a response.

    Nothing has been sent to the client when this is raised, so the caller can respond with 503.
    """

    def __init__(self, message: str, *, socket_path: str):
        super().__init__(message)
        self.socket_path = socket_path


def writer_socket_path(catalog_folder: Path) -> str:
    """Return the absolute path of the writing worker's socket for a catalog.

    The socket is `<catalog_folder>/writer.sock` unless that path is longer than
    MAX_SOCKET_PATH_BYTES. Then it is `idml-writer-<hash>.sock` in the temporary
    folder, where the hash is the first 16 hex digits of the SHA-256 of the absolute
    catalog path, so every worker of one catalog computes the same path.
    """
    folder = Path(catalog_folder).resolve()
    path = str(folder / "writer.sock")
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    digest = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"idml-writer-{digest}.sock")


async def forward_request(
    scope: Scope,
    receive: Receive,
    send: Send,
    socket_path: str,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    timeout_s: float = 3600.0,
) -> None:
    """Send one ASGI HTTP request to the HTTP/1.1 server on `socket_path` and relay its response to `send`.

    The request body is streamed from `receive()` as it arrives, with Content-Length
    when the request declared one, with none for a request without a body, and with
    chunked transfer encoding otherwise. Headers in `extra_headers` replace request
    headers of the same names. The response is streamed to `send` with all but its
    hop-by-hop headers. A response that arrives before the whole body was sent, such
    as an early 401, is relayed too, and the rest of the body is not sent.

    Raises WriterUnavailable, with nothing sent to `send`, when the socket is missing,
    refuses the connection or belongs to another user, when the server closes the
    connection before it starts a response, or when `timeout_s` runs out before then.
    When the connection breaks or times out after the response started, logs one error
    and returns without completing the response. The ASGI server then closes the client
    connection, so the client sees the truncation. When the client disconnects during
    the request body, closes the connection to the server and raises Starlette's ClientDisconnect.
    """
    exchange = _Exchange(scope, receive, send, socket_path, list(extra_headers))
    started_at = time.monotonic()
    try:
        # wait_for rather than asyncio.timeout(), which needs Python 3.11, because the project supports 3.10.
        await asyncio.wait_for(exchange.run(), timeout_s)
        if exchange.client_disconnected and not exchange.response_started:
            raise ClientDisconnect()
    except asyncio.TimeoutError:
        if time.monotonic() - started_at < timeout_s:
            raise  # a TimeoutError of the exchange itself, not of this deadline
        if not exchange.response_started:
            raise WriterUnavailable(
                f"the request to the writer at {socket_path} timed out after {timeout_s:g} s"
                " before a response started",
                socket_path=socket_path,
            ) from None
        logger.error(
            "forwarding %s %s to the writer at %s timed out after %g s during the response,"
            " so the client gets a truncated response",
            scope.get("method"),
            scope.get("path"),
            socket_path,
            timeout_s,
        )


class _UpstreamBroken(Exception):
    """The connection to the writer closed or failed before the response was complete."""


class _Exchange:
    """One request and its response over one connection to the writer.

    The socket is driven with loop.sock_sendall() and loop.sock_recv() rather than
    asyncio streams. When a stream transport fails to send (EPIPE after the server
    responded early and closed), it closes the socket for reading as well and drops
    the response still in the kernel buffer. A plain socket keeps the read side, so
    that response can still be read and relayed.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send, socket_path: str, extra_headers):
        self.scope = scope
        self.receive = receive
        self.send = send
        self.socket_path = socket_path
        self.extra_headers = extra_headers
        self.connection = h11.Connection(h11.CLIENT)
        self.loop = asyncio.get_running_loop()
        self.socket: socket.socket | None = None
        self.response_started = False
        self.client_disconnected = False

    async def run(self) -> None:
        await self._connect()
        try:
            await self._exchange()
        except _UpstreamBroken as error:
            if self.client_disconnected:
                return
            if not self.response_started:
                raise WriterUnavailable(
                    f"the writer at {self.socket_path} closed the connection before it sent a response: {error}",
                    socket_path=self.socket_path,
                ) from error
            logger.error(
                "the connection to the writer at %s broke during the response to %s %s,"
                " so the client gets a truncated response: %s",
                self.socket_path,
                self.scope.get("method"),
                self.scope.get("path"),
                error,
            )
        finally:
            self.socket.close()

    async def _connect(self) -> None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            _check_socket_owner(self.socket_path)
            await self.loop.sock_connect(connection, self.socket_path)
        except OSError as error:
            connection.close()
            raise WriterUnavailable(
                f"cannot connect to the writer at {self.socket_path}: {error}."
                " The writing worker may be down or restarting.",
                socket_path=self.socket_path,
            ) from error
        except BaseException:
            connection.close()
            raise
        self.socket = connection

    async def _exchange(self) -> None:
        headers = _request_headers(self.scope["headers"], self.extra_headers)
        first_message = None
        if not _has_header(headers, b"content-length"):
            # Without a declared length, the first message shows whether the request has a body at all.
            first_message = await self.receive()
            if first_message["type"] == "http.disconnect":
                return
            if first_message.get("more_body", False) or first_message.get("body", b""):
                headers.append((b"transfer-encoding", b"chunked"))
        request = h11.Request(method=self.scope["method"], target=_request_target(self.scope), headers=headers)
        if not await self._write(request):
            raise _UpstreamBroken("sending the request head failed")

        # The response is read while the body is sent, so an early response ends the upload.
        upload = asyncio.create_task(self._upload_body(first_message), name="idml-forward-upload")
        relay = asyncio.create_task(self._relay_response(), name="idml-forward-relay")
        try:
            await asyncio.wait({upload, relay}, return_when=asyncio.FIRST_COMPLETED)
            if upload.done() and not relay.done():
                upload.result()  # raises what broke the upload, such as an error from receive()
                if self.client_disconnected:
                    return
                await relay
            relay.result()
        finally:
            # Once the response is complete or has failed, any unsent body is no longer needed.
            upload.cancel()
            relay.cancel()
            await asyncio.gather(upload, relay, return_exceptions=True)

    async def _upload_body(self, first_message: Message | None) -> None:
        """Send the request body, from `first_message` on, until the client's last message."""
        message = first_message if first_message is not None else await self.receive()
        while True:  # ends with the request body, a disconnect or the caller's timeout
            if message["type"] == "http.disconnect":
                self.client_disconnected = True
                return
            body = message.get("body", b"")
            if body and not await self._write(h11.Data(data=body)):
                return
            if not message.get("more_body", False):
                await self._write(h11.EndOfMessage())
                return
            message = await self.receive()

    async def _write(self, event) -> bool:
        """Send one h11 event and return whether the connection accepted it."""
        try:
            await self.loop.sock_sendall(self.socket, self.connection.send(event))
        except OSError as error:
            # The server may respond early and close without reading the rest of the body.
            # The response it sent is still read, so only stop sending.
            logger.debug("sending the request to the writer at %s stopped: %s", self.socket_path, error)
            return False
        return True

    async def _relay_response(self) -> None:
        """Read the response and pass it to `send` until its end."""
        while True:  # each pass consumes data from the socket or ends the response, within the caller's timeout
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                raise _UpstreamBroken(str(error)) from error

            if event is h11.NEED_DATA:
                try:
                    data = await self.loop.sock_recv(self.socket, READ_SIZE)
                except OSError as error:
                    raise _UpstreamBroken(str(error) or type(error).__name__) from error
                self.connection.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue: the ASGI server sends its own when the app reads the body
            elif isinstance(event, h11.Response):
                self.response_started = True
                headers = _without_hop_by_hop(list(event.headers))
                await self.send({"type": "http.response.start", "status": event.status_code, "headers": headers})
            elif isinstance(event, h11.Data):
                # h11 returns bytearray chunks, and ASGI requires bytes.
                await self.send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise _UpstreamBroken("connection closed")


def _check_socket_owner(socket_path: str) -> None:
    # The socket may sit in the shared temporary folder, where another user could create
    # it first. Sending requests with their API keys to that user's server would leak them.
    status = os.stat(socket_path)
    if status.st_uid != os.getuid():
        raise PermissionError(
            f"the socket is owned by user id {status.st_uid}, not by this process's user id {os.getuid()}"
        )


def _request_target(scope: Scope) -> bytes:
    path = scope.get("raw_path")
    if not path:
        path = quote(scope["path"], safe="/:@!$&'()*+,;=").encode("ascii")
    query = scope.get("query_string", b"")
    if query:
        return path + b"?" + query
    return path


def _request_headers(scope_headers, extra_headers) -> list[tuple[bytes, bytes]]:
    """Return the request headers to send: scope headers without hop-by-hop ones, then `extra_headers`."""
    headers = _without_hop_by_hop(list(scope_headers))
    if _has_header(scope_headers, b"transfer-encoding"):
        # A length next to a transfer coding is not the body's length (RFC 9112 section 6.3).
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]

    replaced = {name.lower() for name, _ in extra_headers}
    headers = [(name, value) for name, value in headers if name.lower() not in replaced]
    headers.extend(extra_headers)

    # h11 sends no HTTP/1.1 request without a Host header, and ASGI scopes need not carry one.
    if not _has_header(headers, b"host"):
        headers.insert(0, (b"host", b"localhost"))
    return headers


def _without_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = set(_connection_options(headers))
    kept = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP_HEADERS or lowered in named or lowered.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    return kept


def _connection_options(headers: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    for name, value in headers:
        if name.lower() == b"connection":
            for option in value.split(b","):
                if option.strip():
                    yield option.strip().lower()


def _has_header(headers, wanted: bytes) -> bool:
    return any(name.lower() == wanted for name, _ in headers)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process's main uvicorn server.

    uvicorn.Server.serve() installs SIGINT and SIGTERM handlers while it runs. Since
    uvicorn 0.29 it does so in `capture_signals`, which also raises the caught signals
    again when the server stops. Older versions use `install_signal_handlers`. A second
    server in the same process would take the signals from the main server and re-raise
    them at its own stop, so both hooks do nothing here.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:
        pass


class InternalServer:
    """Serve an ASGI app on a Unix socket with uvicorn, inside the running event loop.

    The socket file has mode 0600, so only the user that runs the service can connect.
    The app's lifespan is not run, because the process's main server runs it already.
    The caller must hold the catalog's write lock, because `start()` replaces a socket
    file left at `socket_path`.
    """

    def __init__(
        self,
        app,
        socket_path: str,
        *,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 30.0,
        backlog: int = 128,
    ):
        self.app = app
        self.socket_path = socket_path
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.backlog = backlog
        self.server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self._listener: socket.socket | None = None
        self._socket_identity: tuple[int, int] | None = None

    async def start(self) -> None:
        """Start serving on `socket_path` and return once the server accepts connections.

        Raises FileExistsError when a file other than a socket is at `socket_path`,
        OSError when the socket cannot be created, and TimeoutError when the server
        has not started within `start_timeout_s`.
        """
        if self._task is not None:
            raise RuntimeError(f"the internal server on {self.socket_path} is already started")
        _remove_stale_socket(self.socket_path)
        self._listener = self._bind()

        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            # The main server adds its own Date and Server headers to relayed responses.
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=max(1, int(self.stop_timeout_s)),
            backlog=self.backlog,
        )
        self.server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self.server.serve(sockets=[self._listener]), name="idml-internal-server")
        await self._wait_started()
        logger.info("internal server listening on %s", self.socket_path)

    def _bind(self) -> socket.socket:
        # uvicorn's own Unix socket setup (Config(uds=...), checked in 0.55) sets the file mode to 0666 after it
        # starts listening, so any local user could connect until a later chmod. Binding and
        # restricting the file here, before listen(), leaves no such window.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            status = os.stat(self.socket_path)
        except OSError:
            listener.close()
            raise
        self._socket_identity = (status.st_dev, status.st_ino)
        return listener

    async def _wait_started(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:  # bounded by start_timeout_s
            if self._task.done():
                error = self._task.exception() if not self._task.cancelled() else None
                self._task = None
                self._close_listener()
                raise OSError(f"the internal server on {self.socket_path} failed to start: {error!r}") from error
            if time.monotonic() > deadline:
                await self._cancel_task()
                self._close_listener()
                raise TimeoutError(
                    f"the internal server on {self.socket_path} did not start within {self.start_timeout_s:g} s"
                )
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving and remove the socket file.

        Open requests get about `stop_timeout_s` to finish, and those still running after that are cancelled. Calling stop() on a server
        that is not running does nothing.
        """
        if self._task is None:
            return
        self.server.should_exit = True
        # uvicorn cancels requests that outlast timeout_graceful_shutdown, so this bound is a fallback.
        done, _ = await asyncio.wait({self._task}, timeout=self.stop_timeout_s + 5.0)
        if not done:
            logger.error(
                "the internal server on %s did not stop within %g s, so it is cancelled",
                self.socket_path,
                self.stop_timeout_s + 5.0,
            )
            self.server.force_exit = True
            await self._cancel_task()
        elif not self._task.cancelled() and self._task.exception() is not None:
            logger.error("the internal server on %s failed: %r", self.socket_path, self._task.exception())
        self._task = None
        self._close_listener()
        logger.info("internal server on %s stopped", self.socket_path)

    async def _cancel_task(self) -> None:
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=5.0)
        self._task = None

    def _close_listener(self) -> None:
        # uvicorn closes the listening socket when it shuts down, but not when it fails or is cancelled.
        self._listener.close()
        self._listener = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        # Leave the file alone if it is no longer ours, because a new writer may already have bound the path.
        try:
            status = os.stat(self.socket_path)
        except FileNotFoundError:
            return
        if (status.st_dev, status.st_ino) == self._socket_identity:
            os.unlink(self.socket_path)


def _remove_stale_socket(socket_path: str) -> None:
    try:
        status = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise FileExistsError(f"{socket_path} exists and is not a socket. Move it away so the writer can bind a socket there.")
    os.unlink(socket_path)
