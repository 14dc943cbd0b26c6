"""Schemas shared by every resource: the error body and attribute values."""

from __future__ import annotations

from pydantic import BaseModel, Field

# Attribute values are JSON scalars; filters compare them for equality.
AttributeValue = str | int | float | bool
Attributes = dict[str, AttributeValue]
# Filter values may also be null: it matches a JSON null attribute, or with key "label" an item without label.
FilterValues = dict[str, AttributeValue | None]


# Largest `offset` of the paged routes: above any catalog or job size, and far inside SQLite's 64-bit integers.
MAX_OFFSET = 10**12


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, for example `too_many_pixels`")
    message: str = Field(description="What failed, on which value, and what to do")
    request_id: str = Field(description="The request id, also in the X-Request-ID header and the server log")


class ErrorResponse(BaseModel):
    """Body of every 4xx and 5xx response."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries documenting the error body for `statuses`."""
    return {status: {"model": ErrorResponse} for status in statuses}
