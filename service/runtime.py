"""State of one server process: the model bundle, embedder, catalog, thread pools, batcher and job runner.

`ServiceRuntime.load()` runs in a thread started by the app's lifespan, so
`/healthz` returns 200 while the model and the catalog load. `/readyz` returns
503 until `ready` is true, with the load error if loading failed.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from index.bundle import ModelBundle, load_bundle
from index.embedder import Embedder
from index.milvus_backend import MilvusConfig
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def run_in_thread(executor: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` in `executor`, keeping the caller's context (its request id)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


# FAISS OpenMP threads of each search; see the request executor in ServiceRuntime.
SEARCH_OMP_THREADS = 1
# Seconds a following worker waits for the writing worker to create a new catalog.
FOLLOWER_WAIT_S = 120.0
# Tries to take the catalog's lock, 0.2 s apart, before a worker settles for following.
WRITER_OPEN_ATTEMPTS = 3


def set_faiss_threads(threads: int) -> None:
    """Set FAISS's OpenMP thread count for searches made by the calling thread.

    OpenMP keeps this setting per thread: a thread that never calls it uses
    OMP_NUM_THREADS. Run it in every thread that searches (an executor's
    `initializer`).
    """
    import faiss

    faiss.omp_set_num_threads(threads)


def open_catalog(settings: Settings, bundle: ModelBundle, milvus: MilvusConfig | None) -> tuple[Any, str]:
    """Open the catalog as its writer, or, with several workers and another one writing, as a follower.

    Returns (catalog, "writer" or "follower"). A follower that starts before
    the writer has created a new catalog waits for it up to FOLLOWER_WAIT_S.
    """
    from index.catalog import Catalog, CatalogError, CatalogLockedError, IndexSpec

    for _ in range(WRITER_OPEN_ATTEMPTS):
        try:
            catalog = Catalog.open(
                settings.index,
                bundle,
                index_spec=IndexSpec(kind=settings.index_kind) if settings.index_kind else None,
                create=settings.create_index,
                milvus=milvus,
            )
            return catalog, "writer"
        except CatalogLockedError:
            if settings.workers == 1:
                raise
            # A follower may hold the lock for an instant to check whether any writer is left.
            time.sleep(0.2)
        except (CatalogError, OSError) as error:
            if settings.workers == 1 or not (settings.index / "catalog.json").exists():
                raise
            # Another worker may still open it for writing; until then this one serves reads.
            logger.error("opening catalog %s for writing failed (%s); this worker only follows it", settings.index, error)
            break
    logger.info("another process writes catalog %s; this worker follows it and forwards writes", settings.index)
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while True:
        try:
            return Catalog.open(settings.index, bundle, read_only=True, follow=True, milvus=milvus), "follower"
        except CatalogError:
            if (settings.index / "catalog.json").exists() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # the writing worker is still creating the catalog


class ServiceRuntime:
    """Loaded state of one worker process. Fields are None until `load()` has run."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.bundle: ModelBundle | None = None
        self.embedder: Embedder | None = None
        self.direct_embedder: Embedder | None = None
        self.catalog = None  # index.catalog.Catalog
        # "writer" holds the catalog's lock; a "follower" (another worker has it) follows the writer's
        # commits and forwards writes to it over `writer_socket` (service/workers.py).
        self.role: str | None = None
        self.writer_socket: str | None = None
        self.internal_server = None  # service.forwarding.InternalServer of a writer with followers
        self.restarting = False  # a follower stopping itself to come back as the writer
        self.lock_free_since: float | None = None  # monotonic time a follower first found no writer
        self.started_at = time.monotonic()
        self.batcher: MicroBatcher | None = None
        self.jobs = None  # service.jobs.JobRunner
        self.ready = False
        self.load_error: str | None = None
        threads = settings.resolved_threads
        # Decoding, preprocessing, FAISS searches and file I/O of requests.
        # Each request searches one query, which FAISS runs on one core anyway. A larger OpenMP
        # team per thread only spins against onnxruntime's threads (3.7 ms per search instead of
        # 0.1 ms with 1,000 items on 2 cores). Concurrent requests give the parallelism.
        self.request_executor = ThreadPoolExecutor(
            settings.resolved_decode_threads,
            thread_name_prefix="idml-request",
            initializer=set_faiss_threads,
            initargs=(SEARCH_OMP_THREADS,),
        )
        # Model calls of the micro-batcher, one at a time; onnxruntime parallelises inside each call.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="idml-model")
        # Catalog writes (inline indexing, job steps, deletes), one at a time.
        self.write_executor = ThreadPoolExecutor(1, thread_name_prefix="idml-write")
        self.threads = threads

    def load(self) -> None:
        """Load the bundle, start onnxruntime and open the catalog (blocking; run in a thread)."""
        started = time.perf_counter()
        settings = self.settings
        set_faiss_threads(self.threads)
        self.bundle = load_bundle(settings.bundle)
        max_batch = max(settings.max_batch, 64)
        # Batches and index jobs share the cores with decoding and HTTP, so their session does not
        # spin. A query on an idle server takes the spinning session (0.8 ms instead of 1.1 ms).
        self.embedder = Embedder(self.bundle, intra_op_threads=self.threads, max_batch=max_batch, spin=False)
        self.direct_embedder = Embedder(self.bundle, intra_op_threads=self.threads, max_batch=max_batch)
        # IDML_MILVUS_URI set: vectors live in Milvus, filled from the catalog's SQLite on open.
        milvus = MilvusConfig.from_env()
        if milvus is not None:
            logger.info("vector backend: Milvus at %s, collection %s", milvus.uri, milvus.collection)
        self.catalog, self.role = open_catalog(settings, self.bundle, milvus)
        count = self.catalog.count()
        self.metrics.catalog_items.set(count)
        logger.info(
            "loaded model %s and catalog %s with %d items in %.2f s",
            self.bundle.model_id,
            settings.index,
            count,
            time.perf_counter() - started,
            extra={
                "model_id": self.bundle.model_id,
                "catalog_items": count,
                "onnxruntime_intra_op_threads": self.threads,
                "faiss_omp_threads_per_search": SEARCH_OMP_THREADS,
                "decode_threads": settings.resolved_decode_threads,
                "workers": settings.workers,
                "catalog_role": self.role,
                "batch_window_ms": settings.batch_window_ms,
                "max_batch": settings.max_batch,
            },
        )

    def start_batcher(self) -> None:
        from service.pipeline import search_batch  # the pipeline module imports this one

        embedder = self.embedder
        self.batcher = MicroBatcher(
            embedder.embed,
            self.model_executor,
            direct_embed_batch=self.direct_embedder.embed,
            max_batch=self.settings.max_batch,
            window_s=self.settings.batch_window_ms / 1000.0,
            on_batch=self.metrics.embed_batch_size.observe,
            finish=functools.partial(search_batch, self),
            finish_executor=self.request_executor,
        )
        self.batcher.start()

    def record_index_outcomes(self, outcomes) -> None:
        """Count (position, status, reason, error) outcomes of indexing and refresh the catalog size gauge."""
        for _, status, _, _ in outcomes:
            self.metrics.indexed_items.labels(status).inc()
        self.refresh_item_count()

    def refresh_item_count(self) -> None:
        """Set the catalog size gauge; called on the event loop, so a follower does not refresh here."""
        if self.catalog is not None:
            self.metrics.catalog_items.set(self.catalog.count(fresh=False))

    async def close(self) -> None:
        """Stop serving followers, stop the job runner after its current step, stop the batcher, close the catalog."""
        if self.internal_server is not None:
            await self.internal_server.stop()
        if self.jobs is not None:
            await self.jobs.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        self.ready = False
        self.request_executor.shutdown(wait=True)
        self.model_executor.shutdown(wait=True)
        self.write_executor.shutdown(wait=True)
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
