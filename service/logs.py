"""Structured logs: one JSON object (or key=value line) per record, each with the request id.

`RequestContextMiddleware` sets the request id in a context variable, and
`RequestIdFilter` copies it onto every record. Lines written by a handler, by
a thread-pool task started with `run_in_thread`, or by a library logger called
from them all carry it. Records outside a request get `-`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("idml_request_id", default="-")

# Attributes every LogRecord has; anything else passed through `extra=` is logged as a field.
# uvicorn's `color_message` (the message with ANSI colour codes) is left out too.
_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "color_message"}


_HANDLER_NAME = "idml-service"


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(value: str) -> contextvars.Token:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Add `record.request_id` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


def _extra_fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(logging.Formatter):
    """`time=... level=... logger=... request_id=... message="..." key=value` lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields.update(_extra_fields(record))
        line = " ".join(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(character in text for character in ' "=\n'):
        return text
    return json.dumps(text)


def configure_logging(level: str = "info", log_format: str = "json") -> None:
    """Send every logger, uvicorn's included, to stderr in the chosen format with request ids.

    Called once per process by the entry point (`service.cli` and the worker
    factory), never by library code.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:  # a second call replaces the first one's handler
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Requests are logged by RequestContextMiddleware, with their request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # faiss.loader logs at INFO each CPU-specific library it fails to load before the generic one
    # that works ("Could not load library with AVX512 support"), which reads like an error.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
