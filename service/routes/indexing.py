"""POST /index: add or replace catalog items from uploaded images or an archive."""

from __future__ import annotations

import functools
import logging
import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from index.catalog import ItemInput
from service.deps import RuntimeDep, WriteAccess
from service.errors import ApiError
from service.indexing import add_to_catalog
from service.runtime import ServiceRuntime, run_in_thread
from service.schemas.common import error_responses
from service.schemas.indexing import IndexAccepted, IndexResult, ItemFields
from service.uploads import item_fields_from_form, spool_archive, spool_images

logger = logging.getLogger(__name__)

router = APIRouter(tags=["index"])

_FIELDS = {"images", "ids", "labels", "attributes", "items", "archive"}
# Size of one text field (the `items` JSON list can be long), bytes.
_MAX_TEXT_FIELD_BYTES = 16 * 1024 * 1024

_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "Image files; metadata fields below align with them by position",
                    },
                    "ids": {"type": "array", "items": {"type": "string"}, "description": "One item id per image"},
                    "labels": {"type": "array", "items": {"type": "string"}, "description": "Optional, one per image"},
                    "attributes": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Optional, one JSON object per image",
                    },
                    "items": {
                        "type": "string",
                        "description": "Instead of ids/labels/attributes: a JSON list of {id, label, attributes}",
                    },
                    "archive": {
                        "type": "string",
                        "format": "binary",
                        "description": "Instead of images: a zip or tar(.gz) with manifest.csv "
                        "(columns path,id,label and one per attribute)",
                    },
                },
            }
        }
    },
}


def _texts(form, name: str) -> list[str]:
    values = form.getlist(name)
    for value in values:
        if isinstance(value, UploadFile):
            raise ApiError(422, "invalid_request", f"multipart field {name!r} must be text, not a file")
    return [str(value) for value in values]


def _files(form, name: str) -> list[UploadFile]:
    values = form.getlist(name)
    for value in values:
        if not isinstance(value, UploadFile):
            raise ApiError(422, "invalid_request", f"multipart field {name!r} must be a file, not a text value")
    return values


def _spool_archive_job(runtime: ServiceRuntime, upload: UploadFile) -> tuple[str, int]:
    settings = runtime.settings
    store = runtime.jobs.store
    job_id, folder = store.new_job_folder()
    try:
        archive_path = folder / "upload.archive"
        upload.file.seek(0)
        with open(archive_path, "wb") as handle:
            shutil.copyfileobj(upload.file, handle, 1024 * 1024)
        items = spool_archive(
            archive_path,
            folder,
            max_items=settings.max_index_items,
            max_item_bytes=settings.max_upload_bytes,
            max_total_bytes=settings.max_index_upload_bytes,
        )
        archive_path.unlink()
        record = store.create(job_id, items)
    except BaseException:
        store.remove_spool(job_id)
        raise
    return job_id, record.total


def _spool_images_job(runtime: ServiceRuntime, uploads: list[UploadFile], fields: list[ItemFields]) -> tuple[str, int]:
    store = runtime.jobs.store
    job_id, folder = store.new_job_folder()
    try:
        items = spool_images(folder, [upload.file for upload in uploads], fields, runtime.settings.max_upload_bytes)
        record = store.create(job_id, items)
    except BaseException:
        store.remove_spool(job_id)
        raise
    return job_id, record.total


def _read_inline(uploads: list[UploadFile], fields: list[ItemFields], limit: int):
    entries, failures = [], []
    for position, (upload, meta) in enumerate(zip(uploads, fields)):
        upload.file.seek(0)
        data = upload.file.read(limit + 1)
        if len(data) > limit:
            failures.append((position, "error", "too_large", f"the image is larger than {limit} bytes (IDML_MAX_UPLOAD_BYTES)"))
            continue
        entries.append((position, ItemInput(meta.id, data, meta.label, dict(meta.attributes))))
    return entries, failures


def _result(outcomes, fields: list[ItemFields]) -> dict:
    items = []
    counts = {"added": 0, "replaced": 0, "error": 0}
    for position, status, reason, error in sorted(outcomes):
        counts[status] += 1
        items.append({"position": position, "id": fields[position].id, "status": status, "reason": reason, "error": error})
    return {"status": "completed", "counts": counts, "items": items}


def _accepted(job_id: str, total: int) -> JSONResponse:
    body = IndexAccepted(
        job_id=job_id, status_url=f"/jobs/{job_id}", progress={"done": 0, "total": total}
    ).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job_id}"})


@router.post(
    "/index",
    summary="Add or replace items",
    dependencies=[WriteAccess],
    openapi_extra={"requestBody": _REQUEST_BODY},
    response_model=IndexResult,
    responses={202: {"model": IndexAccepted, "description": "Accepted as a job; poll status_url"}}
    | error_responses(400, 401, 403, 413, 415, 422, 503),
)
async def add_items(request: Request, runtime: RuntimeDep):
    """Upload images with their ids (and optional labels and attributes), or one archive with a
    manifest.csv. An existing id is replaced. Requests of at most IDML_INLINE_INDEX_MAX_ITEMS
    images run at once and return 200 with an outcome per item; larger ones and every archive
    are spooled to disk and return 202 with a job id (see GET /jobs/{job_id}). A bad image
    gets its own error outcome and the other items are still stored.
    """
    settings = runtime.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type or '(none)'} is not accepted: send multipart/form-data with "
            "'images' files and 'ids' fields, or one 'archive' file",
        )
    async with request.form(
        max_files=settings.max_index_items + 1,
        max_fields=3 * settings.max_index_items + 8,
        max_part_size=_MAX_TEXT_FIELD_BYTES,
    ) as form:
        unexpected = sorted(set(form.keys()) - _FIELDS)
        if unexpected:
            raise ApiError(
                422, "invalid_request", f"unexpected multipart field {unexpected[0]!r}; accepted: {', '.join(sorted(_FIELDS))}"
            )
        images = _files(form, "images")
        archives = _files(form, "archive")
        ids, labels, attributes, items_json = (_texts(form, name) for name in ("ids", "labels", "attributes", "items"))

        if archives:
            if images or ids or labels or attributes or items_json:
                raise ApiError(
                    422, "invalid_request", "send either one 'archive' (metadata in its manifest.csv) or 'images' with metadata, not both"
                )
            if len(archives) > 1:
                raise ApiError(422, "invalid_request", f"send one 'archive' per request, got {len(archives)}")
            job_id, total = await run_in_thread(runtime.request_executor, _spool_archive_job, runtime, archives[0])
            runtime.jobs.wake()
            logger.info("index job %s accepted: archive with %d items", job_id, total, extra={"job_id": job_id})
            return _accepted(job_id, total)

        if not images:
            raise ApiError(
                422, "missing_field", "no images: send image files in the 'images' field, or one 'archive' file"
            )
        if len(images) > settings.max_index_items:
            raise ApiError(
                413, "too_many_items", f"{len(images)} images is more than {settings.max_index_items} (IDML_MAX_INDEX_ITEMS)"
            )
        fields = item_fields_from_form(ids, labels, attributes, items_json, len(images))

        if len(images) > settings.inline_index_max_items:
            job_id, total = await run_in_thread(runtime.request_executor, _spool_images_job, runtime, images, fields)
            runtime.jobs.wake()
            logger.info("index job %s accepted: %d images", job_id, total, extra={"job_id": job_id})
            return _accepted(job_id, total)

        entries, failures = await run_in_thread(
            runtime.request_executor, _read_inline, images, fields, settings.max_upload_bytes
        )
    add = functools.partial(add_to_catalog, runtime.catalog, runtime.embedder)
    outcomes = failures + await run_in_thread(runtime.write_executor, add, entries)
    runtime.record_index_outcomes(outcomes)
    return _result(outcomes, fields)
