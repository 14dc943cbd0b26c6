"""Followers: read-only catalogs that keep up with the writing process, in this process and in another."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index.catalog import Catalog, CatalogError, IndexSpec
from index.embedder import Embedder
from tests.bundle_factory import make_image_bytes, unit_vectors

DIMENSION = 16  # the tiny bundle's embedding size
ROOT = Path(__file__).resolve().parents[2]


def _add(catalog: Catalog, ids: list[str], vectors: np.ndarray, **attributes) -> None:
    images = [make_image_bytes(hash(item_id) % 50, size=8) for item_id in ids]
    outcomes = catalog.add_embedded(
        ids, vectors, np.full(len(ids), 0.2), attributes=[dict(attributes) for _ in ids], images=images
    )
    assert {outcome.status for outcome in outcomes} <= {"added", "replaced"}


def _top_id(catalog: Catalog, vector: np.ndarray) -> str | None:
    (found,) = catalog.search(vector[None], 1)
    return found[0].item.id if found else None


def test_follower_sees_adds_deletes_and_upserts(tmp_path, tiny_bundle):
    vectors = unit_vectors(60, DIMENSION, seed=1)
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as writer:
        _add(writer, [f"v{i}" for i in range(40)], vectors[:40], round=1)
        with Catalog.open(tmp_path / "catalog", tiny_bundle, read_only=True, follow=True) as follower:
            assert follower.count() == 40
            assert _top_id(follower, vectors[45]) != "v45"

            _add(writer, [f"v{i}" for i in range(40, 60)], vectors[40:60], round=2)
            writer.delete(["v3", "v4"])
            _add(writer, ["v7"], vectors[50:51], round=3)  # upsert: v7 now has v50's vector

            assert follower.count() == 58
            assert _top_id(follower, vectors[45]) == "v45"
            assert _top_id(follower, vectors[3]) != "v3"
            assert follower.get("v4") is None
            assert follower.get("v7").attributes == {"round": 3}
            (found,) = follower.search(vectors[50][None], 2)
            assert {candidate.item.id for candidate in found} == {"v7", "v50"}
            assert follower.refresh() is False  # nothing new since the last read
            assert follower.stats()["following"] is True


def test_follower_filter_sees_new_items(tmp_path, tiny_bundle):
    vectors = unit_vectors(20, DIMENSION, seed=2)
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as writer:
        _add(writer, [f"v{i}" for i in range(10)], vectors[:10], shelf="a")
        with Catalog.open(tmp_path / "catalog", tiny_bundle, read_only=True, follow=True) as follower:
            assert follower.search(vectors[15][None], 5, filter={"shelf": "b"}) == [[]]
            _add(writer, [f"v{i}" for i in range(10, 20)], vectors[10:], shelf="b")
            (found,) = follower.search(vectors[15][None], 5, filter={"shelf": "b"})
            assert found[0].item.id == "v15"


def test_follower_rebuilds_after_pruned_log(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setattr("index.metadata.REMOVED_LOG_KEEP", 2)
    vectors = unit_vectors(30, DIMENSION, seed=3)
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as writer:
        _add(writer, [f"v{i}" for i in range(30)], vectors)
        with Catalog.open(tmp_path / "catalog", tiny_bundle, read_only=True, follow=True) as follower:
            assert follower.count() == 30
            writer.delete([f"v{i}" for i in range(10)])
            writer.save()  # prunes the removal log to its last 2 entries
            assert follower.count() == 20
            assert all(_top_id(follower, vectors[i]) != f"v{i}" for i in range(10))
            assert all(_top_id(follower, vectors[i]) == f"v{i}" for i in range(10, 30))


def test_follower_changes_index_kind_with_writer(tmp_path, tiny_bundle):
    vectors = unit_vectors(1100, DIMENSION, seed=4)
    images = [make_image_bytes(i % 10, size=8) for i in range(1100)]
    spec = IndexSpec(kind="ivf_sq8", ivf_min_items=1000, nlist=16)
    with Catalog.open(tmp_path / "catalog", tiny_bundle, index_spec=spec) as writer:
        writer.add_embedded([f"v{i}" for i in range(900)], vectors[:900], np.full(900, 0.2), images=images[:900])
        with Catalog.open(tmp_path / "catalog", tiny_bundle, read_only=True, follow=True) as follower:
            assert follower.index_kind == "flat"
            writer.add_embedded(
                [f"v{i}" for i in range(900, 1100)], vectors[900:], np.full(200, 0.2), images=images[900:]
            )
            assert writer.index_kind == "ivf_sq8"
            assert follower.count() == 1100
            assert follower.index_kind == "ivf_sq8"
            assert _top_id(follower, vectors[1050]) == "v1050"


def test_follower_switches_generation_after_reembed(tmp_path, tiny_bundle, other_bundle):
    vectors = unit_vectors(5, DIMENSION, seed=5)
    folder = tmp_path / "catalog"
    with Catalog.open(folder, tiny_bundle) as writer:
        _add(writer, [f"v{i}" for i in range(5)], vectors)
        with Catalog.open(folder, tiny_bundle, read_only=True, follow=True) as same_model, \
                Catalog.open(folder, None, read_only=True, follow=True) as any_model:
            writer.reembed(other_bundle, Embedder(other_bundle))
            assert any_model.count() == 5
            assert any_model.model_id == other_bundle.model_id
            assert same_model.count() == 5
            assert same_model.model_id == tiny_bundle.model_id  # it keeps serving what its bundle can query


def test_follow_needs_read_only(tmp_path, tiny_bundle):
    with pytest.raises(ValueError, match="read_only"):
        Catalog.open(tmp_path / "catalog", tiny_bundle, follow=True)
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as writer:
        with pytest.raises(CatalogError, match="follow=True"):
            writer.refresh()


_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from index.bundle import load_bundle
    from index.catalog import Catalog
    from tests.bundle_factory import make_image_bytes, unit_vectors

    folder, bundle_path = sys.argv[1], sys.argv[2]
    vectors = unit_vectors(100, 16, seed=6)
    with Catalog.open(folder, load_bundle(bundle_path)) as catalog:
        print("open", flush=True)
        for step in range(10):
            ids = [f"p{i}" for i in range(step * 10, step * 10 + 10)]
            catalog.add_embedded(ids, vectors[step * 10 : step * 10 + 10], np.full(10, 0.2),
                                 images=[make_image_bytes(i, size=8) for i in range(10)])
            if step % 3 == 2:
                catalog.delete([f"p{step * 10}"])
            print("committed", step, flush=True)
            sys.stdin.readline()
    """
)


