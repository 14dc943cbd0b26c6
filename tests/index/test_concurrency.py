"""Searches from several threads while one thread adds, deletes and re-embeds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from index.catalog import Catalog, ItemInput, ModelMismatchError
from index.embedder import Embedder
from index.preprocess import preprocess_bytes
from tests.bundle_factory import make_image_bytes

STABLE = 40  # items that no writer touches; every search must find them
SEARCHERS = 3
MAX_SEARCHES = 5000  # per thread, bounds the loop even if the writer hangs


def embeddings_of(bundle, images):
    return Embedder(bundle).embed(np.stack([preprocess_bytes(image, bundle.preprocess) for image in images])).embedding


class Searchers:
    """Threads that search for stable items by their own embedding and record every failure."""

    def __init__(self, catalog: Catalog, queries: dict[str, np.ndarray]):
        self.catalog = catalog
        self.queries = queries  # model id -> float32 (STABLE, d)
        self.errors: list[str] = []
        self.searches = 0
        self.during_write = 0
        self.writing = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(seed,)) for seed in range(SEARCHERS)]

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(MAX_SEARCHES):
            if self.stop.is_set():
                return
            target = int(rng.integers(STABLE))
            model_id = self.catalog.model_id
            filter = {"stable": True} if rng.random() < 0.3 else None
            writing = self.writing.is_set()
            try:
                result = self.catalog.search(self.queries[model_id][target : target + 1], 5, filter=filter, model_id=model_id)[0]
            except ModelMismatchError:
                continue  # the re-embed switched models between reading the id and searching
            except Exception as error:  # noqa: BLE001 - every failure is recorded for the assertion
                self.errors.append(f"{type(error).__name__}: {error}")
                return
            ids = [candidate.item.id for candidate in result]
            problem = None
            if len(ids) != 5:
                problem = f"expected 5 results, got {ids}"
            elif len(set(ids)) != 5:
                problem = f"duplicated results {ids}"
            elif ids[0] != f"stable-{target}" or result[0].similarity < 0.9999:
                problem = f"stable-{target} not first: {ids} {[c.similarity for c in result]}"
            with self.lock:
                self.searches += 1
                self.during_write += writing
                if problem:
                    self.errors.append(problem)

    def __enter__(self) -> "Searchers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.mark.slow
def test_searches_during_add_delete_and_reembed(tmp_path, tiny_bundle, other_bundle):
    stable_images = [make_image_bytes(10_000 + i) for i in range(STABLE)]
    queries = {
        tiny_bundle.model_id: embeddings_of(tiny_bundle, stable_images),
        other_bundle.model_id: embeddings_of(other_bundle, stable_images),
    }
    embedder = Embedder(tiny_bundle)
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as catalog:
        catalog.add_images(
            [ItemInput(f"stable-{i}", image, attributes={"stable": True}) for i, image in enumerate(stable_images)],
            embedder,
        )
        bulk = [ItemInput(f"bulk-{i}", make_image_bytes(i, size=24), attributes={"stable": False}) for i in range(400)]

        with Searchers(catalog, queries) as searchers:
            searchers.writing.set()
            started = time.monotonic()
            catalog.add_images(bulk, embedder, batch_size=16)
            catalog.delete([f"bulk-{i}" for i in range(0, 400, 3)])
            catalog.add_images(bulk[:50], embedder, batch_size=10)  # upserts and re-adds
            catalog.reembed(other_bundle, Embedder(other_bundle), batch_size=16)
            searchers.writing.clear()
            elapsed = time.monotonic() - started
            time.sleep(0.05)

        assert searchers.errors == []
        assert searchers.during_write > 10, f"only {searchers.during_write} searches overlapped {elapsed:.1f} s of writes"
        assert catalog.model_id == other_bundle.model_id
        assert catalog.count() == STABLE + 400 - len(range(0, 400, 3)) + len([i for i in range(0, 50, 3)])
        assert catalog.verify().ok
