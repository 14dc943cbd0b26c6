"""Pure ASGI middleware: request ids, access logs and metrics; request body size limits.

Both work on the raw ASGI messages, so the size limit is enforced while the
body streams in, before any of it is buffered by a route.
"""

from __future__ import annotations

import json
import logging
import itertools
import os
import re
import time
from typing import Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_body
from service.logs import reset_request_id, set_request_id
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client-supplied request id is kept only when it is short and plain.
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Routes polled by orchestrators and scrapers; their requests are logged at DEBUG.
_QUIET_ROUTES = {"/healthz", "/readyz", "/metrics"}
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
# Status recorded for a request whose client disconnected before the response (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
# Scope key set on requests that a follower worker forwarded to this one (service/workers.py), and the
# response header that carries their error code back to the follower's metrics.
FORWARDED_KEY = "idml.forwarded"
ERROR_CODE_HEADER = "x-idml-error-code"

# Generated request ids: 16 random hex digits per process, then a counter, 32 hex digits in all like
# a uuid4. uuid4() reads os.urandom on every call, which took 7% of the event loop's time under load.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """Return a request id that is unique within this process and, with 64 random bits, across processes and restarts."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    response_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": response_headers + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    """Give each request an id, log it, count it, and turn escaped exceptions into a 500 error body.

    The id comes from the `X-Request-ID` request header when that is 1 to 128
    characters of `[A-Za-z0-9._:-]`, else it is generated. The response echoes it.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = None
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER.encode():
                candidate = value.decode("latin-1")
                if _REQUEST_ID_PATTERN.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or new_request_id()
        token = set_request_id(request_id)
        started = time.perf_counter()
        state = {"status": 500, "started": False, "recorded": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                code = scope.get("idml.error_code")
                if scope.get(FORWARDED_KEY) and code:
                    headers.append((ERROR_CODE_HEADER.encode(), code.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Count the request before its last byte leaves: a client that reads /metrics right
                # after the response then finds it, even while this request's task is still closing.
                state["recorded"] = True
                self._record(scope, state["status"], time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # No response can be sent; nginx's 499 names this case in logs and metrics.
            state["status"] = CLIENT_CLOSED_REQUEST
            scope["idml.error_code"] = "client_disconnected"
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            scope["idml.error_code"] = "internal_error"
            if not state["started"]:
                await _send_json(
                    send_with_id,
                    500,
                    error_body(
                        "internal_error",
                        "internal server error; the server log has the details under this request_id",
                    ),
                )
        finally:
            if not state["recorded"]:
                self._record(scope, state["status"], time.perf_counter() - started)
            reset_request_id(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        if scope.get(FORWARDED_KEY):
            # The follower that forwarded the request counts it, with the error code this worker sends it.
            logger.info("%s %s %d (forwarded)", scope.get("method"), scope.get("path"), status,
                        extra={"status": status, "duration_ms": round(seconds * 1000, 2)})
            return
        route = scope.get("route")
        # path_format drops convertors: "/items/{item_id}" for "/items/{item_id:path}".
        template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.observe_request(method, template, status, seconds)
        if status >= 400:
            code = scope.get("idml.error_code") or _HTTP_ERROR_CODES.get(status, f"http_{status}")
            self.metrics.errors.labels(code).inc()
        level = logging.DEBUG if template in _QUIET_ROUTES and status < 400 else logging.INFO
        logger.log(
            level,
            "%s %s %d",
            method,
            scope.get("path"),
            status,
            extra={"route": template, "status": status, "duration_ms": round(seconds * 1000, 2)},
        )


class BodyTooLarge(ApiError):
    def __init__(self, message: str):
        super().__init__(413, "too_large", message)


class BodySizeLimitMiddleware:
    """Reject request bodies over a size limit with 413 while they stream in.

    `limit_for(scope)` returns `(limit_bytes, setting_name)` for a request. A
    declared Content-Length over the limit is rejected before the body is
    read. Otherwise the bytes are counted as the route reads them, and the
    read that crosses the limit raises `BodyTooLarge` (an ApiError rendered as
    413). Should a route swallow that error, its response is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], tuple[int, str]]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        where = f"{scope.get('method')} {scope.get('path')}"

        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None and declared > limit:
            scope["idml.error_code"] = "too_large"
            message = (
                f"the request body is {declared} bytes, more than the limit of {limit} bytes for {where}; "
                f"send a smaller file or raise {setting}"
            )
            await _send_json(send, 413, error_body("too_large", message))
            return

        received = 0
        state = {"exceeded": False, "replaced": False}
        overflow_message = (
            f"the request body exceeds the limit of {limit} bytes for {where}; "
            f"send a smaller file or raise {setting}"
        )

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["exceeded"] = True
                    scope["idml.error_code"] = "too_large"
                    raise BodyTooLarge(overflow_message)
            return message

        async def guarded_send(message: Message) -> None:
            if not state["exceeded"]:
                await send(message)
                return
            if message["type"] == "http.response.start" and message["status"] != 413:
                state["replaced"] = True
                await _send_json(send, 413, error_body("too_large", overflow_message))
                return
            if state["replaced"]:
                return  # the body of the response that the 413 replaced
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
