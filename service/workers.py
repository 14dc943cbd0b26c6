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
`writer_unavailable`.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import check_write_access
from service.errors import ApiError, error_response
from service.forwarding import WriterUnavailable, forward_request
from service.logs import current_request_id
from service.middleware import REQUEST_ID_HEADER

logger = logging.getLogger(__name__)


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
                    scope, receive, _without_request_id(send), runtime.writer_socket, extra_headers=request_id
                )
            except WriterUnavailable as error:
                logger.warning("forwarding %s %s to the writing worker failed: %s", scope["method"], scope["path"], error)
                raise ApiError(
                    503,
                    "writer_unavailable",
                    "the worker that writes to the catalog is not answering (it may be restarting); retry shortly",
                    {"Retry-After": "1"},
                ) from None
        except ApiError as error:
            scope["idml.error_code"] = error.code
            await error_response(error.status, error.code, error.message, error.headers)(scope, receive, send)


def _without_request_id(send: Send) -> Send:
    """Wrap `send` so that it drops the X-Request-ID header of the writer's response."""

    async def relay(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != REQUEST_ID_HEADER.encode()]
            message = {**message, "headers": headers}
        await send(message)

    return relay
