"""The /jobs resource: progress and per-item outcomes of index jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Query

from service.deps import ReadAccess, RuntimeDep
from service.errors import ApiError
from service.runtime import run_in_thread
from service.schemas.common import MAX_OFFSET, error_responses
from service.schemas.indexing import JobPage, JobPublic

router = APIRouter(prefix="/jobs", tags=["index"])

MAX_PAGE = 1000


def _counts(record) -> dict:
    return {status: record.counts.get(status, 0) for status in ("added", "replaced", "error")}


@router.get("", response_model=JobPage, summary="List index jobs", dependencies=[ReadAccess],
            responses=error_responses(401, 422, 503))
async def list_jobs(
    runtime: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict:
    """Jobs, newest first."""
    total, records = await run_in_thread(runtime.request_executor, runtime.jobs.store.list_jobs, offset, limit)
    jobs = [
        {
            "id": record.id,
            "status": record.status,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "progress": {"done": record.done, "total": record.total},
        }
        for record in records
    ]
    return {"total": total, "offset": offset, "limit": limit, "jobs": jobs}


@router.get("/{job_id}", response_model=JobPublic, summary="Get an index job", dependencies=[ReadAccess],
            responses=error_responses(401, 404, 422, 503))
async def get_job(
    runtime: RuntimeDep,
    job_id: Annotated[str, PathParam(min_length=1, max_length=64)],
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="First item outcome to return")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Item outcomes to return")] = 100,
) -> dict:
    """Status, progress (done of total) and per-item outcomes (`pending` until processed)."""
    store = runtime.jobs.store
    record = await run_in_thread(runtime.request_executor, store.get, job_id)
    if record is None:
        raise ApiError(404, "job_not_found", f"no index job has the id {job_id!r}")
    items = await run_in_thread(runtime.request_executor, store.outcomes, job_id, offset, limit)
    return {
        "id": record.id,
        "status": record.status,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "progress": {"done": record.done, "total": record.total},
        "counts": _counts(record),
        "error": record.error,
        "items_offset": offset,
        "items": items,
    }
