"""Snapshots of the vector index, and bringing one up to date from SQLite.

A snapshot in a generation folder is three files:

    vectors-<counter>-<token>.faiss    the FAISS index (`faiss.write_index`)
    vectors-<counter>-<token>.ids.npz  `stored`: every id in the index file,
                                       `tombstones`: removed ids still in it (HNSW)
    snapshot.json                      names the two files, their sizes, the
                                       index kind and spec, and the SQLite fid
                                       counter and item count they reflect

The data files are fsynced before `snapshot.json` is replaced by an atomic
rename, so `snapshot.json` always names complete files. `load_backend`
returns the index that matches the SQLite store exactly: it adds the rows the
snapshot lacks and removes the ids SQLite no longer has, or rebuilds from
SQLite when the snapshot is missing, damaged or of another kind.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.faiss_backend import FaissBackend, IndexSpec, default_nlist
from index.faults import crash_point
from index.fsync import fsync_dir
from index.metadata import MetadataStore

logger = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
SNAPSHOT_VERSION = 1

# Rows read from SQLite per step when rebuilding or replaying.
_REPLAY_BATCH = 8192


class SnapshotError(RuntimeError):
    """A snapshot that cannot be used; the catalog rebuilds from SQLite instead."""


@dataclass(frozen=True)
class SnapshotInfo:
    """Contents of `snapshot.json`."""

    index_file: str
    ids_file: str
    index_bytes: int
    ids_bytes: int
    kind: str
    spec: dict
    dimension: int
    fid_counter: int  # SQLite fid counter when the snapshot was taken
    count: int  # live items when the snapshot was taken
    created_at: float  # Unix time

    @classmethod
    def read(cls, folder: Path) -> "SnapshotInfo | None":
        path = folder / MANIFEST
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.pop("version") != SNAPSHOT_VERSION:
                raise SnapshotError(f"{path} has an unsupported version")
            return cls(**record)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise SnapshotError(f"{path} is unreadable: {error}") from None


def write_snapshot(folder: Path, backend: FaissBackend, fid_counter: int, count: int) -> SnapshotInfo:
    """Write the backend as the folder's snapshot and delete older snapshot files."""
    name = f"vectors-{fid_counter:012d}-{uuid.uuid4().hex[:8]}"
    (index_path,) = backend.save(folder, name)
    ids_path = folder / f"{name}.ids.npz"
    tombstones = np.setdiff1d(backend.stored_ids(), backend.ids())
    with open(ids_path, "wb") as handle:
        np.savez(handle, stored=backend.stored_ids(), tombstones=tombstones)
        handle.flush()
        os.fsync(handle.fileno())
    crash_point("snapshot_files_written")

    info = SnapshotInfo(
        index_file=index_path.name,
        ids_file=ids_path.name,
        index_bytes=index_path.stat().st_size,
        ids_bytes=ids_path.stat().st_size,
        kind=backend.kind,
        spec=backend.spec.to_json(),
        dimension=backend.dimension,
        fid_counter=int(fid_counter),
        count=int(count),
        created_at=time.time(),
    )
    temporary = folder / f"{MANIFEST}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"version": SNAPSHOT_VERSION, **info.__dict__}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / MANIFEST)
    fsync_dir(folder)
    crash_point("snapshot_published")

    for path in folder.glob("vectors-*"):
        if path.name not in (info.index_file, info.ids_file):
            path.unlink(missing_ok=True)
    return info


def load_backend(
    folder: Path, store: MetadataStore, spec: IndexSpec, dimension: int
) -> tuple[FaissBackend, SnapshotInfo | None, int]:
    """Load the backend that matches `store`, from the snapshot when it is usable.

    Returns (backend, the snapshot used or None, rows replayed or rebuilt).
    """
    count = store.count()
    wanted_kind = None
    try:
        info = SnapshotInfo.read(folder)
        if info is not None:
            wanted_kind = spec.kind_for(count, info.kind)
            backend = _open_snapshot(folder, info, spec, dimension, wanted_kind)
            replayed = _replay(backend, info, store)
            if backend.count() != count:
                raise SnapshotError(
                    f"snapshot in {folder} has {backend.count()} live vectors after replay, "
                    f"SQLite has {count}"
                )
            return backend, info, replayed
    except SnapshotError as error:
        logger.warning("rebuilding the vector index from SQLite: %s", error)
    except RuntimeError as error:  # FAISS raises RuntimeError on a damaged file
        logger.warning("rebuilding the vector index from SQLite: snapshot in %s is damaged: %s", folder, error)
    kind = wanted_kind or spec.kind_for(count)
    return rebuild_backend(store, spec, dimension, kind), None, count


