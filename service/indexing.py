"""Store uploaded items in the catalog and report one outcome per item, for inline requests and job steps."""

from __future__ import annotations

import logging
from pathlib import Path

from index.catalog import ItemInput
from service.jobs import PendingItem, StepOutcomes

logger = logging.getLogger(__name__)


def add_to_catalog(catalog, embedder, entries: list[tuple[int, ItemInput]]) -> StepOutcomes:
    """Add or replace `entries` ((position, item) pairs); returns (position, status, reason, error) per entry.

    A bad image gets its own error outcome from the catalog; the other items are stored.
    """
    if not entries:
        return []
    outcomes = catalog.add_images([item for _, item in entries], embedder)
    by_id = {outcome.id: outcome for outcome in outcomes}
    results = []
    for position, item in entries:
        outcome = by_id.get(item.id)
        if outcome is None:
            results.append((position, "error", "not_processed", "the catalog returned no outcome for this item"))
        else:
            results.append((position, outcome.status, outcome.reason, outcome.error))
    return results


def read_pending(items: list[PendingItem]) -> tuple[list[tuple[int, ItemInput]], StepOutcomes]:
    """Read the spooled files of a job step; a missing file becomes that item's error."""
    entries, failures = [], []
    for item in items:
        try:
            data = Path(item.path).read_bytes()
        except OSError as error:
            logger.error("spooled file of item %s is unreadable: %s", item.id, error, extra={"item_id": item.id})
            failures.append((item.position, "error", "spool_missing", f"the uploaded file was lost: {error}"))
            continue
        entries.append((item.position, ItemInput(item.id, data, item.label, item.attributes)))
    return entries, failures


def process_job_step(catalog, embedder, items: list[PendingItem]) -> StepOutcomes:
    """Index one job step from its spooled files."""
    entries, failures = read_pending(items)
    return failures + add_to_catalog(catalog, embedder, entries)
