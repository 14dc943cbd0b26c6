"""FAISS on local disk: the embedded vector backend.

Index kinds (all inner product over L2-normalised vectors, so scores are
cosine similarities, approximate for the quantised kinds):

    flat     IndexIDMap(IndexFlatIP): exact; the default for small catalogs
    hnsw     IndexIDMap(IndexHNSWFlat): graph search; FAISS cannot remove
             vectors from HNSW, so removed ids become tombstones that every
             search excludes through an IDSelector until the next rebuild
    ivf_sq8  IndexIVFScalarQuantizer (8-bit): 4x smaller than flat
    ivf_pq   IndexIVFPQ: product quantisation, d/4 bytes per vector by default

The IVF kinds store the catalog's ids directly in their inverted lists; they
need training, so `IndexSpec.kind_for` keeps a catalog flat until it has
`ivf_min_items` vectors to train on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from index.backend import MISSING_ID, BackendSearchParams, VectorBackend
from index.fsync import fsync_file

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf_sq8", "ivf_pq"]
INDEX_KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf_sq8", "ivf_pq")
SPEC_KINDS: tuple[str, ...] = INDEX_KINDS + ("auto",)

# HNSW tombstones above this fraction of stored vectors trigger a rebuild.
MAX_TOMBSTONE_FRACTION = 0.2


@dataclass(frozen=True)
class IndexSpec:
    """Kind and parameters of the FAISS index a catalog builds, stored with the catalog."""

    kind: str = "auto"  # "flat" | "hnsw" | "ivf_sq8" | "ivf_pq" | "auto" (chosen by item count)
    hnsw_m: int = 32  # HNSW: neighbours per node
    ef_construction: int = 80  # HNSW: candidate list size while inserting
    ef_search: int = 64  # HNSW: default candidate list size while searching
    nlist: int | None = None  # IVF: inverted lists; None = 4 * sqrt(n) at training time
    nprobe: int = 16  # IVF: default lists visited per query
    pq_m: int | None = None  # IVF-PQ: sub-quantisers; None = d / 4 (or the nearest divisor of d)
    pq_nbits: int = 8  # IVF-PQ: bits per sub-quantiser code
    refine_factor: int = 4  # quantised kinds: candidates rescored exactly per requested result
    ivf_min_items: int = 1000  # IVF kinds stay flat until this many vectors exist to train on
    auto_flat_max: int = 50_000  # "auto": flat below this many items
    auto_hnsw_max: int = 5_000_000  # "auto": HNSW below this many items, IVF-PQ from here on

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {', '.join(SPEC_KINDS)}")
        positive = ("hnsw_m", "ef_construction", "ef_search", "nprobe", "pq_nbits", "refine_factor")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"index spec {name} must be at least 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"index spec nlist must be at least 1 or None, got {self.nlist}")
        if self.pq_m is not None and self.pq_m < 1:
            raise ValueError(f"index spec pq_m must be at least 1 or None, got {self.pq_m}")
        if self.pq_nbits > 16:
            raise ValueError(f"index spec pq_nbits must be at most 16, got {self.pq_nbits}")
        if self.ivf_min_items < 256:
            # FAISS needs at least 2**nbits training points for an 8-bit PQ.
            raise ValueError(f"index spec ivf_min_items must be at least 256, got {self.ivf_min_items}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "IndexSpec":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"index spec has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**record)

    def kind_for(self, count: int, current: str | None = None) -> str:
        """The index kind to use for `count` items.

        `current` is the kind in use; the answer never goes back from a
        searched-and-trained kind to flat when items are deleted, so a catalog
        does not rebuild back and forth around a threshold.
        """
        if self.kind == "auto":
            if count < self.auto_flat_max:
                wanted = "flat"
            elif count < self.auto_hnsw_max:
                wanted = "hnsw"
            else:
                wanted = "ivf_pq"
        else:
            wanted = self.kind
        if wanted.startswith("ivf") and count < self.ivf_min_items:
            wanted = "flat"
        if wanted == "flat" and current is not None and current != "flat":
            return current
        return wanted


def default_nlist(count: int) -> int:
    """IVF list count for `count` training vectors: 4 * sqrt(n), with >= 39 points per list."""
    nlist = int(round(4 * math.sqrt(max(count, 1))))
    return max(1, min(nlist, count // 39 if count >= 39 else 1, 65536))


def default_pq_m(dimension: int) -> int:
    """Sub-quantiser count for IVF-PQ: the divisor of d closest to d / 4."""
    target = max(1, dimension // 4)
    divisors = [m for m in range(1, dimension + 1) if dimension % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


class FaissBackend(VectorBackend):
    """A FAISS index of one kind; see the module docstring for the kinds.

    Make one with `create` (empty, trained if the kind needs it), `build`
    (create and add) or `load`.
    """

    def __init__(self, index: faiss.Index, kind: str, spec: IndexSpec):
        self._index = index
        self.kind = kind
        self.spec = spec
        self._tombstones: set[int] = set()
        self._tombstone_selector: faiss.IDSelector | None = None

    # construction -----------------------------------------------------

    @classmethod
    def create(
        cls,
        dimension: int,
        kind: str,
        spec: IndexSpec,
        training_vectors: np.ndarray | None = None,
    ) -> "FaissBackend":
        """An empty index of `kind`; IVF kinds are trained on float32 (n, d) `training_vectors`, n >= 256."""
        if kind == "flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dimension))
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dimension, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = spec.ef_construction
            hnsw.hnsw.efSearch = spec.ef_search
            index = faiss.IndexIDMap(hnsw)
        elif kind in ("ivf_sq8", "ivf_pq"):
            if training_vectors is None:
                raise ValueError(f"index kind {kind} needs training vectors")
            index = _trained_ivf(dimension, kind, spec, _as_matrix(training_vectors, dimension))
        else:
            raise ValueError(f"index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}")
        return cls(index, kind, spec)

    @classmethod
    def build(
        cls, dimension: int, kind: str, spec: IndexSpec, ids: np.ndarray, vectors: np.ndarray
    ) -> "FaissBackend":
        """Build an index of `kind` over vectors float32 (n, d) with ids int64 (n,).

        IVF kinds train on these vectors and need at least 256 of them.
        """
        vectors = _as_matrix(vectors, dimension)
        training = vectors if kind in ("ivf_sq8", "ivf_pq") else None
        backend = cls.create(dimension, kind, spec, training)
        backend.add(ids, vectors)
        return backend

    @classmethod
    def load(cls, path: Path, kind: str, spec: IndexSpec) -> "FaissBackend":
        """Read an index written by `save`. Raises RuntimeError from FAISS on a damaged file."""
        index = faiss.read_index(str(path))
        return cls(index, kind, spec)

    # VectorBackend ------------------------------------------------------

    @property
    def dimension(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def count(self) -> int:
        return self.ntotal - len(self._tombstones)

    def needs_compaction(self) -> bool:
        """True when tombstones are more than `MAX_TOMBSTONE_FRACTION` of stored vectors."""
        return self.ntotal > 0 and len(self._tombstones) > MAX_TOMBSTONE_FRACTION * self.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = _as_matrix(vectors, self.dimension)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (vectors.shape[0],):
            raise ValueError(f"ids must have shape ({vectors.shape[0]},), got {ids.shape}")
        if len(ids):
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        if self.kind == "hnsw":
            stored = ids[np.isin(ids, self._stored_ids())]
            fresh = {int(i) for i in stored} - self._tombstones
            self._tombstones.update(fresh)
            self._tombstone_selector = None
            return len(fresh)
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        params: BackendSearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_matrix(queries, self.dimension)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        params = params or BackendSearchParams()
        selector = self._selector(allowed_ids)
        if self.kind == "hnsw" and allowed_ids is not None and params.ef_search is None:
            params = BackendSearchParams(nprobe=params.nprobe, ef_search=self._filtered_ef(k, len(allowed_ids)))
        search_params = self._search_parameters(params, selector)
        scores, ids = self._index.search(queries, k, params=search_params)
        # FAISS fills empty slots with id -1 and the lowest float; report -inf.
        scores = np.where(ids == MISSING_ID, -np.inf, scores).astype(np.float32)
        return scores, ids

    def ids(self) -> np.ndarray:
        stored = self._stored_ids()
        if not self._tombstones:
            return stored
        dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
        return stored[~np.isin(stored, dead)]

    def stored_ids(self) -> np.ndarray:
        """Every id in the index file, tombstones included, int64 (ntotal,)."""
        return self._stored_ids()

    def save(self, folder: Path, name: str) -> list[Path]:
        path = Path(folder) / f"{name}.faiss"
        faiss.write_index(self._index, str(path))
        fsync_file(path)
        return [path]

    def memory_bytes(self) -> int:
        """Serialised size of the index, a close estimate of its memory footprint."""
        return int(faiss.serialize_index(self._index).nbytes)

    # helpers ------------------------------------------------------------

    def _stored_ids(self) -> np.ndarray:
        if self.kind in ("flat", "hnsw"):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        invlists = faiss.extract_index_ivf(self._index).invlists
        chunks = []
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                chunks.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
        if not chunks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(chunks).astype(np.int64, copy=False)

    def _selector(self, allowed_ids: np.ndarray | None) -> faiss.IDSelector | None:
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64)
            if self._tombstones:
                dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
                allowed = allowed[~np.isin(allowed, dead)]
            return faiss.IDSelectorBatch(allowed)
        if not self._tombstones:
            return None
        if self._tombstone_selector is None:
            dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            batch = faiss.IDSelectorBatch(dead)
            selector = faiss.IDSelectorNot(batch)
            selector.referenced_batch = batch  # keeps the inner selector alive
            self._tombstone_selector = selector
        return self._tombstone_selector

    def _filtered_ef(self, k: int, allowed: int) -> int:
        """efSearch for a search restricted to `allowed` ids.

        HNSW visits filtered-out nodes without keeping them, so a filter that
        keeps a fraction f of the vectors needs about 1/f times the candidate
        list to still fill k results. Capped at 4096 to bound the cost.
        """
        widening = max(1, self.ntotal // max(allowed, 1))
        return int(min(4096, max(self.spec.ef_search, k) * widening))

    def _search_parameters(
        self, params: BackendSearchParams, selector: faiss.IDSelector | None
    ) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            ef_search = params.ef_search or self.spec.ef_search
            return faiss.SearchParametersHNSW(efSearch=int(ef_search), sel=selector)
        if self.kind in ("ivf_sq8", "ivf_pq"):
            nprobe = params.nprobe or self.spec.nprobe
            return faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector)
        if selector is None:
            return None
        return faiss.SearchParameters(sel=selector)


def _trained_ivf(dimension: int, kind: str, spec: IndexSpec, vectors: np.ndarray) -> faiss.Index:
    count = vectors.shape[0]
    if count < 256:
        raise ValueError(f"index kind {kind} needs at least 256 training vectors, got {count}")
    nlist = spec.nlist or default_nlist(count)
    nlist = min(nlist, count)
    quantizer = faiss.IndexFlatIP(dimension)
    if kind == "ivf_sq8":
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dimension, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        pq_m = spec.pq_m or default_pq_m(dimension)
        if dimension % pq_m != 0:
            raise ValueError(f"index spec pq_m {pq_m} must divide the dimension {dimension}")
        index = faiss.IndexIVFPQ(
            quantizer, dimension, nlist, pq_m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT
        )
    index.own_fields = True
    quantizer.this.disown()  # the IVF index now owns and frees its quantizer
    # k-means on at most 256 points per list: more adds time, not quality.
    sample = vectors
    limit = max(256 * nlist, 2 ** spec.pq_nbits * 64 if kind == "ivf_pq" else 0)
    if count > limit:
        rows = np.random.default_rng(0).choice(count, size=limit, replace=False)
        sample = vectors[np.sort(rows)]
    logger.info("training %s on %d vectors (nlist=%d)", kind, sample.shape[0], nlist)
    index.train(sample)
    index.nprobe = spec.nprobe  # default only; searches pass their own nprobe
    return index


def _as_matrix(vectors: np.ndarray, dimension: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise ValueError(f"expected float32 vectors of shape (n, {dimension}), got {vectors.shape}")
    return vectors


