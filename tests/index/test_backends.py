"""Vector backends behind `VectorBackend`: FAISS, and Milvus through pymilvus against a real Milvus Lite.

The Milvus cases start Milvus Lite (package `milvus-lite`, the C++ Milvus
engine in a child process) on a `.db` file under tmp_path, and skip when
pymilvus or milvus-lite is not installed (`pip install 'idml-search[milvus]'
milvus-lite`).

NOTE: Milvus Lite 2.5.1's local mode builds only FLAT, IVF_FLAT and
AUTOINDEX, so the Milvus HNSW case skips with Milvus's own message. It also
searches IVF_FLAT as FLAT, so per-call nprobe is not observable here.
docs/milvus.md lists how Lite and a Milvus server differ.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import numpy as np
import pytest

from index.backend import MISSING_ID, BackendSearchParams
from index.faiss_backend import FaissBackend, IndexSpec
from index.metadata import filter_sql
from tests.bundle_factory import make_image_bytes, unit_vectors

DIM = 16
COUNT = 300
BACKENDS = ["faiss", "milvus"]

MILVUS_MISSING = next(
    (
        f"{module} is not installed (pip install 'idml-search[milvus]' milvus-lite)"
        for module in ("pymilvus", "milvus_lite")
        if importlib.util.find_spec(module) is None
    ),
    None,
)
needs_milvus = pytest.mark.skipif(MILVUS_MISSING is not None, reason=MILVUS_MISSING or "")


def milvus_config(tmp_path, **overrides):
    from index.milvus_backend import MilvusConfig

    return MilvusConfig(uri=str(tmp_path / "milvus.db"), **{"index_type": "FLAT", **overrides})


def open_milvus(config, **kwargs):
    from index.milvus_backend import MilvusBackend, MilvusBackendError

    try:
        return MilvusBackend.open(config, "vectors", DIM, **kwargs)
    except MilvusBackendError as error:
        if "local mode only support" in str(error):
            pytest.skip(f"Milvus Lite cannot build {config.index_type}: {error}")
        raise


@pytest.fixture
def make_backend(tmp_path):
    """Return a factory: (backend name, kind) -> an empty backend of dimension DIM, closed after the test."""
    opened = []

    def make(name: str, kind: str = "flat", training: np.ndarray | None = None):
        if name == "faiss":
            spec = IndexSpec(kind=kind, nlist=16, ef_search=16)
            return FaissBackend.create(DIM, kind, spec, training)
        if MILVUS_MISSING:
            pytest.skip(MILVUS_MISSING)
        index_type = {"flat": "FLAT", "hnsw": "HNSW", "ivf_sq8": "IVF_SQ8", "ivf_flat": "IVF_FLAT"}[kind]
        backend = open_milvus(milvus_config(tmp_path, index_type=index_type, nlist=16, nprobe=16, ef_search=16))
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


def ids_of(count: int) -> np.ndarray:
    """Ids far from 0..count so that a backend using row positions as ids would fail."""
    return np.arange(count, dtype=np.int64) * 7 + 1000


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / exact.size


@pytest.mark.parametrize("name", BACKENDS)
def test_own_vector_found_first(make_backend, name):
    backend = make_backend(name)
    vectors = unit_vectors(COUNT, DIM)
    backend.add(ids_of(COUNT), vectors)

    scores, found = backend.search(vectors, 5)

    assert backend.count() == COUNT
    assert np.array_equal(found[:, 0], ids_of(COUNT))  # recall@1 = 1.0
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert np.array_equal(np.sort(backend.ids()), ids_of(COUNT))


@pytest.mark.parametrize("name", BACKENDS)
def test_short_results_padded(make_backend, name):
    backend = make_backend(name)
    backend.add(ids_of(3), unit_vectors(3, DIM))

    scores, found = backend.search(unit_vectors(2, DIM, seed=5), 5)

    assert found.shape == (2, 5)
    assert np.all(found[:, 3:] == MISSING_ID)
    assert np.all(np.isneginf(scores[:, 3:]))


@pytest.mark.parametrize("name", BACKENDS)
def test_removed_ids_never_returned(make_backend, name):
    backend = make_backend(name)
    vectors = unit_vectors(COUNT, DIM)
    backend.add(ids_of(COUNT), vectors)
    removed = ids_of(COUNT)[:50]

    live = backend.remove(np.concatenate([removed, [10**12]]))
    _, found = backend.search(vectors[:50], 10)

    assert live == 50
    assert backend.count() == COUNT - 50
    assert not np.isin(found, removed).any()


@pytest.mark.parametrize("name", BACKENDS)
def test_replaced_vector_visible_to_next_search(make_backend, name):
    backend = make_backend(name)
    vectors = unit_vectors(COUNT, DIM)
    backend.add(ids_of(COUNT), vectors)
    new_vector = unit_vectors(1, DIM, seed=99)
    target = ids_of(COUNT)[7:8]

    backend.remove(target)
    backend.add(target, new_vector)
    _, by_new = backend.search(new_vector, 1)
    _, by_old = backend.search(vectors[7:8], 1)

    assert by_new[0, 0] == target[0]
    assert by_old[0, 0] != target[0]
    assert backend.count() == COUNT


@pytest.mark.parametrize("name", BACKENDS)
def test_allowed_ids_restrict_results(make_backend, name):
    backend = make_backend(name)
    vectors = unit_vectors(COUNT, DIM)
    backend.add(ids_of(COUNT), vectors)
    allowed = ids_of(COUNT)[::10]

    _, found = backend.search(vectors[:20], 5, allowed_ids=allowed)

    assert np.isin(found[found != MISSING_ID], allowed).all()
    assert found[0, 0] == ids_of(COUNT)[0]


@pytest.mark.parametrize("name", BACKENDS)
def test_nprobe_is_per_call(make_backend, name):
    vectors = unit_vectors(2000, DIM)
    backend = make_backend(name, "ivf_sq8" if name == "faiss" else "ivf_flat", training=vectors)
    backend.add(ids_of(2000), vectors)
    queries = unit_vectors(50, DIM, seed=3)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    exact_ids = ids_of(2000)[exact]

    _, narrow = backend.search(queries, 10, params=BackendSearchParams(nprobe=1))
    _, full = backend.search(queries, 10, params=BackendSearchParams(nprobe=16))
    _, narrow_again = backend.search(queries, 10, params=BackendSearchParams(nprobe=1))

    if name == "milvus":
        # Milvus Lite 2.5 searches IVF_FLAT collections under 100,000 rows with FLAT (its README,
        # "Index Type"), so only the request is checked here; bench/index_milvus.py measures nprobe.
        assert backend._search_params(BackendSearchParams(nprobe=1), 10) == {"nprobe": 1}
        assert backend._search_params(BackendSearchParams(), 10) == {"nprobe": 16}
        assert recall_at(narrow, exact_ids) == 1.0
        return
    assert recall_at(narrow, exact_ids) < recall_at(full, exact_ids)
    assert recall_at(full, exact_ids) >= 0.95  # all 16 lists: exact for IVF_FLAT, 8-bit codes for FAISS
    assert np.array_equal(narrow, narrow_again)  # a wide search left no setting behind


@pytest.mark.parametrize("name", BACKENDS)
def test_ef_search_is_per_call(make_backend, name):
    backend = make_backend(name, "hnsw")
    vectors = unit_vectors(2000, DIM)
    backend.add(ids_of(2000), vectors)
    queries = unit_vectors(50, DIM, seed=4)
    exact_ids = ids_of(2000)[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]

    _, wide = backend.search(queries, 10, params=BackendSearchParams(ef_search=512))
    _, default = backend.search(queries, 10)

    assert recall_at(wide, exact_ids) >= 0.99
    assert recall_at(wide, exact_ids) >= recall_at(default, exact_ids)


@pytest.mark.parametrize("name", BACKENDS)
def test_reopened_backend_keeps_ids(make_backend, tmp_path, name):
    backend = make_backend(name)
    vectors = unit_vectors(COUNT, DIM)
    backend.add(ids_of(COUNT), vectors)
    backend.remove(ids_of(COUNT)[:10])

    if name == "faiss":
        (path,) = backend.save(tmp_path, "snapshot")
        reopened = FaissBackend.load(path, "flat", IndexSpec(kind="flat"))
    else:
        backend.save(tmp_path, "snapshot")
        backend.close()
        reopened = open_milvus(milvus_config(tmp_path), create=False)
    try:
        _, found = reopened.search(vectors[10:], 1)
        assert np.array_equal(np.sort(reopened.ids()), ids_of(COUNT)[10:])
        assert np.array_equal(found[:, 0], ids_of(COUNT)[10:])
    finally:
        if name == "milvus":
            reopened.close()


# Milvus only -------------------------------------------------------------

FILTER_ITEMS = [
    ("a", {"n": 3, "s": "3", "b": True}),
    ("a", {"n": 3.0, "s": "x\"y", "b": False}),
    ("b", {"n": 1, "s": "back\\slash", "b": 1}),
    (None, {"n": 3.5, "s": "", "b": None}),
    ("", {"s": "3"}),
]
FILTERS = [
    {"label": "a"},
    {"label": None},
    {"label": ""},
    {"n": 3},
    {"n": 3.5},
    {"s": "3"},
    {"s": 'x"y'},
    {"s": "back\\slash"},
    {"b": True},
    {"b": 1},
    {"label": "a", "b": False},
    {"n": "3"},
]


def sqlite_matches(filter: dict) -> set[int]:
    """Ids among FILTER_ITEMS that the catalog's SQLite filter selects."""
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE items (fid INTEGER, label TEXT, attributes TEXT)")
    connection.executemany(
        "INSERT INTO items VALUES (?, ?, ?)",
        [(fid, label, json.dumps(attributes)) for fid, (label, attributes) in enumerate(FILTER_ITEMS)],
    )
    where, params = filter_sql(filter)
    return {row[0] for row in connection.execute(f"SELECT fid FROM items WHERE {where}", params)}


