"""Catalog: adding, searching, filtering, deleting, restarting, verifying and re-embedding."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest

from index.catalog import (
    Catalog,
    CatalogError,
    CatalogLockedError,
    IndexSpec,
    ItemInput,
    ItemNotFound,
    ModelMismatchError,
    SearchParams,
)
from index.embedder import Embedder
from index.originals import content_hash
from index.preprocess import preprocess_bytes
from tests.bundle_factory import make_image_bytes, unit_vectors

COUNT = 40


def embed_images(bundle, images: list[bytes]) -> np.ndarray:
    """float32 (n, d) embeddings of encoded images through the bundle."""
    pixels = np.stack([preprocess_bytes(image, bundle.preprocess) for image in images])
    return Embedder(bundle).embed(pixels).embedding


def inputs(count: int, start: int = 0) -> list[ItemInput]:
    return [
        ItemInput(
            id=f"item-{i:03d}",
            image=make_image_bytes(i),
            label="odd" if i % 2 else "even",
            attributes={"shard": i % 4, "name": f"n{i}", "flag": i % 3 == 0},
        )
        for i in range(start, start + count)
    ]


@pytest.fixture
def catalog(tmp_path, tiny_bundle):
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as opened:
        outcomes = opened.add_images(inputs(COUNT), Embedder(tiny_bundle), batch_size=16)
        assert {outcome.status for outcome in outcomes} == {"added"}
        yield opened


def test_search_by_own_image_finds_item_first(catalog, tiny_bundle):
    images = [make_image_bytes(i) for i in range(COUNT)]

    results = catalog.search(embed_images(tiny_bundle, images), 5)

    assert [result[0].item.id for result in results] == [f"item-{i:03d}" for i in range(COUNT)]  # recall@1 = 1.0
    for result in results:
        assert result[0].similarity == pytest.approx(1.0, abs=1e-5)
        similarities = [candidate.similarity for candidate in result]
        assert similarities == sorted(similarities, reverse=True)
        assert len({candidate.item.id for candidate in result}) == 5


def test_search_returns_fewer_when_catalog_is_small(catalog, tiny_bundle):
    results = catalog.search(embed_images(tiny_bundle, [make_image_bytes(0)]), 100)

    assert len(results[0]) == COUNT


def test_candidate_carries_uncertainty(catalog, tiny_bundle):
    image = make_image_bytes(3)
    pixels = preprocess_bytes(image, tiny_bundle.preprocess)[None]
    outputs = Embedder(tiny_bundle).embed(pixels)

    top = catalog.search(outputs.embedding, 1)[0][0]

    assert top.uncertainty == pytest.approx(float(outputs.uncertainty_scalar[0]), rel=1e-5)
    assert top.item.uncertainty == top.uncertainty
    assert top.uncertainty_vector is None  # beta_form "sum" stores no vector


def test_get_list_count(catalog):
    item = catalog.get("item-005")

    assert item is not None
    assert item.label == "odd"
    assert item.attributes == {"shard": 1, "name": "n5", "flag": False}
    assert item.content_hash == content_hash(make_image_bytes(5))
    assert item.media_type == "image/png"
    assert item.model_id == catalog.model_id
    assert catalog.get("missing") is None
    with pytest.raises(ItemNotFound, match="missing"):
        catalog.require("missing")
    assert catalog.count() == COUNT
    page = catalog.list_items(offset=10, limit=5)
    assert [entry.id for entry in page] == [f"item-{i:03d}" for i in range(10, 15)]
    assert catalog.list_items(offset=COUNT, limit=5) == []


def test_original_path_has_the_bytes(catalog):
    path = catalog.original_path("item-007")

    assert path is not None
    assert path.read_bytes() == make_image_bytes(7)
    assert path.parent.name == content_hash(make_image_bytes(7))[:2]
    assert catalog.original_path("missing") is None


def test_filter_on_label_and_attributes(catalog, tiny_bundle):
    query = embed_images(tiny_bundle, [make_image_bytes(0)])

    by_label = catalog.search(query, 50, filter={"label": "odd"})[0]
    by_shard = catalog.search(query, 50, filter={"shard": 2})[0]
    by_both = catalog.search(query, 50, filter={"label": "even", "shard": 2, "flag": True})[0]
    by_name = catalog.search(query, 50, filter={"name": "n9"})[0]

    assert {c.item.id for c in by_label} == {f"item-{i:03d}" for i in range(1, COUNT, 2)}
    assert {c.item.id for c in by_shard} == {f"item-{i:03d}" for i in range(2, COUNT, 4)}
    assert {c.item.id for c in by_both} == {f"item-{i:03d}" for i in range(COUNT) if i % 4 == 2 and i % 3 == 0}
    assert [c.item.id for c in by_name] == ["item-009"]
    assert catalog.search(query, 5, filter={"shard": "2"})[0] == []  # a string never equals a number
    assert catalog.search(query, 5, filter={"unknown": 1})[0] == []


def test_null_filter_matches_missing_attribute(catalog, tiny_bundle):
    catalog.add_images(
        [ItemInput("no-shard", make_image_bytes(600), attributes={"name": "plain"})], Embedder(tiny_bundle)
    )
    query = embed_images(tiny_bundle, [make_image_bytes(600)])

    found = catalog.search(query, 50, filter={"shard": None})[0]
    assert [candidate.item.id for candidate in found] == ["no-shard"]
    assert catalog.search(query, 50, filter={"name": None, "shard": None})[0] == []


def test_filter_rejects_bad_keys_and_values(catalog, tiny_bundle):
    query = embed_images(tiny_bundle, [make_image_bytes(0)])

    with pytest.raises(ValueError, match="filter key"):
        catalog.search(query, 5, filter={'a"b': 1})
    with pytest.raises(ValueError, match="must be a string, number, boolean or None"):
        catalog.search(query, 5, filter={"shard": [1, 2]})


def test_filter_sees_later_writes(catalog, tiny_bundle):
    query = embed_images(tiny_bundle, [make_image_bytes(0)])
    assert catalog.search(query, 5, filter={"name": "fresh"})[0] == []

    catalog.add_images([ItemInput("fresh", make_image_bytes(500), attributes={"name": "fresh"})], Embedder(tiny_bundle))

    assert [c.item.id for c in catalog.search(query, 5, filter={"name": "fresh"})[0]] == ["fresh"]


def test_delete_is_visible_to_next_search(catalog, tiny_bundle):
    query = embed_images(tiny_bundle, [make_image_bytes(4)])

    deleted = catalog.delete(["item-004", "item-004", "not-there"])

    assert deleted == 1
    assert catalog.count() == COUNT - 1
    assert catalog.get("item-004") is None
    assert "item-004" not in {c.item.id for c in catalog.search(query, COUNT)[0]}


def test_upsert_replaces_vector_and_metadata(catalog, tiny_bundle):
    before = catalog.get("item-001")

    outcomes = catalog.add_images(
        [ItemInput("item-001", make_image_bytes(900), label="new", attributes={"v": 2})], Embedder(tiny_bundle)
    )

    assert [outcome.status for outcome in outcomes] == ["replaced"]
    after = catalog.get("item-001")
    assert after.label == "new"
    assert after.created_at == before.created_at
    assert after.updated_at > before.updated_at
    assert catalog.count() == COUNT
    new_top = catalog.search(embed_images(tiny_bundle, [make_image_bytes(900)]), 1)[0][0]
    assert new_top.item.id == "item-001"
    assert new_top.similarity == pytest.approx(1.0, abs=1e-5)
    old_results = catalog.search(embed_images(tiny_bundle, [make_image_bytes(1)]), COUNT)[0]
    assert [c.item.id for c in old_results].count("item-001") == 1
    assert old_results[0].similarity < 0.999  # the old vector is gone
    assert not catalog._originals.exists(before.content_hash)  # its original was released


def test_cached_results_follow_upsert_and_delete(catalog, tiny_bundle):
    """Searches keep returned items in memory; an upsert or a delete after that is still seen at once."""
    query = embed_images(tiny_bundle, [make_image_bytes(2)])
    first = catalog.search(query, COUNT)[0]
    assert first[0].item.id == "item-002"
    assert first[0].item.label != "changed"

    catalog.add_images(
        [ItemInput("item-002", make_image_bytes(2), label="changed", attributes={"v": 3})], Embedder(tiny_bundle)
    )
    again = catalog.search(query, COUNT)[0]
    assert again[0].item.id == "item-002"
    assert again[0].item.label == "changed"
    assert again[0].item.attributes == {"v": 3}

    catalog.delete(["item-002"])
    assert "item-002" not in {candidate.item.id for candidate in catalog.search(query, COUNT)[0]}


def test_same_id_twice_in_one_batch(catalog, tiny_bundle):
    outcomes = catalog.add_images(
        [ItemInput("twice", make_image_bytes(700)), ItemInput("twice", make_image_bytes(701))],
        Embedder(tiny_bundle),
    )

    assert [outcome.status for outcome in outcomes] == ["added", "replaced"]
    assert catalog.count() == COUNT + 1
    assert catalog.verify().ok
    top = catalog.search(embed_images(tiny_bundle, [make_image_bytes(701)]), 1)[0][0]
    assert top.item.id == "twice"


def test_identical_images_stored_once(catalog, tiny_bundle):
    image = make_image_bytes(300)
    catalog.add_images([ItemInput("copy-a", image), ItemInput("copy-b", image)], Embedder(tiny_bundle))
    path = catalog.original_path("copy-a")

    assert path == catalog.original_path("copy-b")
    catalog.delete(["copy-a"])
    assert path.exists()  # still used by copy-b
    catalog.delete(["copy-b"])
    assert not path.exists()


def test_bad_items_do_not_fail_the_batch(catalog, tiny_bundle):
    png = make_image_bytes(123)
    batch = [
        ItemInput("good", png),
        ItemInput("empty", b""),
        ItemInput("text", b"hello, not an image"),
        ItemInput("truncated", png[: len(png) // 2]),
        ItemInput("", png),
        ItemInput("bad-attributes", png, attributes={"x": float("nan")}),
        ItemInput("good-2", make_image_bytes(124)),
    ]

    outcomes = catalog.add_images(batch, Embedder(tiny_bundle), batch_size=3)

    assert [(o.id, o.status, o.reason) for o in outcomes] == [
        ("good", "added", None),
        ("empty", "error", "empty"),
        ("text", "error", "not_an_image"),
        ("truncated", "error", "truncated"),
        ("", "error", "invalid_id"),
        ("bad-attributes", "error", "invalid_attributes"),
        ("good-2", "added", None),
    ]
    assert all(o.error for o in outcomes if o.status == "error")
    assert catalog.count() == COUNT + 2


def test_progress_reports_every_batch(catalog, tiny_bundle):
    calls = []

    catalog.add_images(inputs(10, start=100), Embedder(tiny_bundle), batch_size=4, progress=lambda d, t: calls.append((d, t)))

    assert calls == [(4, 10), (8, 10), (10, 10)]


def test_ids_survive_restart(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle) as catalog:
        catalog.add_images(inputs(12), Embedder(tiny_bundle))
        catalog.delete(["item-003"])
        before = {item.id: item for item in catalog.list_items(0, 100)}

    with Catalog.open(path, tiny_bundle, create=False) as reopened:
        after = {item.id: item for item in reopened.list_items(0, 100)}
        results = reopened.search(embed_images(tiny_bundle, [make_image_bytes(7)]), 3)
        assert reopened.verify().ok

    assert after == before
    assert results[0][0].item.id == "item-007"


def test_restart_replays_changes_after_snapshot(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    catalog = Catalog.open(path, tiny_bundle)
    catalog.add_images(inputs(8), Embedder(tiny_bundle))
    catalog.save()
    catalog.add_images(inputs(4, start=8), Embedder(tiny_bundle))
    catalog.delete(["item-000"])
    # Leave without close(): the snapshot lacks the last two changes.
    catalog._release_process_lock()

    with Catalog.open(path, tiny_bundle) as reopened:
        assert reopened.count() == 11
        assert reopened.get("item-000") is None
        top = reopened.search(embed_images(tiny_bundle, [make_image_bytes(10)]), 1)[0][0]
        assert top.item.id == "item-010"
        assert reopened.verify().ok


def test_damaged_snapshot_is_rebuilt(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle) as catalog:
        catalog.add_images(inputs(6), Embedder(tiny_bundle))
    snapshot = json.loads((path / "gen-000001" / "snapshot.json").read_text())
    (path / "gen-000001" / snapshot["index_file"]).write_bytes(b"garbage")

    with Catalog.open(path, tiny_bundle) as reopened:
        assert reopened.count() == 6
        assert reopened.search(embed_images(tiny_bundle, [make_image_bytes(2)]), 1)[0][0].item.id == "item-002"
        assert reopened.verify().ok


def test_model_mismatch_names_both_models(tmp_path, tiny_bundle, other_bundle):
    path = tmp_path / "catalog"
    Catalog.open(path, tiny_bundle).close()

    with pytest.raises(ModelMismatchError) as raised:
        Catalog.open(path, other_bundle)

    message = str(raised.value)
    assert tiny_bundle.model_id in message
    assert other_bundle.model_id in message
    assert "idml-index reembed" in message
    with Catalog.open(path, tiny_bundle):  # the refusal released the lock
        pass


def test_embedder_of_other_model_rejected(catalog, other_bundle):
    with pytest.raises(ModelMismatchError, match=other_bundle.model_id):
        catalog.add_images(inputs(1), Embedder(other_bundle))


def test_search_model_id_checked(catalog, tiny_bundle):
    query = embed_images(tiny_bundle, [make_image_bytes(0)])

    assert catalog.search(query, 1, model_id=tiny_bundle.model_id)[0]
    with pytest.raises(ModelMismatchError):
        catalog.search(query, 1, model_id="0123456789abcdef")


def test_search_rejects_bad_input(catalog):
    with pytest.raises(ValueError, match=r"shape \(nq, 16\)"):
        catalog.search(np.zeros((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        catalog.search(unit_vectors(1, 16), 0)
    with pytest.raises(ValueError, match="NaN"):
        catalog.search(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="nprobe"):
        catalog.search(unit_vectors(1, 16), 1, params=SearchParams(nprobe=0))


def test_second_writer_process_rejected(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle):
        with pytest.raises(CatalogLockedError, match="read_only=True"):
            Catalog.open(path, tiny_bundle)
        with Catalog.open(path, tiny_bundle, read_only=True) as reader:
            assert reader.count() == 0
            with pytest.raises(CatalogError, match="read-only"):
                reader.delete(["x"])


def test_open_missing_without_create(tmp_path, tiny_bundle):
    with pytest.raises(CatalogError, match="no catalog"):
        Catalog.open(tmp_path / "none", tiny_bundle, create=False)


def test_add_embedded_validates_rows(tmp_path, tiny_bundle):
    vectors = unit_vectors(4, 16)
    vectors[2] *= 2.0  # not normalised
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as catalog:
        outcomes = catalog.add_embedded(
            ["a", "b", "c", "d"],
            vectors,
            np.full(4, 0.3, np.float32),
            labels=["x", None, None, None],
            attributes=[{}, {}, {}, {}],
            images=[make_image_bytes(1), make_image_bytes(2), make_image_bytes(3), b"nope"],
        )
        assert [(o.status, o.reason) for o in outcomes] == [
            ("added", None), ("added", None), ("error", "invalid_embedding"), ("error", "not_an_image"),
        ]
        assert catalog.get("a").uncertainty == pytest.approx(0.3)
        with pytest.raises(ValueError, match="embeddings must have shape"):
            catalog.add_embedded(["a"], unit_vectors(1, 8), np.zeros(1), images=[make_image_bytes(1)])
        with pytest.raises(ValueError, match="images has 0 entries"):
            catalog.add_embedded(["a"], unit_vectors(1, 16), np.zeros(1), images=[])


def test_diff_beta_form_returns_uncertainty_vectors(tmp_path, diff_bundle):
    image = make_image_bytes(11)
    pixels = preprocess_bytes(image, diff_bundle.preprocess)[None]
    outputs = Embedder(diff_bundle).embed(pixels)
    with Catalog.open(tmp_path / "catalog", diff_bundle) as catalog:
        catalog.add_images([ItemInput("u", image)], Embedder(diff_bundle))
        top = catalog.search(outputs.embedding, 1)[0][0]
        with pytest.raises(ValueError, match="needs uncertainty embeddings"):
            catalog.add_embedded(["v"], outputs.embedding, np.zeros(1), images=[image])
        assert catalog.verify().ok

    np.testing.assert_allclose(top.uncertainty_vector, outputs.uncertainty[0], rtol=1e-6)
    assert top.uncertainty == pytest.approx(float(outputs.uncertainty_scalar[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "floor"),
    [
        ("hnsw", 0.95),  # measured 1.000
        ("ivf_sq8", 0.95),  # measured 0.999
        ("ivf_pq", 0.85),  # measured 0.897: 4 sub-quantisers of 6 bits, then exact rescoring of 40 candidates
    ],
)
def test_approximate_catalog_search(tmp_path, tiny_bundle, kind, floor):
    vectors = unit_vectors(1200, 16, seed=3)
    ids = [f"v{i}" for i in range(1200)]
    images = [make_image_bytes(i % 10, size=8) for i in range(1200)]  # few files to fsync
    spec = IndexSpec(kind=kind, ivf_min_items=1000, pq_nbits=6, nlist=16)
    with Catalog.open(tmp_path / "catalog", tiny_bundle, index_spec=spec) as catalog:
        catalog.add_embedded(ids[:900], vectors[:900], np.full(900, 0.2), images=images[:900])
        assert catalog.index_kind == ("hnsw" if kind == "hnsw" else "flat")  # IVF needs 1000 to train
        catalog.add_embedded(ids[900:], vectors[900:], np.full(300, 0.2), images=images[900:])
        assert catalog.index_kind == kind
        catalog.delete(["v5"])

        results = catalog.search(vectors[:200], 10, params=SearchParams(nprobe=16, ef_search=64))
        truth = np.argsort(-(vectors[:200] @ np.delete(vectors, 5, axis=0).T), axis=1)[:, :10]
        names = np.delete(np.asarray(ids), 5)
        recall = np.mean([len({c.item.id for c in r} & set(names[t])) / 10 for r, t in zip(results, truth)])
        print(f"{kind} recall@10 {recall:.3f}")
        assert recall >= floor
        for query, result in zip(vectors[:200], results):
            reported = [c.similarity for c in result]
            exact = [float(vectors[int(c.item.id[1:])] @ query) for c in result]
            np.testing.assert_allclose(reported, exact, atol=1e-5)  # exact even for quantised indexes
            assert reported == sorted(reported, reverse=True)
        assert all("v5" not in {c.item.id for c in r} for r in results)
        assert catalog.verify().ok

    with Catalog.open(tmp_path / "catalog", tiny_bundle, index_spec=spec) as reopened:
        assert reopened.index_kind == kind
        assert reopened.count() == 1199


def test_large_filter_uses_index_selector(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setattr("index.catalog.EXACT_FILTER_MAX", 10)
    vectors = unit_vectors(300, 16, seed=4)
    attributes = [{"group": i % 3} for i in range(300)]
    images = [make_image_bytes(i % 10, size=8) for i in range(300)]
    spec = IndexSpec(kind="hnsw")
    with Catalog.open(tmp_path / "catalog", tiny_bundle, index_spec=spec) as catalog:
        catalog.add_embedded([f"v{i}" for i in range(300)], vectors, np.zeros(300), attributes=attributes, images=images)

        results = catalog.search(vectors[:30], 10, filter={"group": 1})

    for q, result in enumerate(results):
        assert len(result) == 10
        assert all(c.item.attributes["group"] == 1 for c in result)
        members = np.arange(1, 300, 3)
        best = members[np.argsort(-(vectors[members] @ vectors[q]))[:10]]
        assert {c.item.id for c in result} == {f"v{i}" for i in best}


def test_verify_reports_each_problem(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    catalog = Catalog.open(path, tiny_bundle)
    catalog.add_images(inputs(6), Embedder(tiny_bundle))
    catalog.original_path("item-001").unlink()
    catalog.original_path("item-002").write_bytes(b"changed")
    (path / "originals" / "ab").mkdir(exist_ok=True)
    (path / "originals" / "ab" / ("c" * 62)).write_bytes(b"stray")
    catalog._gen.backend.remove(np.asarray([catalog._gen.store.get_by_id("item-003").fid]))
    connection = sqlite3.connect(path / "gen-000001" / "catalog.sqlite3")
    connection.execute("UPDATE items SET uncertainty = -1 WHERE id = 'item-004'")
    connection.commit()
    connection.close()

    report = catalog.verify()

    found = {(problem.kind, problem.id) for problem in report.problems}
    assert ("missing_original", "item-001") in found
    assert ("corrupt_original", "item-002") in found
    assert ("missing_vector", "item-003") in found
    assert ("bad_uncertainty", "item-004") in found
    assert ("orphan_original", None) in found
    assert not report.ok
    catalog.close()


def test_reembed_switches_model(tmp_path, tiny_bundle, other_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle) as catalog:
        catalog.add_images(inputs(10), Embedder(tiny_bundle))
        before = {item.id: item for item in catalog.list_items(0, 100)}
        calls = []

        catalog.reembed(other_bundle, Embedder(other_bundle), progress=lambda d, t: calls.append((d, t)))

        assert catalog.model_id == other_bundle.model_id
        assert calls[-1] == (10, 10)
        top = catalog.search(embed_images(other_bundle, [make_image_bytes(6)]), 1)[0][0]
        assert top.item.id == "item-006"
        assert top.item.model_id == other_bundle.model_id
        assert top.similarity == pytest.approx(1.0, abs=1e-5)
        after = {item.id: item for item in catalog.list_items(0, 100)}
        assert {i: (x.label, x.attributes, x.content_hash, x.created_at) for i, x in after.items()} == {
            i: (x.label, x.attributes, x.content_hash, x.created_at) for i, x in before.items()
        }
        assert catalog.verify().ok

    assert sorted(p.name for p in path.glob("gen-*")) == ["gen-000002"]
    with pytest.raises(ModelMismatchError):
        Catalog.open(path, tiny_bundle)
    with Catalog.open(path, other_bundle) as reopened:
        assert reopened.count() == 10


def test_reembed_stops_on_missing_original(tmp_path, tiny_bundle, other_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle) as catalog:
        catalog.add_images(inputs(5), Embedder(tiny_bundle))
        catalog.original_path("item-002").unlink()

        with pytest.raises(CatalogError, match="item-002"):
            catalog.reembed(other_bundle, Embedder(other_bundle))
        assert catalog.model_id == tiny_bundle.model_id
        assert sorted(p.name for p in path.glob("gen-*")) == ["gen-000001"]

        catalog.reembed(other_bundle, Embedder(other_bundle), drop_failed=True)
        assert catalog.count() == 4
        assert catalog.get("item-002") is None
        assert catalog.verify().ok


def test_index_spec_change_rebuilds(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle, index_spec=IndexSpec(kind="flat")) as catalog:
        catalog.add_images(inputs(5), Embedder(tiny_bundle))
        assert catalog.index_kind == "flat"

    with Catalog.open(path, tiny_bundle, index_spec=IndexSpec(kind="hnsw")) as catalog:
        assert catalog.index_kind == "hnsw"
        assert catalog.stats()["index"]["spec"]["kind"] == "hnsw"
    with Catalog.open(path, tiny_bundle) as catalog:
        assert catalog.index_kind == "hnsw"  # the stored spec is kept


def test_stats_counts(catalog):
    stats = catalog.stats()

    assert stats["items"] == COUNT
    assert stats["model_id"] == catalog.model_id
    assert stats["index"]["kind"] == "flat"
    assert stats["originals"]["files"] == COUNT
    assert stats["originals"]["bytes"] == sum(len(make_image_bytes(i)) for i in range(COUNT))


def test_crash_leftovers_cleaned_on_open(tmp_path, tiny_bundle):
    path = tmp_path / "catalog"
    with Catalog.open(path, tiny_bundle) as catalog:
        catalog.add_images(inputs(3), Embedder(tiny_bundle))
    (path / "dirty").touch()  # as if the writer had been killed
    orphan = path / "originals" / "ff" / ("e" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"half a batch")
    (path / "originals" / "tmp" / "partial").write_bytes(b"x")
    shutil.copytree(path / "gen-000001", path / "gen-000002")  # an unfinished re-embed

    with Catalog.open(path, tiny_bundle) as reopened:
        assert not orphan.exists()
        assert not (path / "gen-000002").exists()
        assert not any((path / "originals" / "tmp").iterdir())
        assert reopened.verify().ok


def test_item_cache_stays_bounded_under_concurrent_searches(catalog, tiny_bundle, monkeypatch):
    """Eviction while other threads insert: no error, and the cache never grows past its bound."""
    import threading

    import index.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "ITEM_CACHE_SIZE", 5)
    queries = embed_images(tiny_bundle, [make_image_bytes(seed) for seed in range(8)])
    errors: list[BaseException] = []

    def search_many() -> None:
        try:
            for round_number in range(40):
                catalog.search(queries[round_number % 8 : round_number % 8 + 1], 12)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=search_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(catalog._gen.item_cache) <= 5


def test_lock_probe_leaves_holder_pid(tmp_path):
    from index.locks import ProcessLock

    path = tmp_path / "lock"
    assert ProcessLock(path).is_free() is False  # a missing lock file counts as held
    held = ProcessLock(path)
    held.acquire()
    assert ProcessLock(path).is_free() is False
    assert ProcessLock(path).holder() == str(os.getpid())
    held.release()
    assert ProcessLock(path).is_free() is True
    assert ProcessLock(path).holder() == str(os.getpid())  # the probe wrote nothing
