"""The FastAPI application: `app_factory(settings)` for tests and embedding, `create_app_from_env()` for uvicorn.

The lifespan loads the bundle and the catalog in a worker thread, then starts
the micro-batcher and the job runner. Until then `/healthz` is 200 and
`/readyz` 503. Shutdown lets the job runner finish its current step, drains
the batcher and closes the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.errors import ApiError, install_error_handlers
from service.fastpath import SearchFastPath
from service.forwarding import InternalServer, writer_socket_path
from service.indexing import process_job_step
from service.jobs import JobRunner, JobStore
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.routes import find_route, health, indexing, items, jobs, search
from service.runtime import ServiceRuntime, run_in_thread
from service.settings import Settings
from service.workers import ForwardWrites, mark_forwarded

logger = logging.getLogger(__name__)

STATIC_FOLDER = Path(__file__).parent / "static"
# Swagger UI 5 (which renders OpenAPI 3.1) and ReDoc scripts, CSS and favicon.
DOCS_ASSETS_FOLDER = Path(fastapi_offline.__file__).parent / "static"
API_VERSION = "0.1.0"
# FastAPI 0.16x checks on every request whether an OpenTelemetry provider is configured (about 3 us of the
# event loop's time). The service exports its own Prometheus metrics at /metrics, so the hook stays off.
_NO_NATIVE_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def _start_jobs(runtime: ServiceRuntime) -> None:
    settings = runtime.settings
    store = JobStore(settings.jobs_folder)
    runner = JobRunner(
        store,
        functools.partial(process_job_step, runtime.catalog, runtime.embedder),
        lambda function, *args: run_in_thread(runtime.write_executor, function, *args),
        batch_size=settings.job_batch_size,
        on_step=runtime.record_index_outcomes,
    )
    runtime.jobs = runner
    if settings.run_jobs and runtime.role == "writer":
        removed = store.remove_orphan_folders()
        if removed:
            logger.info("removed %d spool folders of uploads cut off before they were accepted", removed)
        runner.start()


async def _load(app: FastAPI, runtime: ServiceRuntime) -> None:
    try:
        await asyncio.get_running_loop().run_in_executor(None, runtime.load)
        runtime.writer_socket = writer_socket_path(runtime.settings.index)
        runtime.start_batcher()
        _start_jobs(runtime)
    except Exception as error:  # reported by /readyz and the log; the process keeps serving /healthz
        runtime.load_error = f"{type(error).__name__}: {error}"
        logger.error("loading the model or catalog failed: %s", runtime.load_error, exc_info=True)
        return
    runtime.ready = True
    if runtime.role == "writer" and runtime.settings.workers > 1:
        # The followers send their writes here once this worker is ready. The app is the same,
        # without a second lifespan.
        try:
            runtime.internal_server = InternalServer(mark_forwarded(app), runtime.writer_socket)
            await runtime.internal_server.start()
        except Exception as error:
            runtime.ready = False
            runtime.load_error = f"serving forwarded writes on {runtime.writer_socket} failed: {error}"
            logger.error("%s", runtime.load_error, exc_info=True)
            return
        logger.info("serving forwarded writes on %s", runtime.writer_socket)
    logger.info("ready", extra={"model_id": runtime.bundle.model_id})


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    runtime: ServiceRuntime = app.state.runtime
    loading = asyncio.create_task(_load(app, runtime), name="idml-load")
    try:
        yield
    finally:
        # A load still running in its thread cannot be interrupted, so wait for it before close() releases its parts.
        await asyncio.shield(loading)
        logger.info("shutting down")
        await runtime.close()
        logger.info("stopped")


def _body_limit(settings: Settings):
    def limit_for(scope) -> tuple[int, str]:
        if scope.get("path") == "/index" and scope.get("method") == "POST":
            return settings.max_index_upload_bytes, "IDML_MAX_INDEX_UPLOAD_BYTES"
        return settings.max_upload_bytes, "IDML_MAX_UPLOAD_BYTES"

    return limit_for


def _add_api_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI) and /redoc with their scripts from the fastapi-offline package, not a CDN."""
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_FOLDER), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
            redoc_favicon_url=f"{root}/docs-assets/favicon.png",
            with_google_fonts=False,
        )


def app_factory(settings: Settings) -> FastAPI:
    """Build the application for `settings`. Nothing loads until the lifespan starts."""
    metrics = ServiceMetrics()
    app = FastAPI(
        title="idml-search",
        version=API_VERSION,
        summary="Image similarity search with introspective distance and calibrated confidence",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        **_NO_NATIVE_TELEMETRY,
    )
    app.state.settings = settings
    app.state.runtime = ServiceRuntime(settings, metrics)
    install_error_handlers(app)

    for module in (search, indexing, items, jobs, health):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def search_page() -> FileResponse:
        page = STATIC_FOLDER / "index.html"
        if not page.is_file():
            raise ApiError(404, "not_found", "the search page is not installed (service/static/index.html); the API is at /docs")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_FOLDER, check_dir=False), name="static")
    _add_api_docs(app)

    # Middleware added later runs earlier: the request id and metrics cover the size-limit responses,
    # and the fast path reads bodies through the size limit.
    app.add_middleware(
        SearchFastPath, route=find_route(search.router, "POST", "/search"), enabled=settings.search_fast_path
    )
    write_routes = {
        "POST": find_route(indexing.router, "POST", "/index"),
        "DELETE": find_route(items.router, "DELETE", "/items/{item_id:path}"),
    }
    app.add_middleware(ForwardWrites, routes=write_routes)
    app.add_middleware(BodySizeLimitMiddleware, limit_for=_body_limit(settings))
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for `idml-serve`: settings from IDML_* variables, logging set up for this worker."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return app_factory(settings)