def _open_snapshot(
    folder: Path, info: SnapshotInfo, spec: IndexSpec, dimension: int, wanted_kind: str
) -> FaissBackend:
    if info.dimension != dimension:
        raise SnapshotError(f"snapshot dimension {info.dimension} differs from the catalog's {dimension}")
    if info.spec != spec.to_json() or info.kind != wanted_kind:
        raise SnapshotError(f"snapshot index ({info.kind}, {info.spec}) differs from the wanted ({wanted_kind}, {spec})")
    index_path = folder / info.index_file
    ids_path = folder / info.ids_file
    for path, size in ((index_path, info.index_bytes), (ids_path, info.ids_bytes)):
        if not path.is_file() or path.stat().st_size != size:
            raise SnapshotError(f"snapshot file {path} is missing or not {size} bytes")
    backend = FaissBackend.load(index_path, info.kind, spec)
    with np.load(ids_path) as arrays:
        stored = arrays["stored"]
        tombstones = arrays["tombstones"]
    if backend.ntotal != len(stored) or backend.dimension != dimension:
        raise SnapshotError(f"snapshot {index_path} contains {backend.ntotal} vectors but its id list has {len(stored)}")
    if len(tombstones):
        backend.remove(tombstones)
    return backend


def _replay(backend: FaissBackend, info: SnapshotInfo, store: MetadataStore) -> int:
    """Apply the SQLite changes made after the snapshot; returns rows added plus ids removed."""
    if store.fid_counter() == info.fid_counter and store.count() == info.count:
        return 0  # no fid assigned and none deleted since: the sets are equal
    live = store.all_fids()
    in_index = backend.ids()
    removed = np.setdiff1d(in_index, live, assume_unique=True)
    added = np.setdiff1d(live, in_index, assume_unique=True)
    if len(removed):
        backend.remove(removed)
    for start in range(0, len(added), _REPLAY_BATCH):
        fids, vectors = store.vectors_by_fids(added[start : start + _REPLAY_BATCH], backend.dimension)
        backend.add(fids, vectors)
    if len(added) or len(removed):
        logger.info("replayed %d added and %d removed items onto the snapshot", len(added), len(removed))
    return int(len(added) + len(removed))


def rebuild_backend(store: MetadataStore, spec: IndexSpec, dimension: int, kind: str) -> FaissBackend:
    """Build an index of `kind` from every vector in `store`."""
    started = time.perf_counter()
    training = None
    if kind in ("ivf_sq8", "ivf_pq"):
        fids = store.all_fids()
        limit = 256 * (spec.nlist or 4096)
        if len(fids) > limit:
            fids = np.sort(np.random.default_rng(0).choice(fids, size=limit, replace=False))
        _, training = store.vectors_by_fids(fids, dimension)
        # nlist is sized from the whole catalog, not from the sample.
        if spec.nlist is None:
            spec_for_training = IndexSpec(**{**spec.to_json(), "nlist": default_nlist(store.count())})
            backend = FaissBackend.create(dimension, kind, spec_for_training, training)
            backend.spec = spec
        else:
            backend = FaissBackend.create(dimension, kind, spec, training)
    else:
        backend = FaissBackend.create(dimension, kind, spec)
    for fids, vectors in store.iter_vectors(_REPLAY_BATCH):
        backend.add(fids, vectors)
    logger.info(
        "built a %s index of %d vectors in %.1f s", kind, backend.ntotal, time.perf_counter() - started
    )
    return backend
