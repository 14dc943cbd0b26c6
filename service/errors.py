"""Error responses: every failure is `{"error": {"code": ..., "message": ..., "request_id": ...}}`.

`code` is stable and machine-readable, `message` names the problem and the fix.
Image decoding failures map to statuses by their `ImageDecodeError.reason`
(see `DECODE_STATUS`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.imaging import ImageDecodeError
from service.logs import current_request_id

logger = logging.getLogger(__name__)

# HTTP status for each ImageDecodeError.reason. The error code is the reason itself.
DECODE_STATUS = {
    "empty": 400,  # zero bytes
    "not_an_image": 400,  # bytes of no image format Pillow recognises
    "unsupported_format": 415,  # an image, but in a format the service does not accept
    "too_many_pixels": 413,  # the header declares more than IDML_MAX_PIXELS pixels
    "truncated": 422,  # the data ends before the image does
    "corrupt": 422,  # the image data cannot be decoded
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "not_ready",
}


class ApiError(Exception):
    """An error the client can act on, rendered as the JSON error body with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def decode_error(error: ImageDecodeError, *, field: str = "image") -> ApiError:
    """Convert a decoder failure into an ApiError whose message names the upload field."""
    status = DECODE_STATUS.get(error.reason, 422)
    return ApiError(status, error.reason, f"{field}: {error}")


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "request_id": current_request_id()}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def send_api_error(error: ApiError, scope, receive, send) -> None:
    """Send `error` as the response of an ASGI request, and record its code for the request metrics."""
    scope["idml.error_code"] = error.code
    await error_response(error.status, error.code, error.message, error.headers)(scope, receive, send)


def describe_validation(error: RequestValidationError) -> str:
    """One line per invalid field, for example `query.k: Input should be less than or equal to 100`."""
    parts = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem.get("loc", ()))
        parts.append(f"{location}: {problem.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so that no error reaches the client in another shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        request.scope["idml.error_code"] = error.code
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        request.scope["idml.error_code"] = "invalid_request"
        return error_response(422, "invalid_request", describe_validation(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, f"http_{error.status_code}")
        if error.status_code == 400 and request.headers.get("content-type", "").startswith("multipart/form-data"):
            code = "invalid_multipart"  # raised by Starlette's multipart parser
        request.scope["idml.error_code"] = code
        if error.status_code == 404 and error.detail == "Not Found":
            message = f"no route matches {request.method} {request.url.path}; the API is listed at /docs"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request.scope["idml.error_code"] = "internal_error"
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "internal server error; the server log has the details under this request_id"
        )
