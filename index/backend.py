"""The vector backend interface of the catalog.

The catalog keeps metadata, vectors and uncertainty in SQLite and hands the
semantic embeddings to a `VectorBackend` for nearest-neighbour search. The
backend only stores (vector id, vector) pairs; ids are int64 and chosen by the
catalog. FAISS on local disk (`index.faiss_backend.FaissBackend`) is the
embedded default; a distributed vector database can implement the same class.

Thread contract: `search`, `count`, `ids` and `save` may run from many threads
at once; `add` and `remove` are called by one writer at a time and never while
a search runs (the catalog holds a readers-writer lock around them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Vector id returned by `search` in empty result slots.
MISSING_ID = -1


@dataclass(frozen=True)
class BackendSearchParams:
    """Per-call search parameters; fields a backend does not use are ignored."""

    nprobe: int | None = None  # IVF: number of inverted lists visited
    ef_search: int | None = None  # HNSW: size of the candidate list while searching


class VectorBackend(ABC):
    """Inner-product nearest-neighbour search over L2-normalised vectors with int64 ids."""

    @property
    @abstractmethod
    def dimension(self) -> int:
        """Vector dimension d."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Vectors physically stored, including removed ones a backend keeps as tombstones."""

    @abstractmethod
    def count(self) -> int:
        """Live vectors: `ntotal` minus tombstones."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors float32 (n, d) under new ids int64 (n,); an id must not be live already."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove ids int64 (n,); unknown ids are ignored. Returns how many were live."""

    @abstractmethod
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        params: BackendSearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Find the k vectors with the largest inner product for each query.

        Args:
            queries: float32 (nq, d).
            k: results per query, >= 1.
            params: per-call search parameters; the shared index is never changed.
            allowed_ids: int64 (m,); when given, only these ids may be returned.

        Returns:
            (scores, ids): float32 (nq, k) inner products in decreasing order, and
            int64 (nq, k) ids. Empty slots have id `MISSING_ID` and score -inf.
        """

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Live ids, int64 (count,), in no particular order."""

    @abstractmethod
    def save(self, folder: Path, name: str) -> list[Path]:
        """Write the index into `folder` under files starting with `name`; returns the files.

        Each file is written completely and fsynced before this returns, so the
        caller can publish it with an atomic rename of its own manifest.
        """
