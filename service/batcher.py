"""Micro-batching of /search queries: concurrent requests share one model call.

A request first `reserve()`s a place (before it decodes its image), then
submits the preprocessed image with `embed()`. The batcher takes the first
queued image and keeps collecting until it has `max_batch` images, or
`window_s` has passed, or no reserved request is still on its way. So a lone
request does not wait for the window, and under load the requests that are
decoding in parallel join the same call (`test_batcher.py` checks both). Model calls run one at a time
in `executor` (onnxruntime parallelises inside a call), and requests that
arrive meanwhile form the next batch.

With a `finish` function, the batcher also hands each embedded batch with
the requests' payloads to `finish_executor` (the server searches the
catalog for the whole batch there, in one FAISS call and one SQLite query),
and the next batch goes into the model meanwhile.

A request that finds the batcher idle (nothing queued, reserved or running)
may `claim_direct()` instead and call the model itself from its own worker
thread, with no queue and no hand-over between threads. That saved about
0.4 ms of a 3.7 ms query on an idle 2-core server, and concurrent requests
arriving meanwhile still batch among themselves.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from index.embedder import Embeddings

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Pending:
    image: np.ndarray  # uint8 (size, size, 3)
    payload: Any
    future: asyncio.Future


class Reservation:
    """A request's announced intent to submit one image; release it if the request fails first."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.open = True

    def release(self) -> None:
        if self.open:
            self.open = False
            self._batcher._reserved -= 1

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class DirectClaim:
    """Permission for one request to call the model outside the queue; release it when done."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.open = True

    def embed(self, images: np.ndarray) -> Embeddings:
        """Embed uint8 (n, size, size, 3) now, in the calling thread."""
        result = self._batcher._direct_embed_batch(images)
        if self._batcher._on_batch is not None:
            self._batcher._on_batch(len(images))
        return result

    def release(self) -> None:
        if self.open:
            self.open = False
            self._batcher._direct -= 1

    def __enter__(self) -> "DirectClaim":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class MicroBatcher:
    """Collect single images from concurrent requests into batched `embed_batch` calls.

    `embed_batch` takes uint8 (n, size, size, 3) and returns `Embeddings` with
    (n, d) and (n, du) rows in the same order. `on_batch(n)` is called with
    each batch size, for metrics. `finish(embeddings, payloads)`, when given,
    runs in `finish_executor` after each model call and returns one output per
    request (an exception instance fails that request alone).
    `direct_embed_batch` (default `embed_batch`) serves `DirectClaim.embed`.
    """

    def __init__(
        self,
        embed_batch: Callable[[np.ndarray], Embeddings],
        executor: Executor,
        *,
        max_batch: int,
        window_s: float,
        on_batch: Callable[[int], None] | None = None,
        finish: Callable[[Embeddings, list[Any]], list[Any]] | None = None,
        finish_executor: Executor | None = None,
        direct_embed_batch: Callable[[np.ndarray], Embeddings] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._embed_batch = embed_batch
        self._direct_embed_batch = direct_embed_batch or embed_batch
        self._executor = executor
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self._on_batch = on_batch
        self._finish = finish
        self._finish_executor = finish_executor or executor
        self._finishing: set[asyncio.Task] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._reserved = 0
        self._direct = 0  # requests embedding through a DirectClaim
        self._busy = False  # a batch is in the model
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="idml-micro-batcher")

    async def stop(self) -> None:
        """Embed what is queued, then end the batching task."""
        if self._task is None:
            return
        await self._queue.put(_STOP)
        await self._task
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        self._task = None

    def reserve(self) -> Reservation:
        """Announce that the calling request will submit an image soon."""
        self._reserved += 1
        return Reservation(self)

    def claim_direct(self) -> DirectClaim | None:
        """Return a claim to embed outside the queue when nothing else is waiting or running, else None.

        Call from the event loop thread, as `reserve()`.
        """
        if self._task is None or self._busy or self._direct or self._reserved or not self._queue.empty():
            return None
        self._direct += 1
        return DirectClaim(self)

    async def embed(self, image: np.ndarray, reservation: Reservation | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embed one preprocessed image, uint8 (size, size, 3).

        Returns:
            (embedding float32 (d,), uncertainty float32 (du,)).
        """
        embedding, uncertainty, _ = await self.submit(image, None, reservation)
        return embedding, uncertainty

    async def submit(
        self, image: np.ndarray, payload: Any, reservation: Reservation | None = None
    ) -> tuple[np.ndarray, np.ndarray, Any]:
        """Embed one preprocessed image and pass `payload` to `finish` with it.

        Returns:
            (embedding float32 (d,), uncertainty float32 (du,), this request's
            output of `finish`, or None without `finish`).
        """
        if self._task is None:
            raise RuntimeError("the micro-batcher is not running")
        if reservation is not None:
            reservation.release()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(image, payload, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if self._reserved <= 0 or remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            await self._embed(loop, batch)

    async def _embed(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        images = np.stack([pending.image for pending in batch])
        self._busy = True
        try:
            result = await loop.run_in_executor(self._executor, self._embed_batch, images)
        except Exception as error:  # every waiting request gets the failure, the batcher keeps running
            logger.exception("model call failed for a batch of %d queries", len(batch))
            _fail(batch, error)
            return
        finally:
            self._busy = False
        if self._on_batch is not None:
            self._on_batch(len(batch))
        if self._finish is None:
            _resolve(batch, result, [None] * len(batch))
            return
        # Finished off the batching task, so that the next batch can go into the model meanwhile.
        task = loop.create_task(self._finish_batch(loop, batch, result))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], result: Embeddings) -> None:
        payloads = [pending.payload for pending in batch]
        try:
            outputs = await loop.run_in_executor(self._finish_executor, self._finish, result, payloads)
        except Exception as error:
            logger.exception("finishing a batch of %d queries failed", len(batch))
            _fail(batch, error)
            return
        _resolve(batch, result, outputs)


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


def _resolve(batch: list[_Pending], result: Embeddings, outputs: list[Any]) -> None:
    for row, (pending, output) in enumerate(zip(batch, outputs)):
        if pending.future.done():
            continue
        if isinstance(output, BaseException):
            pending.future.set_exception(output)
        else:
            pending.future.set_result((result.embedding[row], result.uncertainty[row], output))