def test_follower_reads_after_another_process_acknowledges(tmp_path, tiny_bundle):
    """Every item a writing process acknowledged is found by the next search of a follower in this process."""
    folder = tmp_path / "catalog"
    vectors = unit_vectors(100, DIMENSION, seed=6)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(folder), str(tiny_bundle.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert writer.stdout.readline().strip() == "open"
        follower = None
        deleted = set()
        for step in range(10):
            assert writer.stdout.readline().split() == ["committed", str(step)]
            if follower is None:
                follower = Catalog.open(folder, tiny_bundle, read_only=True, follow=True)
            if step % 3 == 2:
                deleted.add(step * 10)
            expected = [i for i in range(step * 10 + 10) if i not in deleted]
            assert follower.count() == len(expected)
            found = follower.search(vectors[: step * 10 + 10], 1)
            for i, result in enumerate(found):
                if i in deleted:
                    assert not result or result[0].item.id != f"p{i}"
                else:
                    assert result[0].item.id == f"p{i}"
            writer.stdin.write("\n")
            writer.stdin.flush()
        follower.close()
    finally:
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0


def test_follower_ignores_snapshot_newer_than_its_view(tmp_path, tiny_bundle, monkeypatch):
    """A snapshot saved after the follower's read began contains rows its view lacks; it must not hide them later."""
    import index.catalog

    folder = tmp_path / "catalog"
    vectors = unit_vectors(41, DIMENSION, seed=7)
    with Catalog.open(folder, tiny_bundle, index_spec=IndexSpec(kind="hnsw")) as writer:
        _add(writer, [f"v{i}" for i in range(40)], vectors[:40])
        writer.save()
        real_load = index.catalog.load_backend

        def load_after_a_commit(*args, **kwargs):
            _add(writer, ["x"], vectors[40:])  # commits after the follower's read transaction began
            writer.save()
            return real_load(*args, **kwargs)

        monkeypatch.setattr(index.catalog, "load_backend", load_after_a_commit)
        with Catalog.open(folder, tiny_bundle, read_only=True, follow=True) as follower:
            monkeypatch.setattr(index.catalog, "load_backend", real_load)
            assert follower.count() == 41
            assert _top_id(follower, vectors[40]) == "x"


def test_follower_retries_failed_generation_switch(tmp_path, tiny_bundle, other_bundle):
    folder = tmp_path / "catalog"
    with Catalog.open(folder, tiny_bundle) as writer:
        _add(writer, [f"v{i}" for i in range(5)], unit_vectors(5, DIMENSION, seed=8))
        with Catalog.open(folder, None, read_only=True, follow=True) as follower:
            writer.reembed(other_bundle, Embedder(other_bundle))
            real_load = follower._load_generation
            failures = []

            def fail_once(*args):
                if not failures:
                    failures.append(1)
                    raise OSError("simulated read error")
                return real_load(*args)

            follower._load_generation = fail_once
            follower.count()  # the failed switch is logged, and the old generation keeps serving
            assert follower.model_id == tiny_bundle.model_id
            follower.count()
            assert follower.model_id == other_bundle.model_id