@needs_milvus
def test_milvus_filter_matches_sqlite(tmp_path):
    from index.milvus_backend import milvus_filter

    backend = open_milvus(milvus_config(tmp_path))
    vectors = unit_vectors(len(FILTER_ITEMS), DIM)
    backend.add_items(
        np.arange(len(FILTER_ITEMS)),
        vectors,
        labels=[label for label, _ in FILTER_ITEMS],
        attributes=[attributes for _, attributes in FILTER_ITEMS],
    )
    try:
        for filter in FILTERS:
            expression = milvus_filter(filter)
            assert expression, f"{filter} has no Milvus expression"
            _, found = backend.search(vectors[:1], len(FILTER_ITEMS), filter=expression)
            assert set(found[0][found[0] != MISSING_ID].tolist()) == sqlite_matches(filter), filter
    finally:
        backend.close()


def test_milvus_filter_defers_null_attribute():
    from index.milvus_backend import milvus_filter

    assert milvus_filter({"b": None}) is None
    assert milvus_filter({}) == ""
    with pytest.raises(ValueError, match="'n'"):
        milvus_filter({"n": [1]})


@needs_milvus
def test_milvus_stores_uncertainty_beside_vector(tmp_path):
    backend = open_milvus(milvus_config(tmp_path), uncertainty_dim=4)
    uncertainty = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    try:
        backend.add_items(
            np.array([5, 6, 7]),
            unit_vectors(3, DIM),
            uncertainty_vectors=uncertainty,
            labels=["x", None, "z"],
            attributes=[{"k": 1}, {}, {"k": "v"}],
        )
        backend.upsert(np.array([7]), unit_vectors(1, DIM, seed=8), uncertainty_vectors=uncertainty[:1], labels=["new"])

        stored = backend.fields(np.array([5, 6, 7, 8]))
    finally:
        backend.close()

    assert sorted(stored) == [5, 6, 7]
    assert stored[5][0] == pytest.approx(float(uncertainty[0] @ uncertainty[0]), rel=1e-5)
    assert np.allclose(stored[6][1], uncertainty[1])
    assert stored[6][2] is None
    assert stored[5][2] == "x"
    assert stored[7][2:] == ("new", {})
    assert np.allclose(stored[7][1], uncertainty[0])


