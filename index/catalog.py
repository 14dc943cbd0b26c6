"""The catalog: indexed images with their vectors, uncertainty, metadata and originals.

File layout of a catalog folder (see docs/index.md for the guarantees):

    catalog.json          {"format_version": 1, "generation": N}; replaced atomically
    lock                  flock held by the one writing process; contains its pid
    dirty                 exists while a writer has the catalog open; found at
                          start, it means the last writer crashed
    originals/ab/cdef...  original images by sha256, shared by all generations
    gen-00000N/           one generation: one model's embeddings
        catalog.sqlite3   metadata and vectors (WAL mode), the source of truth
        snapshot.json, vectors-*.faiss, vectors-*.ids.npz   FAISS snapshot

A re-embed writes generation N+1 beside N while N keeps serving, then
switches `catalog.json` to it.

Concurrency: writes (add, delete, re-embed's final step) are serialised by a
lock; searches share a readers-writer lock with the short step in which a
write commits to SQLite and applies the same change to the FAISS index, so a
search sees a batch entirely or not at all.

Other processes may open the catalog read-only beside the writing one. With
`follow=True` such a follower checks before each read whether the writer
committed (SQLite's data_version, and the inode of catalog.json), and if so
applies the new rows and the logged removals to its own vector index before
the read, again a whole batch at a time. A read that starts after a write
was acknowledged therefore sees it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.backend import BackendSearchParams, VectorBackend
from index.bundle import ModelBundle
from index.catalog_types import (
    Candidate,
    CatalogError,
    CatalogLockedError,
    Item,
    ItemInput,
    ItemNotFound,
    ItemOutcome,
    ModelMismatchError,
    Problem,
    SearchParams,
    VerifyReport,
)
from index.faiss_backend import FaissBackend, IndexSpec
from index.faults import crash_point
from index.fsync import fsync_dir
from index.imaging import ImageDecodeError, decode_image
from index.locks import ProcessLock, ProcessLockError, ReadWriteLock
from index.metadata import ItemRow, MetadataStore, NewRow
from index.originals import OriginalStore
from index.preprocess import PreprocessSpec, preprocess_image
from index.snapshot import (
    SnapshotError,
    SnapshotInfo,
    load_backend,
    rebuild_backend,
    write_snapshot,
)

if TYPE_CHECKING:
    from index.milvus_backend import MilvusConfig

__all__ = [
    "Candidate",
    "Catalog",
    "CatalogError",
    "CatalogLockedError",
    "IndexSpec",
    "Item",
    "ItemInput",
    "ItemNotFound",
    "ItemOutcome",
    "ModelMismatchError",
    "Problem",
    "SearchParams",
    "VerifyReport",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
POINTER = "catalog.json"
DB_NAME = "catalog.sqlite3"
MAX_ID_LENGTH = 512
MAX_K = 10_000

# A filter that matches at most this many items is served by exact scoring of
# their stored vectors instead of an ID selector inside FAISS: HNSW and IVF
# lose recall when most of the graph or of the probed lists is filtered out.
EXACT_FILTER_MAX = 4096

# Search results whose item (id, label, attributes, uncertainty) is kept in memory, per catalog.
# About 1 KB each with small attributes; a query then reads SQLite only for items not seen lately.
ITEM_CACHE_SIZE = 50_000

# Tolerance on ||embedding|| - 1 for vectors given to `add_embedded`.
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CatalogInfo:
    """Model facts and index spec of a generation, stored in its SQLite `meta` table."""

    model_id: str
    embedding_dim: int
    uncertainty_dim: int
    beta_form: str  # "sum" or "diff", from the bundle's metric
    index_spec: IndexSpec

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, spec: IndexSpec) -> "CatalogInfo":
        outputs = bundle.manifest.outputs
        return cls(
            model_id=bundle.model_id,
            embedding_dim=outputs.embedding_dim,
            uncertainty_dim=outputs.uncertainty_dim,
            beta_form=bundle.manifest.metric.beta_form,
            index_spec=spec,
        )

    def to_meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "embedding_dim": self.embedding_dim,
            "uncertainty_dim": self.uncertainty_dim,
            "beta_form": self.beta_form,
            "index_spec": self.index_spec.to_json(),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: Path) -> "CatalogInfo":
        try:
            if meta["format_version"] != FORMAT_VERSION:
                raise CatalogError(
                    f"{where} has catalog format {meta['format_version']}; this version reads {FORMAT_VERSION}"
                )
            return cls(
                model_id=meta["model_id"],
                embedding_dim=int(meta["embedding_dim"]),
                uncertainty_dim=int(meta["uncertainty_dim"]),
                beta_form=meta["beta_form"],
                index_spec=IndexSpec.from_json(meta["index_spec"]),
            )
        except KeyError as error:
            raise CatalogError(f"{where} is missing catalog metadata key {error}") from None


@dataclass
class _Generation:
    number: int
    folder: Path
    store: MetadataStore
    info: CatalogInfo
    backend: VectorBackend  # FaissBackend, or MilvusBackend when the catalog is opened with `milvus`
    count: int  # live items, kept equal to SQLite's count
    snapshot_counter: int  # SQLite fid counter of the last snapshot
    changes: int  # items added or removed since the last snapshot
    # fid -> (Item, ||u||^2, uncertainty vector or None) of items that searches returned. A fid's
    # row never changes (an upsert gets a new fid) and a deleted fid is never returned again, so
    # entries stay valid. At most ITEM_CACHE_SIZE entries are kept, and the oldest go first.
    item_cache: dict[int, tuple[Item, float, np.ndarray | None]] = field(default_factory=dict)
    # Serialises writes to item_cache: eviction iterates it, which a concurrent insert would break.
    item_cache_lock: threading.Lock = field(default_factory=threading.Lock)
    # Followers: the store's (fid counter, removed seq) that the vector index reflects, and the
    # data_version seen when they were read.
    follow_marks: tuple[int, int] = (0, 0)
    data_version: int = -1


@dataclass
class _Prepared:
    """An item ready to commit: validated, embedded, its image still in memory."""

    position: int  # index in the caller's input list
    id: str
    label: str | None
    attributes_json: str
    image: bytes
    media_type: str | None
    embedding: np.ndarray  # float32 (d,)
    uncertainty: float  # ||u||^2
    uncertainty_vector: np.ndarray | None  # float32 (du,)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _generation_folder(root: Path, number: int) -> Path:
    return root / f"gen-{number:06d}"


def _validate_item_fields(item_id: Any, label: Any, attributes: Any) -> tuple[str, str] | str:
    """Validate an item's fields; return the attributes as JSON text, or (reason, message) when one is invalid."""
    if not isinstance(item_id, str) or not item_id:
        return ("invalid_id", f"item id must be a non-empty string, got {item_id!r}")
    if len(item_id) > MAX_ID_LENGTH:
        return ("invalid_id", f"item id is {len(item_id)} characters long; the maximum is {MAX_ID_LENGTH}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        return ("invalid_id", f"item id {item_id!r} contains a control character")
    if label is not None and not isinstance(label, str):
        return ("invalid_label", f"label must be a string or None, got {type(label).__name__}")
    if not isinstance(attributes, Mapping) or not all(isinstance(key, str) for key in attributes):
        return ("invalid_attributes", "attributes must be a JSON object with string keys")
    try:
        return json.dumps(dict(attributes), allow_nan=False, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        return ("invalid_attributes", f"attributes are not JSON-serialisable: {error}")


def _decode_for_model(data: bytes, spec: PreprocessSpec) -> tuple[np.ndarray, str | None] | ImageDecodeError:
    """Model input uint8 (size, size, 3) and media type, or the decode error."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        return ImageDecodeError("not_an_image", f"image must be bytes, got {type(data).__name__}")
    try:
        decoded = decode_image(bytes(data), draft_size=spec.resize)
    except ImageDecodeError as error:
        return error
    return preprocess_image(decoded.image, spec), Image.MIME.get(decoded.source_format)


def _sniff_media_type(data: bytes) -> str | None | ImageDecodeError:
    """Media type from the image header, without decoding pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        return ImageDecodeError("empty", "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(str(image.format))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return ImageDecodeError("not_an_image", "the bytes are not an image in a known format")


class Catalog:
    """A catalog folder opened for searching and, unless read-only, writing.

    Open with `Catalog.open`; use as a context manager or call `close`.
    All public methods are thread-safe.
    """

    def __init__(self) -> None:  # use Catalog.open
        self.path: Path
        self.read_only: bool
        self.bundle: ModelBundle | None
        self.snapshot_every: int | None
        self.durability: str
        self.milvus: MilvusConfig | None = None
        self._gen: _Generation
        self._originals: OriginalStore
        self._process_lock: ProcessLock | None = None
        self._write_lock = threading.RLock()
        self._rw = ReadWriteLock()
        self._version = 0  # increases with every committed change; keys the filter cache
        self._filter_cache: dict[tuple[str, int], np.ndarray] = {}
        self._filter_lock = threading.Lock()
        self._decode_pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.follow = False
        self._follow_lock = threading.Lock()  # one refresh at a time; reads wait for it
        self._pointer_state: tuple[int, int] | None = None  # (inode, mtime ns) of catalog.json
        self._retired_stores: list[MetadataStore] = []  # of generations replaced under a follower; closed at close()
        self._skipped_generation: int | None = None

    # opening ------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        bundle: ModelBundle | None,
        *,
        index_spec: IndexSpec | None = None,
        create: bool = True,
        read_only: bool = False,
        snapshot_every: int | None = None,
        durability: str = "full",
        milvus: MilvusConfig | None = None,
        follow: bool = False,
    ) -> "Catalog":
        """Open (or create) the catalog in folder `path`.

        Args:
            bundle: the model that embeds queries and new items. Required to
                create a catalog. None opens an existing catalog with the model
                it was embedded with (for `reembed`, `stats`, `verify`).
            index_spec: index kind and parameters. For an existing catalog, a
                spec different from the stored one rebuilds the vector index.
            create: create the catalog when the folder has none.
            read_only: open without the writer lock, for inspection beside a
                running writer; the vectors are those committed at open time.
            follow: with read_only, keep up with the writing process: each
                read first applies the changes it committed (see the module doc).
            snapshot_every: write a FAISS snapshot after this many changes;
                None = max(10,000, a quarter of the catalog).
            durability: "full": an acknowledged write survives a power cut
                (originals and SQLite are fsynced). "process": it survives a
                crash or kill of the process but not of the machine; faster
                on slow disks.
            milvus: keep the vectors in this Milvus collection instead of a
                FAISS index on local disk (`index.milvus_backend`). SQLite
                stays the source of truth: the collection is made to match it
                on open, and `index_spec` is ignored (the config's index is used).

        Raises:
            ModelMismatchError: the catalog was embedded by another model.
            CatalogLockedError: another process has it open for writing.
            CatalogError: no catalog at `path` and `create` is False, or the
                catalog's files are unusable.
        """
        if durability not in ("full", "process"):
            raise ValueError(f"durability must be 'full' or 'process', got {durability!r}")
        if follow and not read_only:
            raise ValueError("follow=True needs read_only=True: the writing process has every change already")
        catalog = cls()
        catalog.follow = follow
        catalog.durability = durability
        catalog.path = Path(path)
        catalog.read_only = read_only
        catalog.bundle = bundle
        catalog.snapshot_every = snapshot_every
        catalog.milvus = milvus
        try:
            catalog._open(bundle, index_spec, create)
        except BaseException:
            catalog._release_process_lock()
            raise
        return catalog

    def _open(self, bundle: ModelBundle | None, index_spec: IndexSpec | None, create: bool) -> None:
        root = self.path
        pointer = root / POINTER
        if not pointer.exists():
            if not create or self.read_only:
                raise CatalogError(f"no catalog at {root} ({POINTER} not found); build one with `idml-index build`")
            if bundle is None:
                raise CatalogError(f"creating the catalog {root} needs a model bundle")
            root.mkdir(parents=True, exist_ok=True)

        if not self.read_only:
            self._process_lock = ProcessLock(root / "lock")
            try:
                self._process_lock.acquire()
            except ProcessLockError as error:
                raise CatalogLockedError(
                    f"catalog {root} is open for writing in another process ({error}); stop that "
                    "process, send the change to it, or open this one with read_only=True"
                ) from None

        self._originals = OriginalStore(root / "originals")
        if not pointer.exists():
            assert bundle is not None  # checked above
            self._create_generation_one(bundle, index_spec or IndexSpec())

        number = self._read_pointer()
        folder = _generation_folder(root, number)
        if not (folder / DB_NAME).is_file():
            raise CatalogError(f"catalog {root} points to generation {number}, but {folder / DB_NAME} is missing")
        store = MetadataStore(folder / DB_NAME, read_only=self.read_only, synchronous=self._synchronous)
        try:
            info = CatalogInfo.from_meta(store.get_meta(), folder / DB_NAME)
            if bundle is not None:
                self._check_bundle(bundle, info)
            if index_spec is not None and index_spec != info.index_spec and not self.read_only:
                logger.info("index spec changed from %s to %s; the vector index will be rebuilt", info.index_spec, index_spec)
                info = CatalogInfo(**{**info.__dict__, "index_spec": index_spec})
                store.set_meta({"index_spec": index_spec.to_json()})
            if not self.read_only:
                self._recover(number, store)
            started = time.perf_counter()
            self._pointer_state = self._pointer_stat()
            self._gen, snapshot = self._load_generation(number, folder, store, info)
        except BaseException:
            store.close()
            raise
        logger.info(
            "opened catalog %s: %d items, %s index, model %s, %.2f s",
            root, self._gen.count, self._gen.backend.kind, info.model_id, time.perf_counter() - started,
        )
        if not self.read_only and (snapshot is None or self._gen.changes):
            self._save_snapshot()

    def _load_generation(
        self, number: int, folder: Path, store: MetadataStore, info: CatalogInfo
    ) -> tuple[_Generation, SnapshotInfo | None]:
        """Load the vector index of a generation whose store is open; return it and the snapshot it started from."""
        # Read before the snapshot: a commit in between then shows as a change at the next read.
        data_version = store.data_version() if self.follow else -1
        # A follower reads the store in one snapshot, so its index matches the marks exactly.
        with store.read_snapshot() if self.follow else contextlib.nullcontext():
            marks = store.change_marks() if self.follow else (0, 0)
            if self.milvus is None:
                backend, snapshot, replayed = load_backend(folder, store, info.index_spec, info.embedding_dim)
                if self.follow and snapshot is not None and snapshot.fid_counter > marks[0]:
                    # The writer saved this snapshot after the read transaction began, so it contains rows
                    # this view lacks. Replay "removed" them (HNSW keeps tombstones), and the next refresh
                    # would add them a second time. Build from the view instead.
                    logger.info("the snapshot of %s is newer than this process's view; rebuilding from SQLite", folder)
                    backend = rebuild_backend(store, info.index_spec, info.embedding_dim, backend.kind)
            else:
                backend, replayed = self._open_milvus(store, number, info)
                snapshot = None
            count = store.count()
        generation = _Generation(
            number=number,
            folder=folder,
            store=store,
            info=info,
            backend=backend,
            count=count,
            snapshot_counter=snapshot.fid_counter if snapshot else -1,
            changes=replayed,
            follow_marks=marks,
            data_version=data_version,
        )
        return generation, snapshot

    def _open_milvus(self, store: MetadataStore, number: int, info: CatalogInfo) -> tuple[VectorBackend, int]:
        from index.milvus_backend import open_catalog_backend

        assert self.milvus is not None
        return open_catalog_backend(
            self.milvus,
            store,
            generation=number,
            dimension=info.embedding_dim,
            uncertainty_dim=info.uncertainty_dim if info.beta_form == "diff" else None,
            read_only=self.read_only,
        )

    def _rebuild_backend(self, gen: _Generation, kind: str) -> VectorBackend:
        """Build the generation's vector index again from SQLite."""
        if self.milvus is None:
            return rebuild_backend(gen.store, gen.info.index_spec, gen.info.embedding_dim, kind)
        from index.milvus_backend import rebuild_catalog_backend

        return rebuild_catalog_backend(gen.backend, gen.store)

    def _create_generation_one(self, bundle: ModelBundle, spec: IndexSpec) -> None:
        folder = _generation_folder(self.path, 1)
        if folder.exists():
            shutil.rmtree(folder)  # left by a crash before catalog.json was written
        folder.mkdir(parents=True)
        store = MetadataStore(folder / DB_NAME)
        try:
            store.set_meta({**CatalogInfo.from_bundle(bundle, spec).to_meta(), "created_at": _utc_now()})
        finally:
            store.close()
        fsync_dir(folder)
        self._write_pointer(1)
        logger.info("created catalog %s for model %s", self.path, bundle.model_id)

    def _check_bundle(self, bundle: ModelBundle, info: CatalogInfo) -> None:
        if bundle.model_id != info.model_id:
            raise ModelMismatchError(
                f"catalog {self.path} was embedded with model {info.model_id}, but bundle "
                f"{bundle.path} is model {bundle.model_id}; re-embed the catalog with "
                f"`idml-index reembed --index {self.path} --bundle {bundle.path}`, or open it "
                f"with the bundle of model {info.model_id}"
            )
        outputs = bundle.manifest.outputs
        if (outputs.embedding_dim, outputs.uncertainty_dim) != (info.embedding_dim, info.uncertainty_dim):
            raise CatalogError(
                f"bundle {bundle.path} has embedding/uncertainty dimensions "
                f"{outputs.embedding_dim}/{outputs.uncertainty_dim}, the catalog "
                f"{info.embedding_dim}/{info.uncertainty_dim}"
            )

    def _read_pointer(self) -> int:
        pointer = self.path / POINTER
        try:
            record = json.loads(pointer.read_text(encoding="utf-8"))
            number = int(record["generation"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CatalogError(f"{pointer} is unreadable: {error}") from None
        if record.get("format_version") != FORMAT_VERSION:
            raise CatalogError(
                f"{pointer} has format_version {record.get('format_version')}; this version reads {FORMAT_VERSION}"
            )
        return number

    def _write_pointer(self, number: int) -> None:
        temporary = self.path / f"{POINTER}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"format_version": FORMAT_VERSION, "generation": number}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path / POINTER)
        fsync_dir(self.path)

    def _recover(self, number: int, store: MetadataStore) -> None:
        """Remove what a crashed writer left: other generations, temporary files, unreferenced originals."""
        for folder in self.path.glob("gen-*"):
            if folder.is_dir() and folder != _generation_folder(self.path, number):
                logger.info("removing %s, left by an unfinished re-embed or a finished one's cleanup", folder)
                shutil.rmtree(folder)
        self._originals.clear_tmp()
        dirty = self.path / "dirty"
        if dirty.exists():
            referenced = store.content_hashes()
            orphans = [digest for digest in self._originals.iter_hashes() if digest not in referenced]
            for digest in orphans:
                self._originals.remove(digest)
            logger.warning(
                "catalog %s was not closed cleanly; removed %d unreferenced originals", self.path, len(orphans)
            )
        else:
            dirty.touch()
            fsync_dir(self.path)

    @property
    def _synchronous(self) -> str:
        return "FULL" if self.durability == "full" else "NORMAL"

    # properties -----------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._gen.info.model_id

    @property
    def info(self) -> CatalogInfo:
        return self._gen.info

    @property
    def index_kind(self) -> str:
        return self._gen.backend.kind

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # adding -------------------------------------------------------------

    def add_images(
        self,
        items: Sequence[ItemInput],
        embedder: Any,
        *,
        progress: Callable[[int, int], None] | None = None,
        batch_size: int = 32,
    ) -> list[ItemOutcome]:
        """Decode, embed and add images; an existing id is replaced (upsert).

        One outcome per input, in input order. An image that fails to decode,
        or an invalid id, label or attributes, gives an "error" outcome and
        never fails the rest. Each batch of `batch_size` images is durable when
        its outcomes are reported to `progress(done, total)`, and all are when
        this returns. The next batch is decoded on worker threads while the
        current one is embedded, and the previous one is committed.

        Raises:
            ModelMismatchError: `embedder` runs another model than the catalog's.
            CatalogError: the catalog is read-only or closed, or a write failed.
        """
        self._check_writable()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        model_id = embedder.bundle.model_id
        self._check_model(model_id, "the embedder")
        spec = embedder.bundle.preprocess
        total = len(items)
        outcomes: list[ItemOutcome | None] = [None] * total
        starts = list(range(0, total, batch_size))
        pool = self._decoder_pool()

        def submit(start: int) -> list[Future]:
            return [pool.submit(_decode_for_model, item.image, spec) for item in items[start : start + batch_size]]

        def commit(end: int, prepared: list[_Prepared]) -> tuple[int, list[_Prepared], list[ItemOutcome]]:
            return end, prepared, self._commit(prepared, model_id) if prepared else []

        def finish(job: Future) -> None:
            end, prepared, committed = job.result()
            for entry, outcome in zip(prepared, committed):
                outcomes[entry.position] = outcome
            if progress is not None:
                progress(end, total)

        # Batch n is committed on its own thread while batch n + 1 is embedded: storing originals
        # and SQLite's fsyncs wait on the disk, not on the CPU. One commit at a time, in order.
        with ThreadPoolExecutor(1, thread_name_prefix="idml-commit") as committer:
            committing: Future | None = None
            try:
                pending = submit(starts[0]) if starts else []
                for step, start in enumerate(starts):
                    futures = pending
                    pending = submit(starts[step + 1]) if step + 1 < len(starts) else []
                    prepared: list[_Prepared] = []
                    arrays: list[np.ndarray] = []
                    for offset, future in enumerate(futures):
                        position = start + offset
                        item = items[position]
                        checked = _validate_item_fields(item.id, item.label, item.attributes)
                        decoded = future.result()
                        if isinstance(checked, tuple):
                            outcomes[position] = ItemOutcome(str(item.id), "error", reason=checked[0], error=checked[1])
                            continue
                        if isinstance(decoded, ImageDecodeError):
                            outcomes[position] = ItemOutcome(item.id, "error", reason=decoded.reason, error=str(decoded))
                            continue
                        array, media_type = decoded
                        arrays.append(array)
                        prepared.append(
                            _Prepared(position, item.id, item.label, checked, bytes(item.image), media_type,
                                      np.empty(0, np.float32), 0.0, None)
                        )
                    if prepared:
                        embedded = embedder.embed(np.stack(arrays))
                        scalars = embedded.uncertainty_scalar
                        for row, entry in enumerate(prepared):
                            entry.embedding = embedded.embedding[row]
                            entry.uncertainty = float(scalars[row])
                            entry.uncertainty_vector = embedded.uncertainty[row]
                    if committing is not None:
                        finish(committing)
                    committing = committer.submit(commit, min(start + batch_size, total), prepared)
                if committing is not None:
                    finish(committing)
                    committing = None
            finally:
                if committing is not None:  # an error above: let the batch in flight end before leaving
                    committing.exception()
        return [outcome for outcome in outcomes if outcome is not None]

    def add_embedded(
        self,
        ids: Sequence[str],
        embeddings: np.ndarray,
        uncertainties: np.ndarray,
        *,
        labels: Sequence[str | None] | None = None,
        attributes: Sequence[dict] | None = None,
        images: Sequence[bytes],
        model_id: str | None = None,
    ) -> list[ItemOutcome]:
        """Add items embedded elsewhere; an existing id is replaced (upsert).

        Args:
            ids: n user ids.
            embeddings: float32 (n, d), L2-normalised, from the catalog's model.
            uncertainties: float32 (n, du) uncertainty embeddings, or (n,)
                scalars ||u||^2 when the metric's beta_form is "sum".
            labels, attributes: n values each, or None.
            images: n encoded original images, stored content-addressed.
            model_id: the model that computed the embeddings; checked when given.

        An item with an invalid id, label, attributes, image or a non-finite or
        non-normalised embedding gets an "error" outcome; the others are added.

        Raises:
            ValueError: arrays or lists whose shapes or lengths do not match.
            ModelMismatchError: `model_id` is not the catalog's model.
        """
        self._check_writable()
        info = self._gen.info
        if model_id is not None:
            self._check_model(model_id, "the embeddings")
        total = len(ids)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        uncertainties = np.asarray(uncertainties, dtype=np.float32)
        if embeddings.shape != (total, info.embedding_dim):
            raise ValueError(f"embeddings must have shape ({total}, {info.embedding_dim}), got {embeddings.shape}")
        if uncertainties.shape == (total,):
            if info.beta_form == "diff":
                raise ValueError("this catalog's metric uses beta_form 'diff' and needs uncertainty embeddings (n, du)")
        elif uncertainties.shape != (total, info.uncertainty_dim):
            raise ValueError(
                f"uncertainties must have shape ({total}, {info.uncertainty_dim}) or ({total},), got {uncertainties.shape}"
            )
        labels = list(labels) if labels is not None else [None] * total
        attributes = list(attributes) if attributes is not None else [{}] * total
        for name, values in (("labels", labels), ("attributes", attributes), ("images", images)):
            if len(values) != total:
                raise ValueError(f"{name} has {len(values)} entries, ids has {total}")

        outcomes: list[ItemOutcome | None] = [None] * total
        prepared: list[_Prepared] = []
        for position in range(total):
            item_id = ids[position]
            checked = _validate_item_fields(item_id, labels[position], attributes[position])
            if isinstance(checked, tuple):
                outcomes[position] = ItemOutcome(str(item_id), "error", reason=checked[0], error=checked[1])
                continue
            problem = self._embedding_problem(embeddings[position], uncertainties[position])
            if problem:
                outcomes[position] = ItemOutcome(item_id, "error", reason="invalid_embedding", error=problem)
                continue
            image = images[position]
            media_type = _sniff_media_type(bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else b"")
            if isinstance(media_type, ImageDecodeError):
                outcomes[position] = ItemOutcome(item_id, "error", reason=media_type.reason, error=str(media_type))
                continue
            if uncertainties.ndim == 2:
                vector = uncertainties[position]
                scalar = float(np.dot(vector, vector))
            else:
                vector, scalar = None, float(uncertainties[position])
            prepared.append(
                _Prepared(position, item_id, labels[position], checked, bytes(image), media_type,
                          embeddings[position], scalar, vector)
            )
        if prepared:
            for entry, outcome in zip(prepared, self._commit(prepared, model_id or info.model_id)):
                outcomes[entry.position] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    @staticmethod
    def _embedding_problem(embedding: np.ndarray, uncertainty: np.ndarray) -> str | None:
        if not np.all(np.isfinite(embedding)) or not np.all(np.isfinite(uncertainty)):
            return "the embedding or uncertainty contains NaN or infinity"
        norm = float(np.linalg.norm(embedding))
        if abs(norm - 1.0) > NORM_TOLERANCE:
            return f"the embedding has norm {norm:.6f}; embeddings must be L2-normalised"
        if uncertainty.ndim == 0 and uncertainty < 0:
            return f"the uncertainty scalar ||u||^2 is negative ({float(uncertainty)})"
        return None

    def _commit(self, prepared: list[_Prepared], model_id: str) -> list[ItemOutcome]:
        """Store originals, commit the rows in one transaction and apply them to the index."""
        with self._write_lock:
            self._check_writable()
            gen = self._gen
            self._check_model(model_id, "the embeddings")
            keep_vector = gen.info.beta_form == "diff"
            stored = self._originals.put_many([entry.image for entry in prepared], sync=self.durability == "full")
            hashes = [digest for digest, _ in stored]
            written = [digest for digest, created in stored if created]
            crash_point("originals_written")

            outcomes: list[ItemOutcome] = []
            added: dict[int, np.ndarray] = {}
            removed: list[int] = []
            released: set[str] = set()
            now = _utc_now()
            store = gen.store
            try:
                store.begin()
                for entry, digest in zip(prepared, hashes):
                    existing = store.find_for_write(entry.id)
                    created_at = now
                    if existing is not None:
                        old_fid, old_hash, created_at = existing
                        store.delete_fid(old_fid)
                        released.add(old_hash)
                        if old_fid in added:  # the same id twice in one batch
                            del added[old_fid]
                        else:
                            removed.append(old_fid)
                    fid = store.insert(
                        NewRow(
                            id=entry.id,
                            label=entry.label,
                            attributes_json=entry.attributes_json,
                            content_hash=digest,
                            media_type=entry.media_type,
                            image_bytes=len(entry.image),
                            model_id=gen.info.model_id,
                            created_at=created_at,
                            updated_at=now,
                            embedding=entry.embedding,
                            uncertainty=entry.uncertainty,
                            uncertainty_vector=entry.uncertainty_vector if keep_vector else None,
                        )
                    )
                    added[fid] = entry.embedding
                    outcomes.append(ItemOutcome(entry.id, "replaced" if existing is not None else "added"))
                crash_point("before_commit")
                self._commit_and_apply(gen, added, removed)
            except BaseException:
                store.rollback()
                for digest in written:
                    if not store.is_referenced(digest):
                        self._originals.remove(digest)
                raise
            crash_point("after_commit")
            self._release_originals(gen, released)
            self._after_write(gen, len(added) + len(removed))
            return outcomes

    def _commit_and_apply(self, gen: _Generation, added: dict[int, np.ndarray], removed: list[int]) -> None:
        """COMMIT the open transaction and make the index match it, with searches paused."""
        with self._rw.write():
            gen.store.commit()
            try:
                if removed:
                    gen.backend.remove(np.asarray(removed, dtype=np.int64))
                if added:
                    fids = np.fromiter(added.keys(), dtype=np.int64, count=len(added))
                    gen.backend.add(fids, np.stack(list(added.values())))
            except Exception:
                # SQLite has the change; rebuild the index from it so the two agree again.
                logger.exception("applying a committed change to the vector index failed; rebuilding it")
                gen.backend = self._rebuild_backend(gen, gen.backend.kind)
            gen.count = gen.count + len(added) - len(removed)
            self._version += 1

    def _release_originals(self, gen: _Generation, digests: set[str]) -> None:
        for digest in digests:
            if not gen.store.is_referenced(digest):
                self._originals.remove(digest)

    def _after_write(self, gen: _Generation, changes: int) -> None:
        """Rebuild the index when its kind should change or HNSW has too many tombstones; snapshot when due."""
        gen.changes += changes
        kind = gen.info.index_spec.kind_for(gen.count, gen.backend.kind)
        # A Milvus collection keeps the index type of its config and compacts itself.
        if self.milvus is None and (kind != gen.backend.kind or gen.backend.needs_compaction()):
            logger.info("rebuilding the vector index as %s for %d items", kind, gen.count)
            backend = rebuild_backend(gen.store, gen.info.index_spec, gen.info.embedding_dim, kind)
            with self._rw.write():
                gen.backend = backend
            self._save_snapshot()
            return
        threshold = self.snapshot_every or max(10_000, gen.count // 4)
        if gen.changes >= threshold:
            self._save_snapshot()

    # deleting -----------------------------------------------------------

    def delete(self, ids: Sequence[str]) -> int:
        """Delete items by user id; unknown ids are ignored. Returns how many were deleted."""
        self._check_writable()
        if isinstance(ids, str):
            raise ValueError("delete takes a sequence of ids, not a single string")
        with self._write_lock:
            self._check_writable()
            gen = self._gen
            removed: list[int] = []
            released: set[str] = set()
            try:
                gen.store.begin()
                for item_id in dict.fromkeys(ids):
                    existing = gen.store.find_for_write(item_id) if isinstance(item_id, str) else None
                    if existing is None:
                        continue
                    gen.store.delete_fid(existing[0])
                    removed.append(existing[0])
                    released.add(existing[1])
                self._commit_and_apply(gen, {}, removed)
            except BaseException:
                gen.store.rollback()
                raise
            self._release_originals(gen, released)
            self._after_write(gen, len(removed))
            return len(removed)

    # reading ------------------------------------------------------------

    def get(self, id: str) -> Item | None:
        """Return the item with user id `id`, or None."""
        self._check_open()
        self._keep_up()
        row = self._gen.store.get_by_id(id)
        return None if row is None else _item_of(row)

    def require(self, id: str) -> Item:
        """Return the item with user id `id`. Raises ItemNotFound."""
        item = self.get(id)
        if item is None:
            raise ItemNotFound(f"no item with id {id!r} in catalog {self.path}")
        return item

    def list_items(self, offset: int = 0, limit: int = 100) -> list[Item]:
        """Items ordered by user id, `limit` of them from position `offset`."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be non-negative, got {offset} and {limit}")
        self._check_open()
        self._keep_up()
        return [_item_of(row) for row in self._gen.store.list_rows(offset, limit)]

    def count(self, *, fresh: bool = True) -> int:
        """Return the number of items. `fresh=False` skips a follower's refresh (for health checks on an event loop)."""
        if fresh:
            self._keep_up()
        return self._gen.count

    def original_path(self, id: str) -> Path | None:
        """Path of the item's original image file, or None when there is no such item."""
        self._check_open()
        self._keep_up()
        row = self._gen.store.get_by_id(id)
        if row is None:
            return None
        path = self._originals.path_for(row.content_hash)
        return path if path.is_file() else None

    # searching ----------------------------------------------------------

    def search(
        self,
        embeddings: np.ndarray,
        k: int,
        *,
        params: SearchParams | None = None,
        filter: Mapping[str, Any] | None = None,
        model_id: str | None = None,
    ) -> list[list[Candidate]]:
        """Find the k most similar items for each query embedding.

        Args:
            embeddings: float32 (nq, d) L2-normalised query embeddings.
            k: results per query, 1..10,000.
            params: nprobe / ef_search for this call only.
            filter: equality on top-level attributes, and on the label with
                key "label"; all keys must match.
            model_id: the model that embedded the queries; checked when given,
                so a query embedded before a re-embed cannot be searched after it.

        Returns:
            nq lists of candidates by decreasing cosine similarity, each with
            at most k entries (fewer when fewer items match).

        Raises:
            ValueError: bad shapes, k or filter.
            ModelMismatchError: `model_id` is not the catalog's model.
        """
        queries = np.asarray(embeddings, dtype=np.float32)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        params = params or SearchParams()
        self._keep_up()
        for name in ("nprobe", "ef_search"):
            value = getattr(params, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"search parameter {name} must be a positive integer, got {value!r}")
        with self._rw.read():
            self._check_open()
            gen = self._gen
            dimension = gen.info.embedding_dim
            if queries.ndim != 2 or queries.shape[1] != dimension:
                raise ValueError(f"query embeddings must have shape (nq, {dimension}), got {queries.shape}")
            if not np.all(np.isfinite(queries)):
                raise ValueError("query embeddings contain NaN or infinity")
            if model_id is not None:
                self._check_model(model_id, "the query embeddings")
            if queries.shape[0] == 0:
                return []
            allowed = self._filter_fids(gen, filter) if filter else None
            if gen.count == 0 or (allowed is not None and len(allowed) == 0):
                return [[] for _ in range(queries.shape[0])]
            if allowed is not None and len(allowed) <= EXACT_FILTER_MAX:
                fids, vectors = gen.store.vectors_by_fids(allowed, dimension)
                scores = queries @ vectors.T
                order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
                candidate_fids = fids[order]
                parts = self._candidate_parts(gen, candidate_fids)
                return [self._candidates(parts, candidate_fids[q], scores[q, order[q]], k) for q in range(len(queries))]

            quantised = gen.backend.kind in ("ivf_sq8", "ivf_pq")
            fetch = min(k * gen.info.index_spec.refine_factor if quantised else k, gen.backend.ntotal)
            backend_params = BackendSearchParams(nprobe=params.nprobe, ef_search=params.ef_search)
            scores, fids = gen.backend.search(queries, max(fetch, 1), params=backend_params, **self._backend_filter(filter, allowed))
            results = []
            if quantised:  # rescore the approximate candidates exactly
                rows = gen.store.rows_by_fids(np.unique(fids[fids >= 0]), with_embedding=True)
                with_vector = gen.info.beta_form == "diff"
                parts = {fid: _parts_of(row, with_vector) for fid, row in rows.items()}
                for q in range(len(queries)):
                    exact = np.array(
                        [rows[f].embedding @ queries[q] if f in rows else -np.inf for f in fids[q].tolist()],
                        dtype=np.float32,
                    )
                    order = np.argsort(-exact, kind="stable")
                    results.append(self._candidates(parts, fids[q][order], exact[order], k))
            else:
                parts = self._candidate_parts(gen, fids)
                for q in range(len(queries)):
                    results.append(self._candidates(parts, fids[q], scores[q], k))
            return results

    def _candidate_parts(self, gen: _Generation, fids: np.ndarray) -> dict[int, tuple[Item, float, np.ndarray | None]]:
        """Look up the stored parts of a result for each valid fid in `fids`, in the cache or else in SQLite."""
        cache = gen.item_cache
        parts: dict[int, tuple[Item, float, np.ndarray | None]] = {}
        missing = []
        for fid in np.unique(fids[fids >= 0]).tolist():
            entry = cache.get(fid)
            if entry is None:
                missing.append(fid)
            else:
                parts[fid] = entry
        if missing:
            with_vector = gen.info.beta_form == "diff"
            fetched = {fid: _parts_of(row, with_vector) for fid, row in gen.store.rows_by_fids(missing).items()}
            parts.update(fetched)
            with gen.item_cache_lock:
                cache.update(fetched)
                while len(cache) > ITEM_CACHE_SIZE:
                    del cache[next(iter(cache))]
        return parts

    def _candidates(
        self,
        parts: dict[int, tuple[Item, float, np.ndarray | None]],
        fids: np.ndarray,
        scores: np.ndarray,
        k: int,
    ) -> list[Candidate]:
        candidates: list[Candidate] = []
        for fid, score in zip(fids.tolist(), scores.tolist()):
            if fid < 0 or not math.isfinite(score):
                continue
            entry = parts.get(fid)
            if entry is None:
                if self.follow:
                    # The writer deleted it after this follower's index was last refreshed; the next read applies it.
                    logger.debug("vector %d of catalog %s was deleted by the writer meanwhile", fid, self.path)
                else:
                    logger.error("vector %d of catalog %s has no metadata row; run `idml-index verify`", fid, self.path)
                continue
            item, uncertainty, vector = entry
            candidates.append(
                Candidate(item=item, similarity=float(score), uncertainty=uncertainty, uncertainty_vector=vector)
            )
            if len(candidates) == k:
                break
        return candidates

    def _backend_filter(self, filter: Mapping[str, Any] | None, allowed: np.ndarray | None) -> dict[str, Any]:
        """Restrict a backend search: a Milvus expression when Milvus can state the filter, else the matching fids."""
        if allowed is not None and self.milvus is not None:
            from index.milvus_backend import milvus_filter

            expression = milvus_filter(filter or {})
            if expression:
                return {"filter": expression}
        return {"allowed_ids": allowed}

    def _filter_fids(self, gen: _Generation, filter: Mapping[str, Any]) -> np.ndarray:
        try:
            key = (json.dumps(dict(filter), sort_keys=True), self._version)
        except (TypeError, ValueError):
            raise ValueError(f"filter {filter!r} is not a JSON object of attribute values") from None
        with self._filter_lock:
            cached = self._filter_cache.get(key)
        if cached is not None:
            return cached
        fids = gen.store.filter_fids(filter)
        with self._filter_lock:
            if len(self._filter_cache) >= 64 or any(version != self._version for _, version in self._filter_cache):
                self._filter_cache = {k: v for k, v in self._filter_cache.items() if k[1] == self._version}
                if len(self._filter_cache) >= 64:
                    self._filter_cache.clear()
            self._filter_cache[key] = fids
        return fids

    # following a writer ---------------------------------------------------

    def refresh(self) -> bool:
        """Apply what the writing process committed since the last refresh; return whether anything changed.

        Reads of a catalog opened with `follow=True` call this first. It runs
        one refresh at a time; concurrent reads wait for it, so none of them
        sees a write older than the refresh that was running when it started.

        Raises:
            CatalogError: the catalog was not opened with `follow=True`, or is closed.
        """
        if not self.follow:
            raise CatalogError(f"catalog {self.path} was not opened with follow=True, so it has nothing to refresh")
        with self._follow_lock:
            self._check_open()
            pointer = self._pointer_stat()
            if pointer != self._pointer_state:
                number = self._read_pointer()
                # The new state is kept only once the switch succeeded or was skipped, so a failed one is retried.
                switched = number != self._gen.number and self._switch_generation(number)
                self._pointer_state = pointer
                if switched:
                    return True
            gen = self._gen
            # Read before the changes: a commit in between then shows as a change at the next refresh.
            version = gen.store.data_version()
            if version == gen.data_version:
                return False
            changes = gen.store.changes_since(*gen.follow_marks, gen.info.embedding_dim)
            if self.milvus is not None:
                # The writer updates the shared collection itself; only the counts are this process's.
                with self._rw.write():
                    gen.count = changes.count
                    gen.follow_marks = (changes.fid_counter, changes.seq)
                    gen.data_version = version
                    self._version += 1
                return True
            if not changes.complete:
                logger.info("the removal log of catalog %s no longer reaches this process's state; rebuilding", self.path)
                self._rebuild_follower(gen, version, gen.backend.kind)
                return True
            try:
                with self._rw.write():
                    if len(changes.removed):
                        gen.backend.remove(changes.removed)
                    if len(changes.added):
                        gen.backend.add(changes.added, changes.vectors)
                    gen.count = changes.count
                    gen.follow_marks = (changes.fid_counter, changes.seq)
                    gen.data_version = version
                    self._version += 1
            except Exception:
                logger.exception("applying the writer's changes to the vector index of %s failed; rebuilding it", self.path)
                self._rebuild_follower(gen, version, gen.backend.kind)
                return True
            kind = gen.info.index_spec.kind_for(gen.count, gen.backend.kind)
            if kind != gen.backend.kind or gen.backend.needs_compaction():
                self._rebuild_follower(gen, version, kind)
            return True

    def _keep_up(self) -> None:
        """Refresh a following catalog before a read. A failed refresh is logged, and the read sees the last state."""
        if not self.follow:
            return
        try:
            self.refresh()
        except CatalogError:
            raise
        except Exception:
            logger.exception("refreshing catalog %s from its writer failed; serving the last state read", self.path)

    def _rebuild_follower(self, gen: _Generation, version: int, kind: str) -> None:
        """Build a follower's vector index again from one snapshot of SQLite, and swap it in.

        NOTE: it runs under the follow lock, so this process's reads wait for the whole rebuild
        (minutes for a large HNSW index), as they would for the writer's own rebuild.
        """
        started = time.perf_counter()
        with gen.store.read_snapshot():
            marks = gen.store.change_marks()
            backend = self._rebuild_backend(gen, kind)
            count = gen.store.count()
        with self._rw.write():
            gen.backend = backend
            gen.count = count
            gen.follow_marks = marks
            gen.data_version = version
            self._version += 1
        logger.info("rebuilt the %s index of %d items of %s in %.2f s", kind, count, self.path, time.perf_counter() - started)

    def _switch_generation(self, number: int) -> bool:
        """Serve generation `number`, which a re-embed made current, if this process's bundle embedded it."""
        folder = _generation_folder(self.path, number)
        store = MetadataStore(folder / DB_NAME, read_only=True)
        try:
            info = CatalogInfo.from_meta(store.get_meta(), folder / DB_NAME)
            if self.bundle is not None and info.model_id != self.bundle.model_id:
                if self._skipped_generation != number:
                    logger.error(
                        "catalog %s now serves generation %d, embedded with model %s, but this process embeds "
                        "queries with model %s; it keeps serving generation %d until it is restarted with the "
                        "bundle of model %s",
                        self.path, number, info.model_id, self.bundle.model_id, self._gen.number, info.model_id,
                    )
                    self._skipped_generation = number
                store.close()
                return False
            generation, _ = self._load_generation(number, folder, store, info)
        except BaseException:
            store.close()
            raise
        with self._rw.write():
            # Reads outside the readers-writer lock (get, list) may still use the old store, so it
            # is closed with the catalog, not here.
            self._retired_stores.append(self._gen.store)
            self._gen = generation
            self._version += 1
        logger.info("catalog %s switched to generation %d with %d items", self.path, number, generation.count)
        return True

    def _pointer_stat(self) -> tuple[int, int] | None:
        """Return (inode, mtime in ns) of catalog.json; a re-embed replaces the file, so both change."""
        try:
            status = os.stat(self.path / POINTER)
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns

    # maintenance ----------------------------------------------------------

    def save(self) -> None:
        """Write a FAISS snapshot now, so the next open replays nothing."""
        self._check_writable()
        with self._write_lock:
            self._save_snapshot()

    def _save_snapshot(self) -> None:
        with self._write_lock:
            gen = self._gen
            counter = gen.store.fid_counter()
            if self.milvus is not None:
                gen.backend.flush()  # Milvus persists its own segments; no snapshot files
            else:
                # Searches may run meanwhile: writing an index only reads it.
                write_snapshot(gen.folder, gen.backend, counter, gen.count)
            gen.store.prune_removed()
            gen.snapshot_counter = counter
            gen.changes = 0

    def stats(self) -> dict[str, Any]:
        """Counts, model, index kind and parameters, and sizes on disk."""
        self._keep_up()
        gen = self._gen
        files, size = gen.store.stored_bytes()
        try:
            snapshot = SnapshotInfo.read(gen.folder)
        except SnapshotError:
            snapshot = None
        sqlite_bytes = sum(p.stat().st_size for p in gen.folder.glob(f"{DB_NAME}*") if p.is_file())
        return {
            "path": str(self.path),
            "items": gen.count,
            "model_id": gen.info.model_id,
            "embedding_dim": gen.info.embedding_dim,
            "uncertainty_dim": gen.info.uncertainty_dim,
            "beta_form": gen.info.beta_form,
            "generation": gen.number,
            "index": {
                "kind": gen.backend.kind,
                "spec": gen.info.index_spec.to_json(),
                "ntotal": gen.backend.ntotal,
                "tombstones": gen.backend.tombstone_count,
                "snapshot_bytes": (snapshot.index_bytes + snapshot.ids_bytes) if snapshot else 0,
                "changes_since_snapshot": gen.changes,
            },
            "originals": {"files": files, "bytes": size},
            "sqlite_bytes": sqlite_bytes,
            "read_only": self.read_only,
            "following": self.follow,
        }

    def verify(self, *, check_content: bool = True, sample: int = 256) -> VerifyReport:
        """Check that vectors, uncertainty, metadata and originals agree.

        Reads every row; `check_content` also rehashes every original file.
        For a flat index, `sample` stored vectors are compared with the index.
        Writes wait while it runs; searches do not.
        """
        with self._write_lock:
            self._check_open()
            gen = self._gen
            info = gen.info
            problems: list[Problem] = []
            referenced: set[str] = set()
            live: list[int] = []
            fid_to_id: dict[int, str] = {}
            for row in gen.store.iter_rows_with_embeddings():
                live.append(row.fid)
                fid_to_id[row.fid] = row.id
                referenced.add(row.content_hash)
                problems.extend(self._row_problems(row, info))
                if check_content:
                    problem = self._originals.verify(row.content_hash)
                elif not self._originals.exists(row.content_hash):
                    problem = f"original {self._originals.path_for(row.content_hash)} is missing"
                else:
                    problem = None
                if problem:
                    problems.append(Problem("missing_original" if "missing" in problem else "corrupt_original", problem, row.id))

            sql_fids = np.asarray(sorted(live), dtype=np.int64)
            index_fids = np.sort(gen.backend.ids())
            for fid in np.setdiff1d(sql_fids, index_fids).tolist():
                problems.append(Problem("missing_vector", f"item (fid {fid}) has no vector in the index", fid_to_id[fid]))
            for fid in np.setdiff1d(index_fids, sql_fids).tolist():
                problems.append(Problem("stray_vector", f"the index holds vector {fid}, which has no metadata row"))
            if len(np.unique(index_fids)) != len(index_fids):
                problems.append(Problem("duplicate_vector", "the index holds some ids more than once"))
            if gen.count != len(sql_fids):
                problems.append(Problem("count", f"cached count {gen.count} differs from SQLite's {len(sql_fids)}"))
            if gen.backend.kind == "flat" and len(sql_fids):
                problems.extend(self._vector_problems(gen, sql_fids, fid_to_id, sample))

            stored = 0
            for digest in self._originals.iter_hashes():
                stored += 1
                if digest not in referenced:
                    problems.append(Problem("orphan_original", f"original {digest} is referenced by no item"))
            try:
                SnapshotInfo.read(gen.folder)
            except SnapshotError as error:
                problems.append(Problem("snapshot", str(error)))
            return VerifyReport(items=len(sql_fids), vectors=gen.backend.count(), originals=stored, problems=problems)

    @staticmethod
    def _row_problems(row: ItemRow, info: CatalogInfo) -> list[Problem]:
        problems = []
        embedding = row.embedding
        if embedding is None or embedding.shape != (info.embedding_dim,):
            shape = None if embedding is None else embedding.shape
            return [Problem("bad_embedding", f"embedding has shape {shape}, expected ({info.embedding_dim},)", row.id)]
        if not np.all(np.isfinite(embedding)) or abs(float(np.linalg.norm(embedding)) - 1.0) > NORM_TOLERANCE:
            problems.append(Problem("bad_embedding", "embedding is not finite and L2-normalised", row.id))
        if not math.isfinite(row.uncertainty) or row.uncertainty < 0:
            problems.append(Problem("bad_uncertainty", f"uncertainty {row.uncertainty} is not a finite ||u||^2", row.id))
        if info.beta_form == "diff":
            vector = row.uncertainty_vector
            if vector is None or vector.shape != (info.uncertainty_dim,):
                problems.append(Problem("bad_uncertainty", "beta_form 'diff' needs the uncertainty vector", row.id))
            elif not math.isclose(float(np.dot(vector, vector)), row.uncertainty, rel_tol=1e-4, abs_tol=1e-6):
                problems.append(Problem("bad_uncertainty", "uncertainty scalar differs from ||u||^2 of the vector", row.id))
        if row.model_id != info.model_id:
            problems.append(Problem("model", f"embedded by model {row.model_id}, catalog model {info.model_id}", row.id))
        return problems

    @staticmethod
    def _vector_problems(
        gen: _Generation, fids: np.ndarray, fid_to_id: dict[int, str], sample: int
    ) -> list[Problem]:
        rng = np.random.default_rng(0)
        chosen = fids if len(fids) <= sample else rng.choice(fids, size=sample, replace=False)
        chosen_fids, vectors = gen.store.vectors_by_fids(chosen, gen.info.embedding_dim)
        problems = []
        for fid, vector in zip(chosen_fids.tolist(), vectors):
            scores, found = gen.backend.search(vector[None, :], 1, allowed_ids=np.asarray([fid], dtype=np.int64))
            if found[0, 0] != fid or abs(float(scores[0, 0]) - float(vector @ vector)) > 1e-4:
                problems.append(Problem("vector_mismatch", "the index vector differs from the stored embedding", fid_to_id[fid]))
        return problems

    # re-embedding -------------------------------------------------------

    def reembed(
        self,
        bundle: ModelBundle,
        embedder: Any,
        *,
        progress: Callable[[int, int], None] | None = None,
        batch_size: int = 32,
        drop_failed: bool = False,
    ) -> None:
        """Embed every original again with `bundle` and switch the catalog to it.

        The new generation is built beside the current one, which keeps
        serving searches and accepting writes; writes made meanwhile are
        carried over. The switch is one atomic rename of `catalog.json`.
        After it, queries must be embedded with the new bundle.

        Raises:
            CatalogError: some originals are missing or undecodable and
                `drop_failed` is False (the catalog is left unchanged), or the
                catalog is read-only.
        """
        from index.reembed import reembed_catalog

        self._check_writable()
        if self.milvus is not None:
            # NOTE: re-embedding builds the new generation with FAISS only (index.reembed).
            raise CatalogError(f"re-embedding catalog {self.path} with the Milvus backend is not supported yet")
        if embedder.bundle.model_id != bundle.model_id:
            raise ModelMismatchError(
                f"the embedder runs model {embedder.bundle.model_id}, the bundle is model {bundle.model_id}"
            )
        reembed_catalog(self, bundle, embedder, progress=progress, batch_size=batch_size, drop_failed=drop_failed)

    # closing ------------------------------------------------------------

    def close(self) -> None:
        """Write a final snapshot when changes are pending, and release the catalog."""
        with self._write_lock:
            if self._closed:
                return
            try:
                if not self.read_only and self._gen.changes:
                    self._save_snapshot()
            finally:
                with self._rw.write():
                    self._closed = True
                    self._gen.store.close()
                    for retired in self._retired_stores:
                        retired.close()
                    if self.milvus is not None:
                        self._gen.backend.close()
                if self._decode_pool is not None:
                    self._decode_pool.shutdown(wait=True)
                if not self.read_only:
                    (self.path / "dirty").unlink(missing_ok=True)
                self._release_process_lock()

    # helpers ------------------------------------------------------------

    def _release_process_lock(self) -> None:
        if self._process_lock is not None:
            self._process_lock.release()
            self._process_lock = None

    def _check_open(self) -> None:
        if self._closed:
            raise CatalogError(f"catalog {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise CatalogError(f"catalog {self.path} is open read-only")

    def _check_model(self, model_id: str, what: str) -> None:
        if model_id != self._gen.info.model_id:
            raise ModelMismatchError(
                f"{what} come from model {model_id}, but catalog {self.path} is embedded with model "
                f"{self._gen.info.model_id}; embed with the catalog's bundle, or re-embed the catalog with "
                f"`idml-index reembed --index {self.path} --bundle NEW_BUNDLE`"
            )

    def _decoder_pool(self) -> ThreadPoolExecutor:
        with self._write_lock:
            if self._decode_pool is None:
                workers = max(1, min(4, os.cpu_count() or 1))
                self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="idml-decode")
            return self._decode_pool


def _parts_of(row: ItemRow, with_vector: bool) -> tuple[Item, float, np.ndarray | None]:
    return _item_of(row), row.uncertainty, row.uncertainty_vector if with_vector else None


def _item_of(row: ItemRow) -> Item:
    return Item(
        id=row.id,
        label=row.label,
        attributes=row.attributes,
        content_hash=row.content_hash,
        model_id=row.model_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        uncertainty=row.uncertainty,
        media_type=row.media_type,
    )
