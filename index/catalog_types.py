"""Inputs, outputs and errors of the catalog API (`index.catalog.Catalog`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class CatalogError(RuntimeError):
    """A catalog operation that failed; the message names the catalog and what to do."""


class ModelMismatchError(CatalogError):
    """The catalog was embedded by a different model than the one given."""


class ItemNotFound(CatalogError, KeyError):
    """No item has the requested id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CatalogLockedError(CatalogError):
    """Another process has the catalog open for writing."""


@dataclass
class ItemInput:
    """An image to add under a user id; adding an existing id replaces that item."""

    id: str
    image: bytes  # encoded image file (JPEG, PNG, ...)
    label: str | None = None
    attributes: dict = field(default_factory=dict)  # JSON object; filters compare top-level keys


@dataclass
class ItemOutcome:
    """Outcome of one input item: added, replaced or rejected with an error."""

    id: str
    status: Literal["added", "replaced", "error"]
    reason: str | None = None  # machine-readable code for errors, e.g. ImageDecodeError.reason
    error: str | None = None  # human-readable message for errors


@dataclass
class Item:
    """A catalog entry."""

    id: str
    label: str | None
    attributes: dict
    content_hash: str  # sha256 hex of the original image bytes
    model_id: str  # model that computed the stored embedding
    created_at: str  # ISO 8601 UTC; kept when the item is replaced
    updated_at: str  # ISO 8601 UTC of the last add or replace
    uncertainty: float  # ||u||^2 of the item's uncertainty embedding
    media_type: str | None = None  # of the original, for example "image/jpeg"


@dataclass
class Candidate:
    """One search result."""

    item: Item
    similarity: float  # cosine similarity to the query, exact even for quantised indexes
    uncertainty: float  # ||u||^2 of the item
    uncertainty_vector: np.ndarray | None  # float32 (du,); only when the metric's beta_form is "diff"


@dataclass
class SearchParams:
    """Per-call search parameters; None uses the catalog's index spec."""

    nprobe: int | None = None  # IVF: inverted lists visited
    ef_search: int | None = None  # HNSW: candidate list size


@dataclass
class Problem:
    """One inconsistency found by `Catalog.verify`."""

    kind: str  # e.g. "missing_vector", "stray_vector", "missing_original", "orphan_original"
    detail: str
    id: str | None = None  # user id of the item concerned, when there is one


@dataclass
class VerifyReport:
    """Result of `Catalog.verify`."""

    items: int  # rows in the metadata store
    vectors: int  # live vectors in the index
    originals: int  # files in the originals store
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems
