"""The /items resource: read, page through and delete catalog items, and fetch their original images."""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Query, Request, Response
from fastapi.responses import FileResponse

from service.deps import ReadAccess, RuntimeDep, WriteAccess
from service.errors import ApiError
from service.pipeline import item_image_url
from service.runtime import run_in_thread
from service.schemas.common import MAX_OFFSET, error_responses
from service.schemas.items import ItemPage, ItemPublic

router = APIRouter(prefix="/items", tags=["items"])

ItemId = Annotated[str, PathParam(min_length=1, max_length=512, description="The item's id; it may contain '/'")]
# Maximum page size of GET /items.
MAX_PAGE = 1000


def item_public(item) -> dict:
    return {
        "id": item.id,
        "label": item.label,
        "attributes": item.attributes,
        "content_hash": item.content_hash,
        "model_id": item.model_id,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "uncertainty": float(item.uncertainty),
        "image_url": item_image_url(item.id),
    }


def _not_found(item_id: str) -> ApiError:
    return ApiError(404, "item_not_found", f"no item has the id {item_id!r}")


@router.get("", response_model=ItemPage, summary="List items", dependencies=[ReadAccess],
            responses=error_responses(401, 422, 503))
async def list_items(
    runtime: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page")] = 50,
) -> dict:
    """Page through the catalog in insertion order; `total` is the catalog size."""
    catalog = runtime.catalog
    items = await run_in_thread(runtime.request_executor, catalog.list_items, offset, limit)
    total = await run_in_thread(runtime.request_executor, catalog.count)
    return {"total": total, "offset": offset, "limit": limit, "items": [item_public(item) for item in items]}


@router.get(
    "/{item_id:path}/image",
    summary="Get an item's original image",
    dependencies=[ReadAccess],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image as uploaded"},
        304: {"description": "If-None-Match lists the image's ETag: the client's copy is current"},
    }
    | error_responses(401, 404, 503),
)
async def get_item_image(item_id: ItemId, runtime: RuntimeDep, request: Request) -> Response:
    """Return the original bytes that were indexed, with their media type.

    Declared before `GET /items/{item_id}`, because ids may contain "/" and a path ending
    in `/image` must reach this route.
    NOTE: `GET /items/x/image` is therefore the image of item "x". An item whose id ends in
    "/image" cannot be read with `GET /items/{item_id}`, but its image and DELETE work.
    """
    catalog = runtime.catalog
    item = await run_in_thread(runtime.request_executor, catalog.get, item_id)
    path = await run_in_thread(runtime.request_executor, catalog.original_path, item_id)
    if item is None or path is None:
        raise _not_found(item_id)
    headers = {"ETag": f'"{item.content_hash}"', "Cache-Control": "private, max-age=3600"}
    if _etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    media_type = getattr(item, "media_type", None) or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header lists `etag` or is `*`; weak tags compare equal (RFC 9110 section 13.1.2)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


@router.get("/{item_id:path}", response_model=ItemPublic, summary="Get an item", dependencies=[ReadAccess],
            responses=error_responses(401, 404, 503))
async def get_item(item_id: ItemId, runtime: RuntimeDep) -> dict:
    item = await run_in_thread(runtime.request_executor, runtime.catalog.get, item_id)
    if item is None:
        raise _not_found(item_id)
    return item_public(item)


@router.delete("/{item_id:path}", status_code=204, summary="Delete an item", dependencies=[WriteAccess],
               responses=error_responses(401, 403, 404, 503))
async def delete_item(item_id: ItemId, runtime: RuntimeDep) -> Response:
    deleted = await run_in_thread(runtime.write_executor, functools.partial(runtime.catalog.delete, [item_id]))
    if deleted == 0:
        raise _not_found(item_id)
    runtime.refresh_item_count()
    return Response(status_code=204)
