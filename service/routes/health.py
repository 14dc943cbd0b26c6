"""Health, readiness, Prometheus metrics and catalog statistics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from index.imaging import supported_formats
from service.deps import ReadAccess, RuntimeDep
from service.errors import error_response
from service.runtime import SEARCH_OMP_THREADS, run_in_thread
from service.schemas.common import error_responses
from service.schemas.stats import Health, Readiness, StatsResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Process is up")
async def healthz() -> dict:
    """200 as soon as the process serves HTTP, also while the model loads."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Model and catalog are loaded",
            responses=error_responses(503))
async def readyz(request: Request):
    """200 once the model and the catalog are loaded; 503 before, or with the reason loading failed."""
    runtime = request.app.state.runtime
    if runtime.ready:
        return {"status": "ready", "model_id": runtime.bundle.model_id, "count": runtime.catalog.count(fresh=False)}
    if runtime.load_error is not None:
        return error_response(503, "load_failed", f"the service could not load its model or catalog: {runtime.load_error}")
    return error_response(503, "not_ready", "the model and catalog are still loading", {"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", dependencies=[ReadAccess],
            response_class=Response, responses={200: {"content": {"text/plain": {}}}} | error_responses(401))
async def metrics(request: Request) -> Response:
    """Request counts and latency histograms per route template, /search stage timings,
    micro-batch sizes, catalog size, indexed items and errors by code."""
    runtime = request.app.state.runtime
    if runtime.ready:
        runtime.refresh_item_count()
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/stats", response_model=StatsResponse, summary="Catalog and server statistics",
            dependencies=[ReadAccess], responses=error_responses(401, 503))
async def stats(runtime: RuntimeDep) -> dict:
    catalog_stats = await run_in_thread(runtime.request_executor, runtime.catalog.stats)
    settings = runtime.settings
    return {
        "count": catalog_stats["items"],
        "model_id": runtime.bundle.model_id,
        "index_type": catalog_stats.get("index", {}).get("kind"),
        "formats": supported_formats(),
        "threads": {
            "workers": settings.workers,
            "onnxruntime_intra_op": runtime.threads,
            "faiss_omp": SEARCH_OMP_THREADS,
            "decode": settings.resolved_decode_threads,
            "batch_window_ms": settings.batch_window_ms,
            "max_batch": settings.max_batch,
        },
        "worker": {"pid": os.getpid(), "role": runtime.role},
        "catalog": catalog_stats,
    }