@needs_milvus
def test_milvus_layout_mismatch_rejected(tmp_path):
    from index.milvus_backend import MilvusBackend, MilvusBackendError

    open_milvus(milvus_config(tmp_path)).close()

    with pytest.raises(MilvusBackendError, match="has layout"):
        MilvusBackend.open(milvus_config(tmp_path, index_type="IVF_FLAT"), "vectors", DIM)


def test_milvus_config_validated_and_read_from_env():
    from index.milvus_backend import MilvusConfig

    with pytest.raises(ValueError, match="index_type 'DISKANN'"):
        MilvusConfig(uri="http://127.0.0.1:19530", index_type="DISKANN")
    with pytest.raises(ValueError, match="nprobe"):
        MilvusConfig(uri="x.db", nlist=4, nprobe=8)
    with pytest.raises(ValueError, match="IDML_MILVUS_NLIST"):
        MilvusConfig.from_env({"IDML_MILVUS_URI": "http://m:19530", "IDML_MILVUS_NLIST": "many"})
    assert MilvusConfig.from_env({}) is None

    config = MilvusConfig.from_env(
        {"IDML_MILVUS_URI": "http://m:19530", "IDML_MILVUS_INDEX_TYPE": "IVF_SQ8", "IDML_MILVUS_NPROBE": "4"}
    )

    assert (config.uri, config.index_type, config.nprobe, config.is_local) == ("http://m:19530", "IVF_SQ8", 4, False)
    assert MilvusConfig(uri="data/milvus.db").is_local


