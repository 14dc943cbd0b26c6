"""The micro-batcher: concurrent queries share model calls and get their own rows back."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from index.embedder import Embedder
from index.preprocess import preprocess_bytes
from service.batcher import MicroBatcher
from tests.service.helpers import image_bytes


class RecordingEmbedder:
    """The real embedder, with the size of every call recorded."""

    def __init__(self, bundle):
        self.embedder = Embedder(bundle, intra_op_threads=1)
        self.calls: list[int] = []

    def embed(self, images):
        self.calls.append(len(images))
        return self.embedder.embed(images)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture()
def images(tiny_bundle):
    return [preprocess_bytes(image_bytes(seed), tiny_bundle.preprocess) for seed in range(20)]


async def embed_all(batcher, images):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.embed(image) for image in images))
    finally:
        await batcher.stop()


def test_concurrent_queries_share_one_call(tiny_bundle, images):
    model = RecordingEmbedder(tiny_bundle)
    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(model.embed, executor, max_batch=16, window_s=0.05)
        results = run(embed_all(batcher, images[:8]))
    assert model.calls == [8]
    expected = model.embedder.embed(np.stack(images[:8]))
    for row, (embedding, uncertainty) in enumerate(results):
        np.testing.assert_allclose(embedding, expected.embedding[row], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(uncertainty, expected.uncertainty[row], rtol=1e-5, atol=1e-6)


def test_batches_split_at_max_batch(tiny_bundle, images):
    model = RecordingEmbedder(tiny_bundle)
    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(model.embed, executor, max_batch=8, window_s=0.05)
        results = run(embed_all(batcher, images))
    assert model.calls == [8, 8, 4]
    assert len(results) == 20


def test_lone_query_does_not_wait_for_window(tiny_bundle, images):
    """With no other request reserved, the call starts at once instead of after the 10 s window."""
    model = RecordingEmbedder(tiny_bundle)

    async def one():
        batcher = MicroBatcher(model.embed, executor, max_batch=16, window_s=10.0)
        batcher.start()
        try:
            with batcher.reserve() as reservation:
                return await asyncio.wait_for(batcher.embed(images[0], reservation), 5.0)
        finally:
            await batcher.stop()

    with ThreadPoolExecutor(1) as executor:
        embedding, _ = run(one())
    assert model.calls == [1]
    assert embedding.shape == (16,)


def test_reserved_query_joins_batch(tiny_bundle, images):
    """A query reserved before the first one is submitted is waited for and embedded with it."""
    model = RecordingEmbedder(tiny_bundle)

    async def two():
        batcher = MicroBatcher(model.embed, executor, max_batch=16, window_s=10.0)
        batcher.start()
        first, second = batcher.reserve(), batcher.reserve()

        async def late():
            await asyncio.sleep(0.05)
            return await batcher.embed(images[1], second)

        try:
            return await asyncio.wait_for(asyncio.gather(batcher.embed(images[0], first), late()), 5.0)
        finally:
            await batcher.stop()

    with ThreadPoolExecutor(1) as executor:
        results = run(two())
    assert model.calls == [2]
    assert len(results) == 2


def test_model_failure_reaches_every_waiting_query(tiny_bundle, images):
    def failing(batch):
        raise RuntimeError("model exploded")

    async def go():
        batcher = MicroBatcher(failing, executor, max_batch=4, window_s=0.01)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.embed(image) for image in images[:3]), return_exceptions=True)
            # The batcher keeps serving after a failed call.
            batcher._embed_batch = RecordingEmbedder(tiny_bundle).embed
            after = await batcher.embed(images[0])
            return results, after
        finally:
            await batcher.stop()

    with ThreadPoolExecutor(1) as executor:
        results, after = run(go())
    assert all(isinstance(result, RuntimeError) for result in results)
    assert after[0].shape == (16,)


def test_finish_gets_each_batch_with_payloads(tiny_bundle, images):
    """`finish` gets every batch with its payloads, and an exception it returns fails that request alone."""
    model = RecordingEmbedder(tiny_bundle)
    seen: list[list[str]] = []

    def finish(embedded, payloads):
        seen.append(list(payloads))
        return [ValueError(f"bad {payload}") if payload == "p2" else f"done {payload}" for payload in payloads]

    async def go():
        batcher = MicroBatcher(model.embed, executor, max_batch=16, window_s=0.05, finish=finish)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(image, f"p{n}") for n, image in enumerate(images[:4])), return_exceptions=True
            )
        finally:
            await batcher.stop()

    with ThreadPoolExecutor(1) as executor:
        results = run(go())
    assert model.calls == [4]
    assert seen == [["p0", "p1", "p2", "p3"]]
    assert [result[2] for n, result in enumerate(results) if n != 2] == ["done p0", "done p1", "done p3"]
    assert isinstance(results[2], ValueError)
    assert str(results[2]) == "bad p2"
    expected = model.embedder.embed(np.stack(images[:4]))
    np.testing.assert_allclose(results[0][0], expected.embedding[0], rtol=1e-5, atol=1e-6)


def test_direct_claim_only_when_idle(tiny_bundle, images):
    """An idle batcher lends the model to one request at a time; a reservation or a claim blocks others."""
    model = RecordingEmbedder(tiny_bundle)
    direct = RecordingEmbedder(tiny_bundle)

    async def go():
        batcher = MicroBatcher(model.embed, executor, max_batch=16, window_s=0.05, direct_embed_batch=direct.embed)
        assert batcher.claim_direct() is None  # not started
        batcher.start()
        try:
            claim = batcher.claim_direct()
            assert claim is not None
            assert batcher.claim_direct() is None  # one claim at a time
            with claim:
                embedded = claim.embed(np.stack(images[:1]))
            assert not claim.open
            with batcher.reserve():
                assert batcher.claim_direct() is None  # a request is on its way to the queue
            again = batcher.claim_direct()
            assert again is not None
            again.release()
            return embedded
        finally:
            await batcher.stop()

    with ThreadPoolExecutor(1) as executor:
        embedded = run(go())
    assert direct.calls == [1]
    assert model.calls == []
    np.testing.assert_allclose(
        embedded.embedding[0], model.embedder.embed(np.stack(images[:1])).embedding[0], rtol=1e-5, atol=1e-6
    )
