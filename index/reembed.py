"""Re-embedding a catalog with a new model bundle, online.

1. Under the write lock, create generation N+1 (its own SQLite file) and note
   the current fid counter F.
2. Without the lock, copy every row with fid <= F into N+1 with the same fid
   and metadata and a new embedding computed from the stored original. The
   catalog keeps serving searches and writes on generation N meanwhile.
3. Catch up: since every write gives an item a new fid, the fids live in N but
   not in N+1 are the rows still to copy, and the fids in N+1 but no longer in
   N were deleted or replaced. Build the vector index of N+1, then catch up
   again under the write lock, where N cannot change.
4. Still under the lock: snapshot N+1, make it durable, atomically replace
   `catalog.json`, swap the in-memory state with searches paused, and delete N.

A crash before step 4's rename leaves N current; the next open deletes the
unfinished N+1. A crash after it leaves N+1 current and the next open deletes N.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from index.bundle import ModelBundle
from index.catalog_types import CatalogError
from index.faults import crash_point
from index.fsync import fsync_dir
from index.imaging import ImageDecodeError
from index.metadata import ItemRow, MetadataStore, NewRow
from index.snapshot import rebuild_backend, write_snapshot

if TYPE_CHECKING:
    from index.catalog import Catalog, CatalogInfo

logger = logging.getLogger(__name__)


class _Copier:
    """Copies rows of the old generation into the new one with new embeddings."""

    def __init__(self, catalog: "Catalog", old: MetadataStore, new: MetadataStore, info: "CatalogInfo",
                 embedder: Any, batch_size: int):
        self.catalog = catalog
        self.old = old
        self.new = new
        self.info = info
        self.embedder = embedder
        self.batch_size = batch_size
        self.failures: dict[int, tuple[str, str]] = {}  # fid -> (item id, message)

    def copy(self, rows: list[ItemRow]) -> dict[int, np.ndarray]:
        """Embed and insert rows; returns the inserted fids with their embeddings."""
        from index.catalog import _decode_for_model

        spec = self.embedder.bundle.preprocess
        pool = self.catalog._decoder_pool()
        inserted: dict[int, np.ndarray] = {}
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            futures = []
            for row in batch:
                try:
                    data = self.catalog._originals.read(row.content_hash)
                except FileNotFoundError:
                    self.failures[row.fid] = (row.id, f"original {row.content_hash} is missing")
                    futures.append(None)
                    continue
                futures.append(pool.submit(_decode_for_model, data, spec))
            good: list[ItemRow] = []
            arrays = []
            for row, future in zip(batch, futures):
                if future is None:
                    continue
                decoded = future.result()
                if isinstance(decoded, ImageDecodeError):
                    self.failures[row.fid] = (row.id, f"original cannot be decoded: {decoded}")
                    continue
                good.append(row)
                arrays.append(decoded[0])
            if not good:
                continue
            embedded = self.embedder.embed(np.stack(arrays))
            scalars = embedded.uncertainty_scalar
            keep_vector = self.info.beta_form == "diff"
            self.new.begin()
            try:
                for position, row in enumerate(good):
                    self.new.insert(
                        NewRow(
                            fid=row.fid,
                            id=row.id,
                            label=row.label,
                            attributes_json=_attributes_json(row),
                            content_hash=row.content_hash,
                            media_type=row.media_type,
                            image_bytes=row.image_bytes,
                            model_id=self.info.model_id,
                            created_at=row.created_at,
                            updated_at=row.updated_at,
                            embedding=embedded.embedding[position],
                            uncertainty=float(scalars[position]),
                            uncertainty_vector=embedded.uncertainty[position] if keep_vector else None,
                        )
                    )
                    inserted[row.fid] = embedded.embedding[position]
                self.new.commit()
            except BaseException:
                self.new.rollback()
                raise
        return inserted

    def catch_up(self) -> tuple[dict[int, np.ndarray], list[int]]:
        """Copy rows new in the old generation and delete rows gone from it.

        Returns (inserted fids with embeddings, deleted fids).
        """
        live_old = self.old.all_fids()
        live_new = self.new.all_fids()
        stale = np.setdiff1d(live_new, live_old, assume_unique=True).tolist()
        missing = np.setdiff1d(live_old, live_new, assume_unique=True)
        missing = [fid for fid in missing.tolist() if fid not in self.failures]
        if stale:
            self.new.begin()
            try:
                for fid in stale:
                    self.new.delete_fid(fid)
                self.new.commit()
            except BaseException:
                self.new.rollback()
                raise
        rows_by_fid = self.old.rows_by_fids(missing)
        inserted = self.copy([rows_by_fid[fid] for fid in missing if fid in rows_by_fid])
        # A failure whose row was deleted from the old generation no longer matters.
        for fid in [fid for fid in self.failures if fid not in set(live_old.tolist())]:
            del self.failures[fid]
        return inserted, stale


def _attributes_json(row: ItemRow) -> str:
    import json

    return json.dumps(row.attributes, allow_nan=False, sort_keys=True, ensure_ascii=False)


def reembed_catalog(
    catalog: "Catalog",
    bundle: ModelBundle,
    embedder: Any,
    *,
    progress: Callable[[int, int], None] | None,
    batch_size: int,
    drop_failed: bool,
) -> None:
    """Re-embed `catalog` with `bundle`; see the module docstring for the steps."""
    from index.catalog import (
        DB_NAME,
        CatalogInfo,
        _Generation,
        _generation_folder,
        _utc_now,
    )

    started = time.perf_counter()
    with catalog._write_lock:
        catalog._check_writable()
        old = catalog._gen
        if bundle.model_id == old.info.model_id:
            logger.info("catalog %s is already embedded with model %s", catalog.path, bundle.model_id)
            return
        number = old.number + 1
        folder = _generation_folder(catalog.path, number)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        info = CatalogInfo.from_bundle(bundle, old.info.index_spec)
        store = MetadataStore(folder / DB_NAME, synchronous=catalog._synchronous)
        ceiling = old.store.fid_counter()
    switched = False
    try:
        store.set_meta({**info.to_meta(), "created_at": _utc_now()})
        copier = _Copier(catalog, old.store, store, info, embedder, batch_size)
        total = old.count
        done = 0
        last = 0
        while True:
            rows = old.store.page_after(last, max(batch_size * 8, 256), ceiling)
            if not rows:
                break
            copier.copy(rows)
            last = rows[-1].fid
            done += len(rows)
            if progress is not None:
                progress(min(done, total), total)
        copier.catch_up()
        spec = info.index_spec
        backend = rebuild_backend(store, spec, info.embedding_dim, spec.kind_for(store.count()))

        with catalog._write_lock:
            inserted, deleted = copier.catch_up()
            if copier.failures and not drop_failed:
                listed = "; ".join(f"{item_id}: {message}" for item_id, message in list(copier.failures.values())[:10])
                raise CatalogError(
                    f"re-embedding {catalog.path} failed for {len(copier.failures)} items ({listed}); the "
                    "catalog is unchanged. Fix or delete those items, or pass drop_failed=True "
                    "(`--drop-failed`) to leave them out"
                )
            if deleted:
                backend.remove(np.asarray(deleted, dtype=np.int64))
            if inserted:
                backend.add(np.fromiter(inserted, dtype=np.int64, count=len(inserted)), np.stack(list(inserted.values())))
            store.begin()
            store.raise_fid_counter(old.store.fid_counter())
            store.commit()
            store.checkpoint()
            counter = store.fid_counter()
            count = store.count()
            write_snapshot(folder, backend, counter, count)
            fsync_dir(folder)
            crash_point("reembed_before_switch")
            catalog._write_pointer(number)
            switched = True
            crash_point("reembed_after_switch")
            dropped = _hashes_left_out(copier)
            generation = _Generation(number, folder, store, info, backend, count, counter, 0)
            with catalog._rw.write():
                catalog._gen = generation
                catalog.bundle = bundle
                catalog._version += 1
            old.store.close()
            shutil.rmtree(old.folder, ignore_errors=True)
            catalog._release_originals(generation, dropped)
    except BaseException:
        if not switched:
            store.close()
            shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.info(
        "re-embedded %d items of %s with model %s in %.1f s (%d left out)",
        count, catalog.path, bundle.model_id, time.perf_counter() - started, len(copier.failures),
    )


def _hashes_left_out(copier: _Copier) -> set[str]:
    """Content hashes of the items left out of the new generation."""
    rows = copier.old.rows_by_fids(list(copier.failures)) if copier.failures else {}
    return {row.content_hash for row in rows.values()}