# catalog on Milvus -----------------------------------------------------------


@needs_milvus
def test_catalog_on_milvus(tmp_path, tiny_bundle, monkeypatch):
    import index.catalog as catalog_module
    from index.catalog import Catalog

    config = milvus_config(tmp_path)
    dimension = tiny_bundle.manifest.outputs.embedding_dim
    vectors = unit_vectors(30, dimension)
    ids = [f"item-{i}" for i in range(30)]
    with Catalog.open(tmp_path / "catalog", tiny_bundle, durability="process") as catalog:
        catalog.add_embedded(
            ids,
            vectors,
            np.linspace(0, 1, 30, dtype=np.float32),
            labels=["odd" if i % 2 else "even" for i in range(30)],
            attributes=[{"shard": i % 3} for i in range(30)],
            images=[make_image_bytes(i) for i in range(30)],
        )
    # Opened first with FAISS: the Milvus collection is filled from SQLite on open.
    with Catalog.open(tmp_path / "catalog", tiny_bundle, milvus=config, durability="process") as catalog:
        assert catalog.index_kind == "flat"
        assert [result[0].item.id for result in catalog.search(vectors, 3)] == ids
        catalog.delete(["item-0"])
        catalog.add_embedded(["item-1"], vectors[2:3], np.zeros(1, np.float32), images=[make_image_bytes(99)])

        # Filters that match more than EXACT_FILTER_MAX items go to Milvus as expressions.
        monkeypatch.setattr(catalog_module, "EXACT_FILTER_MAX", 0)
        filtered = catalog.search(vectors[3:4], 30, filter={"label": "odd", "shard": 0})
        after_write = catalog.search(vectors[:3], 2)

    assert {candidate.item.id for candidate in filtered[0]} == {f"item-{i}" for i in (3, 9, 15, 21, 27)}
    assert filtered[0][0].uncertainty == pytest.approx(3 / 29, rel=1e-5)
    assert "item-0" not in {candidate.item.id for candidate in after_write[0]}
    assert {candidate.item.id for candidate in after_write[2]} == {"item-1", "item-2"}

    with Catalog.open(tmp_path / "catalog", tiny_bundle, milvus=config, durability="process") as reopened:
        report = reopened.verify(check_content=False)
        assert reopened.stats()["items"] == 29
        assert [result[0].item.id for result in reopened.search(vectors[3:6], 1)] == ["item-3", "item-4", "item-5"]
    assert report.problems == []
