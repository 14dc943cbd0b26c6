"""Micro-batching of /search queries: concurrent requests share one model call.

A request first `reserve()`s a place (before it decodes its image), then
submits the preprocessed image with `embed()`. The batcher takes the first
queued image and keeps collecting until it has `max_batch` images, or
`window_s` has passed, or no reserved request is still on its way. So a lone
request does not wait for the window, and under load the requests that are
decoding in parallel join the same call (`test_batcher.py` checks both). Model calls run one at a time
in `executor` (onnxruntime parallelises inside a call), and requests that
arrive meanwhile form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from index.embedder import Embeddings

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Pending:
    image: np.ndarray  # uint8 (size, size, 3)
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


class MicroBatcher:
    """Collect single images from concurrent requests into batched `embed_batch` calls.

    `embed_batch` takes uint8 (n, size, size, 3) and returns `Embeddings` with
    (n, d) and (n, du) rows in the same order. `on_batch(n)` is called with
    each batch size, for metrics.
    """

    def __init__(
        self,
        embed_batch: Callable[[np.ndarray], Embeddings],
        executor: Executor,
        *,
        max_batch: int,
        window_s: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._embed_batch = embed_batch
        self._executor = executor
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self._on_batch = on_batch
        self._queue: asyncio.Queue = asyncio.Queue()
        self._reserved = 0
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
        self._task = None

    def reserve(self) -> Reservation:
        """Announce that the calling request will submit an image soon."""
        self._reserved += 1
        return Reservation(self)

    async def embed(self, image: np.ndarray, reservation: Reservation | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embed one preprocessed image, uint8 (size, size, 3).

        Returns:
            (embedding float32 (d,), uncertainty float32 (du,)).
        """
        if self._task is None:
            raise RuntimeError("the micro-batcher is not running")
        if reservation is not None:
            reservation.release()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(image, future))
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
        try:
            result = await loop.run_in_executor(self._executor, self._embed_batch, images)
        except Exception as error:  # every waiting request gets the failure, the batcher keeps running
            logger.exception("model call failed for a batch of %d queries", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for row, pending in enumerate(batch):
            if not pending.future.done():
                pending.future.set_result((result.embedding[row], result.uncertainty[row]))
