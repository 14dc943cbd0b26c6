"""Checks on client JSON before it reaches pydantic or the catalog: nesting depth and search filters."""

from __future__ import annotations

import json
import math
from typing import Any

from service.errors import ApiError

# Deepest nesting of arrays and objects accepted in a JSON body or field. The API needs 3 levels
# (the `items` list, an item object, its attributes object); the margin leaves room for clients.
MAX_JSON_DEPTH = 32
# Filters: maximum number of keys, and maximum key and string value lengths in characters.
MAX_FILTER_KEYS = 32
MAX_FILTER_KEY_LENGTH = 256
MAX_FILTER_STRING_LENGTH = 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for a flat list or object."""
    depth = 0
    stack = [(value, 1)]
    while stack:
        current, level = stack.pop()
        if isinstance(current, dict):
            children = current.values()
        elif isinstance(current, list):
            children = current
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children)
    return depth


class DuplicateKeyError(ValueError):
    """Error for a JSON object that names one key twice, given as `key`."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys, so {"vendor": "a", "vendor": "b"} would filter
    # on "b" without a word. RFC 8259 says names SHOULD be unique, so this API rejects repeats.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def load_json(text: str | bytes, what: str, code: str = "invalid_json") -> Any:
    """Parse `text` as JSON nested at most MAX_JSON_DEPTH levels, each object with distinct keys.

    Raises ApiError 400 `code` naming `what`.
    """
    try:
        value = json.loads(text, object_pairs_hook=_unique_object)
    except DuplicateKeyError as error:
        raise ApiError(
            400, code, f"{what} has the key {error.key!r} twice in one object; send each key once"
        ) from None
    except json.JSONDecodeError as error:
        raise ApiError(400, code, f"{what} is not valid JSON: {error.msg} at position {error.pos}") from None
    except UnicodeDecodeError as error:
        raise ApiError(400, code, f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        # The C parser recurses once per level and gives up near the interpreter's recursion limit.
        value = None
        depth = None
    else:
        depth = json_depth(value)
    if depth is None or depth > MAX_JSON_DEPTH:
        raise ApiError(
            400, code, f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; send flatter JSON"
        )
    return value


def check_filter(value: Any) -> dict[str, Any] | None:
    """Validate a search filter: an object of at most MAX_FILTER_KEYS attribute names to scalar values.

    Values may be strings, booleans, finite numbers (integers within SQLite's 64-bit range) or
    None. Raises ApiError 400 `invalid_filter` naming the first invalid key.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(
            400,
            "invalid_filter",
            f'filter must be a JSON object such as {{"vendor": "google"}}, got a {_json_type(value)}',
        )
    if len(value) > MAX_FILTER_KEYS:
        raise ApiError(
            400, "invalid_filter", f"filter has {len(value)} keys, more than the limit of {MAX_FILTER_KEYS}"
        )
    for key, item in value.items():
        _check_filter_key(key)
        _check_filter_value(key, item)
    return value


def _check_filter_key(key: str) -> None:
    if not key or len(key) > MAX_FILTER_KEY_LENGTH or '"' in key or any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        shown = key if len(key) <= 64 else key[:64] + "..."
        raise ApiError(
            400,
            "invalid_filter",
            f"filter key {shown!r} is invalid: use an attribute name of 1 to {MAX_FILTER_KEY_LENGTH} characters "
            "without double quotes or control characters",
        )


def _check_filter_value(key: str, value: Any) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ApiError(
                400,
                "invalid_filter",
                f"filter value for {key!r} is outside the 64-bit integer range "
                f"{INT64_MIN} to {INT64_MAX}; no stored attribute can equal it",
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError(400, "invalid_filter", f"filter value for {key!r} must be a finite number, got {value!r}")
        return
    if isinstance(value, str):
        if len(value) > MAX_FILTER_STRING_LENGTH:
            raise ApiError(
                400,
                "invalid_filter",
                f"filter value for {key!r} is {len(value)} characters, more than the limit of {MAX_FILTER_STRING_LENGTH}",
            )
        return
    raise ApiError(
        400,
        "invalid_filter",
        f"filter value for {key!r} must be a string, number, boolean or null, got a {_json_type(value)}",
    )


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "JSON object"
    if isinstance(value, list):
        return "JSON array"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
