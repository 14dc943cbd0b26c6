"""Several worker processes over one catalog: one writes, the others follow it and forward writes to it.

The catalog admits one writing process. With `IDML_WORKERS` above 1, the
worker that takes the catalog's lock first is the writer: it serves the app
on a Unix socket as well (`writer_socket_path`, mode 0600). The other workers
open the catalog as followers (`Catalog.open(follow=True)`). Before each read
they apply what the writer committed, so a read that starts after a write was
acknowledged sees it, whichever worker serves it. `ForwardWrites` sends
their writes (POST /index, DELETE /items/{id}) to the writer over the socket,
after checking the API key, and returns the writer's response unchanged.
When the writer is down, uvicorn starts a new worker, which takes the lock
and becomes the writer. Until then, forwarded writes get 503
`writer_unavailable`. A follower that finds no process holding the lock for
WRITER_GONE_AFTER_S (the writer was another server that stopped, or an
`idml-index` command that ended) stops itself gracefully, and uvicorn's
restart makes it the writer. The writer counts forwarded requests in no
metrics. It returns their error code in a header, and the follower counts them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.locks import ProcessLock
from service.deps import check_write_access
from service.errors import ApiError, send_api_error
from service.forwarding import WriterUnavailable, forward_request
from service.logs import current_request_id
from service.middleware import ERROR_CODE_HEADER, FORWARDED_KEY, REQUEST_ID_HEADER

logger = logging.getLogger(__name__)

# Seconds between a follower's decision to restart as the writer and its SIGTERM, so the 503 is sent first.
RESTART_DELAY_S = 0.5
# Seconds the catalog's lock must stay free, seen by two failed forwards, before a follower restarts to take
# it. uvicorn replaces a crashed worker of this server sooner (a health check every 0.5 s, then a load of
# about 1 to 2 s), and the replacement takes the lock.
WRITER_GONE_AFTER_S = 5.0
# A follower restarts itself only after serving this long, seconds, so a catalog that no worker can open
# for writing does not make the followers restart in a loop.
MIN_UPTIME_S = 15.0


def is_write(scope: Scope) -> bool:
    """Return whether an HTTP request changes the catalog."""
    method, path = scope["method"], scope["path"]
    return (method == "POST" and path == "/index") or (method == "DELETE" and path.startswith("/items/"))


class ForwardWrites:
    """On a following worker, send write requests to the writing worker; pass everything else on.

    `routes` maps each write's method (POST, DELETE) to its FastAPI route, for the metrics' route label.
    """

    def __init__(self, app: ASGIApp, routes: dict[str, object]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_write(scope):
            await self.app(scope, receive, send)
            return
        runtime = scope["app"].state.runtime
        if runtime.role != "follower":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes.get(scope["method"])
        try:
            check_write_access(scope, runtime.settings)
            try:
                # The writer logs under this request's id, and its echo of the id is dropped: the
                # request middleware here adds it once.
                request_id = [(REQUEST_ID_HEADER.encode(), current_request_id().encode())]
                await forward_request(
                    scope, receive, _relay_response(scope, send), runtime.writer_socket, extra_headers=request_id
                )
            except WriterUnavailable as error:
                raise _writer_unavailable(runtime, scope, error) from None
        except ApiError as error:
            await send_api_error(error, scope, receive, send)


def _relay_response(scope: Scope, send: Send) -> Send:
    """Wrap `send` for the writer's response: drop its X-Request-ID, and take its error code for the metrics."""

    async def relay(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = []
            for name, value in message.get("headers", ()):
                lowered = name.lower()
                if lowered == ERROR_CODE_HEADER.encode():
                    scope["idml.error_code"] = value.decode("latin-1")
                elif lowered != REQUEST_ID_HEADER.encode():
                    headers.append((name, value))
            message = {**message, "headers": headers}
        await send(message)

    return relay


def mark_forwarded(app: ASGIApp) -> ASGIApp:
    """Wrap the app that the writer serves to followers, so its middleware can tell that a request was forwarded."""

    async def forwarded(scope: Scope, receive: Receive, send: Send) -> None:
        scope[FORWARDED_KEY] = True
        await app(scope, receive, send)

    return forwarded


def _writer_unavailable(runtime, scope: Scope, error: WriterUnavailable) -> ApiError:
    """Build the 503 for a write the writer did not take; restart this worker when no process writes the catalog."""
    folder = runtime.settings.index
    lock = ProcessLock(folder / "lock")
    now = time.monotonic()
    # A worker that opens the catalog while this check holds the lock retries (service.runtime.open_catalog).
    if not lock.is_free():
        runtime.lock_free_since = None
    elif runtime.lock_free_since is None or now - runtime.lock_free_since > 10 * WRITER_GONE_AFTER_S:
        runtime.lock_free_since = now  # the first sight, or one too old to count
    elif now - runtime.lock_free_since >= WRITER_GONE_AFTER_S and now - runtime.started_at >= MIN_UPTIME_S:
        # The writer is gone for good: another server that stopped, or an idml-index command that ended.
        # A crashed writer worker of this server would have been restarted and taken the lock by now.
        # A restarted worker opens the catalog first, so it takes the lock and writes.
        if not runtime.restarting:
            runtime.restarting = True
            logger.warning("no process writes catalog %s any more; restarting this worker to become its writer", folder)
            asyncio.get_running_loop().call_later(RESTART_DELAY_S, os.kill, os.getpid(), signal.SIGTERM)
        return ApiError(
            503,
            "writer_unavailable",
            "no process writes this catalog any more, so this server is restarting a worker to write it; "
            "retry in a few seconds",
            {"Retry-After": "2"},
        )
    holder = lock.holder()
    logger.warning("forwarding %s %s to the writing process (pid %s) failed: %s", scope["method"], scope["path"], holder, error)
    return ApiError(
        503,
        "writer_unavailable",
        f"the process that writes this catalog (pid {holder}) does not answer on {runtime.writer_socket}. "
        "If it is a worker of this server that is restarting, retry shortly. If it is another "
        "idml-serve or an idml-index command, write through that process, or stop it and restart this server",
        {"Retry-After": "1"},
    )
