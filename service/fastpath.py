"""A lean ASGI path for the usual POST /search request: one multipart file `image`.

Under FastAPI a search request spends most of its event-loop time in
dependency solving, form parsing and response wrapping. That time holds the
GIL, so it slows the whole process under load and adds to every request's
latency. `SearchFastPath` serves the usual request shape directly: the
`image` file as the only multipart part, and k, candidates, min_confidence
and filter as plain query parameters given at most once each. It uses the
route's own checks (`check_read_access`, `parse_filter`, `search_options`) and
`run_search`. Any other request goes to the FastAPI route unchanged. That
includes JSON bodies, unknown or repeated parameters, unusual number
spellings, odd multipart layouts and a server that is not ready. When the
body has already been read, it is replayed. Error messages for unusual
input therefore come from one place, the route.

`IDML_SEARCH_FAST_PATH=false` turns it off; the tests compare both paths.
"""

from __future__ import annotations

import re
import urllib.parse

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, send_api_error

_KNOWN_PARAMETERS = frozenset({"k", "candidates", "min_confidence", "filter"})
# Spellings of the numeric parameters that mean the same to FastAPI's parser and to int()/float().
# Anything else ("+5", " 5", "1e-1", "nan", "") takes the route and gets its error message.
_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,6}(\.[0-9]{1,17})?|\.[0-9]{1,17}")
# `name=value` parameters of a header such as Content-Type or Content-Disposition. A quoted value
# with a backslash escape is not matched, so such a header takes the route.
_HEADER_PARAMETER = re.compile(r';\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)=("[^"\\\r\n]*"|[^;\s"]+)\s*')
# RFC 2046: a boundary is 1 to 70 characters.
_MAX_BOUNDARY = 70


def _header_parameters(value: str) -> tuple[str, dict[str, str]] | None:
    """Split `type; a=1; b="2"` into ("type", {"a": "1", "b": "2"}); None if it has any other shape."""
    kind, separator, rest = value.partition(";")
    parameters: dict[str, str] = {}
    if separator:
        rest = ";" + rest
        position = 0
        while position < len(rest):
            match = _HEADER_PARAMETER.match(rest, position)
            if match is None:
                return None
            name, raw = match.group(1).lower(), match.group(2)
            if name in parameters:
                return None
            parameters[name] = raw[1:-1] if raw.startswith('"') else raw
            position = match.end()
    return kind.strip().lower(), parameters


def multipart_boundary(content_type: str) -> str | None:
    """Return the boundary of a `multipart/form-data` Content-Type, or None for any other header."""
    parsed = _header_parameters(content_type)
    if parsed is None or parsed[0] != "multipart/form-data":
        return None
    boundary = parsed[1].get("boundary")
    if not boundary or len(boundary) > _MAX_BOUNDARY:
        return None
    return boundary


def single_image_part(body: bytes, boundary: str) -> bytes | None:
    """Extract the content of the body's only part when that part is the file field `image`, else return None.

    The accepted layout is: `--boundary CRLF`, headers (Content-Disposition
    `form-data; name="image"; filename="..."`, optionally Content-Type), an
    empty line, the content, `CRLF --boundary--`, and an ignored epilogue.
    A preamble, a second part, a text field or an unknown part header returns None.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    if not body.startswith(delimiter + b"\r\n"):
        return None
    headers_start = len(delimiter) + 2
    headers_end = body.find(b"\r\n\r\n", headers_start)
    if headers_end < 0:
        return None
    content_start = headers_end + 4
    content_end = body.find(b"\r\n" + delimiter, content_start)
    if content_end < 0 or body[content_end + 2 + len(delimiter) : content_end + 4 + len(delimiter)] != b"--":
        return None

    disposition = None
    for line in body[headers_start:headers_end].split(b"\r\n"):
        name, separator, value = line.partition(b":")
        # Exact names only: python-multipart rejects whitespace before the colon or the name.
        name = name.lower()
        if not separator or name not in (b"content-disposition", b"content-type"):
            return None
        if name == b"content-disposition":
            if disposition is not None:
                return None
            disposition = value.decode("latin-1").strip()
    if disposition is None:
        return None
    parsed = _header_parameters(disposition)
    if parsed is None:
        return None
    kind, parameters = parsed
    if kind != "form-data" or parameters.get("name") != "image" or not parameters.get("filename"):
        return None
    if set(parameters) != {"name", "filename"}:
        return None
    return body[content_start:content_end]


def query_values(query_string: bytes) -> dict | None:
    """Parse the search parameters of a query string as the route receives them; None sends the request to the route."""
    values: dict = {}
    for name, value in urllib.parse.parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name not in _KNOWN_PARAMETERS or name in values:
            return None
        if name in ("k", "candidates"):
            if not _INTEGER.fullmatch(value):
                return None
            values[name] = int(value)
        elif name == "min_confidence":
            if not _DECIMAL.fullmatch(value):
                return None
            values[name] = float(value)
        else:
            values[name] = value
    return values


def _replay(body: bytes, receive: Receive) -> Receive:
    """Wrap `receive` so that it returns `body` once, then what `receive` returns (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


class SearchFastPath:
    """Serve the usual POST /search request without FastAPI's per-request machinery; pass the rest on."""

    def __init__(self, app: ASGIApp, route: object, enabled: bool = True):
        self.app = app
        self.route = route  # the FastAPI route of POST /search, set in the scope for the metrics' route label
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope["path"] != "/search" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # Imported here: the route module imports the app's dependencies, which import this one's users.
        from service.deps import check_read_access
        from service.pipeline import run_search
        from service.routes.search import parse_filter, search_options

        state = scope["app"].state
        runtime = state.runtime
        content_type = ""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
                break
        boundary = multipart_boundary(content_type)
        values = query_values(scope["query_string"])
        if boundary is None or values is None or not runtime.ready:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route

        try:
            check_read_access(scope, state.settings)
            values["filter"] = parse_filter(values.get("filter"))
            options = search_options(values, "query.")
            body, disconnected = await _read_body(receive)
            if disconnected:
                raise ClientDisconnect()  # the request middleware records it
            data = single_image_part(body, boundary)
            if data is None:
                await self.app(scope, _replay(body, receive), send)
                return
            result = await run_search(runtime, data, options)
        except ApiError as error:
            await send_api_error(error, scope, receive, send)
            return
        payload = orjson.dumps(result)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """Read the whole request body; also return whether the client disconnected before it ended.

    The body-size middleware outside this one raises its 413 ApiError from `receive` once the limit is passed.
    """
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False
