"""Schemas of POST /index and the /jobs resource."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import Attributes

# Item ids are 1 to 512 characters without control characters, as the catalog accepts them. They may
# contain "/" (idml-index uses relative paths as ids), which URLs carry percent-encoded or as is.
ITEM_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
MAX_ITEM_ID_LENGTH = 512


class ItemFields(BaseModel):
    """Metadata of one uploaded image: an element of the `items` multipart field."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ITEM_ID_LENGTH, pattern=ITEM_ID_PATTERN)
    label: str | None = Field(None, max_length=1024)
    attributes: Attributes = Field(default_factory=dict)


class ItemOutcomePublic(BaseModel):
    position: int = Field(description="0-based position of the item in the request (or manifest row)")
    id: str
    status: Literal["pending", "added", "replaced", "error"]
    reason: str | None = Field(None, description="Error code, for example `truncated` or `missing_file`")
    error: str | None = Field(None, description="What went wrong with this item")


class OutcomeCounts(BaseModel):
    added: int = 0
    replaced: int = 0
    error: int = 0


class IndexResult(BaseModel):
    """Response of an inline POST /index (200): every item is processed."""

    status: Literal["completed"] = "completed"
    counts: OutcomeCounts
    items: list[ItemOutcomePublic]


class Progress(BaseModel):
    done: int
    total: int


class IndexAccepted(BaseModel):
    """Response of a POST /index that became a job (202); poll `status_url`."""

    job_id: str
    status: Literal["queued"] = "queued"
    status_url: str
    progress: Progress


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "completed", "failed"]
    created_at: str
    updated_at: str
    progress: Progress
    counts: OutcomeCounts
    error: str | None = Field(None, description="Why the job failed, when status is failed")
    items_offset: int
    items: list[ItemOutcomePublic] = Field(description="Per-item outcomes, paged by offset and limit")


class JobSummary(BaseModel):
    id: str
    status: Literal["queued", "running", "completed", "failed"]
    created_at: str
    updated_at: str
    progress: Progress


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobSummary]
