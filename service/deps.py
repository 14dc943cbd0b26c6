"""Route dependencies: the loaded runtime and API-key checks.

Writes (POST /index, DELETE /items/{id}) always need the key. When no key is
configured they are rejected with 403, unless
IDML_ALLOW_UNAUTHENTICATED_WRITES=true (meant for a local demo). Reads are
open unless IDML_READ_KEY_REQUIRED=true. The key is read from `X-API-Key` or
`Authorization: Bearer <key>`, compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.types import Scope

from service.errors import ApiError
from service.runtime import ServiceRuntime
from service.settings import MIN_API_KEY_LENGTH, Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _presented_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _check_key(headers: Mapping[str, str], settings: Settings) -> None:
    expected = settings.api_key.get_secret_value().encode()
    presented = _presented_key(headers)
    challenge = {"WWW-Authenticate": "Bearer"}
    if presented is None:
        raise ApiError(
            401,
            "missing_api_key",
            "this request needs the API key: send it in the X-API-Key header or as Authorization: Bearer <key>",
            challenge,
        )
    if not hmac.compare_digest(presented.encode(), expected):
        raise ApiError(401, "invalid_api_key", "the API key is not valid", challenge)


async def require_write_key(request: Request, settings: SettingsDep) -> None:
    """Let a write through only with the right key, or with no key configured and unauthenticated writes allowed."""
    check_write_access(request.scope, settings)
    if request.app.state.runtime.role == "follower":
        # Followers forward writes before routing (service/workers.py), so a write never gets here.
        raise ApiError(503, "writer_unavailable", "this worker follows the catalog's writer and cannot write itself")


def check_write_access(scope: Scope, settings: Settings) -> None:
    """Raise ApiError 401 or 403 unless a write of this ASGI request may go ahead."""
    if settings.api_key is None:
        if settings.allow_unauthenticated_writes:
            return
        raise ApiError(
            403,
            "writes_disabled",
            "writes need an API key but the server has none: set IDML_API_KEY "
            f"(at least {MIN_API_KEY_LENGTH} characters) and send it as X-API-Key or Authorization: Bearer; "
            "for a local demo, IDML_ALLOW_UNAUTHENTICATED_WRITES=true allows writes without a key",
        )
    _check_key(Headers(scope=scope), settings)


async def require_read_key(request: Request, settings: SettingsDep) -> None:
    """Check the key on reads when IDML_READ_KEY_REQUIRED is true."""
    check_read_access(request.scope, settings)


def check_read_access(scope: Scope, settings: Settings) -> None:
    """Raise ApiError 401 unless a read of this ASGI request may go ahead."""
    if settings.read_key_required:
        _check_key(Headers(scope=scope), settings)


async def get_runtime(request: Request) -> ServiceRuntime:
    """Return the loaded runtime; raise 503 while the model and catalog load, or after loading failed."""
    runtime: ServiceRuntime = request.app.state.runtime
    if runtime.ready:
        return runtime
    if runtime.load_error is not None:
        raise ApiError(503, "load_failed", f"the service could not load its model or catalog: {runtime.load_error}")
    raise ApiError(503, "not_ready", "the service is still loading its model and catalog; retry shortly",
                   {"Retry-After": "1"})


WriteAccess = Depends(require_write_key)
ReadAccess = Depends(require_read_key)
RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
