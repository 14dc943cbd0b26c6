"""Milvus as the vector backend, through `pymilvus` (optional extra `milvus`).

One Milvus collection holds one catalog generation. Each entity is an item:

    id                  INT64 primary key: the catalog's fid
    embedding           FLOAT_VECTOR (d), metric IP, the searched field
    uncertainty         FLOAT, ||u||^2
    uncertainty_vector  FLOAT_VECTOR (du), only when the metric's beta_form is "diff"
    has_label, label    BOOL and VARCHAR ("" when has_label is false)
    attributes          JSON

Label and attributes live in Milvus so that a filter runs inside Milvus as a
boolean expression (`milvus_filter`); SQLite stays the source of truth, and
`open_catalog_backend` makes the collection match it when a catalog opens.

`MilvusConfig.uri` is either a Milvus server ("http://host:19530") or a local
file ending in ".db", which pymilvus opens with Milvus Lite (package
`milvus-lite`) in a child process.

NOTE: Milvus Lite 2.5.1 (the C++ engine, checked here with pymilvus 2.6.17)
differs from a Milvus server in ways the tests rely on: its local mode builds
only FLAT, IVF_FLAT and AUTOINDEX indexes (HNSW and IVF_SQ8 are rejected with
"local mode only support FLAT IVF_FLAT AUTOINDEX"), it rejects nullable
fields, and its JSON expressions have no `is null` or `exists`. Below
100,000 rows it searches IVF_FLAT as FLAT, and at 100,000 rows its recall did
not change between nprobe 1 and 1024, so per-call nprobe is verified on Lite
only as far as the request. Milvus Lite
3.x is a separate engine written in Python over FAISS; its `==` on JSON
values treats true as equal to 1, which Milvus does not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from index.backend import MISSING_ID, BackendSearchParams, VectorBackend

logger = logging.getLogger(__name__)

INDEX_TYPES: tuple[str, ...] = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")

# The catalog's name for each Milvus index type (`Catalog.index_kind`, stats).
KIND_OF_INDEX_TYPE = {"FLAT": "flat", "HNSW": "hnsw", "IVF_FLAT": "ivf_flat", "IVF_SQ8": "ivf_sq8", "AUTOINDEX": "autoindex"}

# Milvus rejects a search or query whose limit exceeds 16384 (its default quota.topK).
MAX_TOPK = 16384
# Rows per insert request; keeps each gRPC message well under Milvus's 64 MiB default.
INSERT_BATCH = 2000
# Ids per delete or `id in [...]` expression.
ID_BATCH = 8192
LABEL_MAX_LENGTH = 65535
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

ENV_PREFIX = "IDML_MILVUS_"


class MilvusBackendError(RuntimeError):
    """Milvus rejected a request, or the collection does not fit the catalog."""


@dataclass(frozen=True)
class MilvusConfig:
    """Where the Milvus collection is and how it is indexed and searched."""

    uri: str  # "http://host:19530", "https://...", or a local Milvus Lite file "path/milvus.db"
    token: str = ""  # "user:password" or an API key; never logged
    db_name: str = ""  # database; "" = the server's default
    collection: str = "idml_catalog"  # collection name; a catalog appends "_g<generation>"
    index_type: str = "HNSW"  # FLAT | HNSW | IVF_FLAT | IVF_SQ8 | AUTOINDEX
    hnsw_m: int = 32  # HNSW: neighbours per node
    ef_construction: int = 80  # HNSW: candidate list size while inserting
    ef_search: int = 64  # HNSW: default candidate list size while searching (raised to k when smaller)
    nlist: int = 1024  # IVF: cluster count
    nprobe: int = 16  # IVF: default clusters visited per query
    consistency_level: str = "Strong"  # "Strong" makes each write visible to the next search
    timeout_s: float = 30.0  # per request

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError("Milvus uri must be a non-empty string such as http://milvus:19530 or ./milvus.db")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"Milvus index_type {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        if not _COLLECTION_NAME.match(self.collection) or len(self.collection) > 240:
            raise ValueError(
                f"Milvus collection name {self.collection!r} is invalid: use letters, digits and "
                "underscores, starting with a letter or underscore, at most 240 characters"
            )
        for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"Milvus config {name} must be at least 1, got {getattr(self, name)}")
        if self.nprobe > self.nlist:
            raise ValueError(f"Milvus config nprobe ({self.nprobe}) must not exceed nlist ({self.nlist})")
        if self.consistency_level not in ("Strong", "Bounded", "Session", "Eventually"):
            raise ValueError(
                f"Milvus consistency_level {self.consistency_level!r} is not one of Strong, Bounded, Session, Eventually"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"Milvus timeout_s must be positive, got {self.timeout_s}")

    @property
    def is_local(self) -> bool:
        """True for a Milvus Lite file, which pymilvus starts in a child process."""
        return self.uri.endswith(".db") and not re.match(r"^[a-z]+://", self.uri)

    def index_params(self) -> dict[str, Any]:
        """Build parameters of the embedding index, as Milvus's `create_index` takes them."""
        if self.index_type == "HNSW":
            return {"M": self.hnsw_m, "efConstruction": self.ef_construction}
        if self.index_type in ("IVF_FLAT", "IVF_SQ8"):
            return {"nlist": self.nlist}
        return {}

    def describe(self) -> dict[str, Any]:
        """The fields that decide the collection's layout and index; the token and uri are left out."""
        return {"index_type": self.index_type, "params": self.index_params()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "MilvusConfig | None":
        """Read `IDML_MILVUS_URI`, `IDML_MILVUS_TOKEN`, ... (field names in capitals); None when the uri is unset."""
        environ = os.environ if environ is None else environ
        uri = environ.get(ENV_PREFIX + "URI", "")
        if not uri:
            return None
        values: dict[str, Any] = {"uri": uri}
        for field in fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if field.name == "uri" or raw is None or raw == "":
                continue
            if field.name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be an integer, got {raw!r}") from None
            elif field.name == "timeout_s":
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}TIMEOUT_S must be a number of seconds, got {raw!r}") from None
            else:
                values[field.name] = raw
        return cls(**values)


def milvus_filter(filter: Mapping[str, Any]) -> str | None:
    """Translate the catalog's equality filter into a Milvus boolean expression.

    Matches what `index.metadata.filter_sql` selects: "label" compares the
    label, other keys compare top-level attributes, and a string never equals
    a number. Returns None when Milvus cannot express the filter exactly: a
    None value for an attribute (Milvus 2.5 JSON expressions have no null
    test), or a key with a backslash. The caller then passes the matching ids
    from SQLite instead.

    Raises:
        ValueError: a value of a type the catalog's filters do not accept.
    """
    clauses = []
    for key, value in filter.items():
        if not isinstance(key, str) or not key or '"' in key or "\\" in key or any(ord(ch) < 32 for ch in key):
            return None
        if key == "label":
            if value is None:
                clauses.append("has_label == false")
            elif isinstance(value, str):
                clauses.append(f"(has_label == true and label == {_string_literal(value)})")
            else:
                raise ValueError(f"filter value for 'label' must be a string or None, got {value!r}")
            continue
        field = f'attributes["{key}"]'
        if value is None:
            return None
        if isinstance(value, bool):
            clauses.append(f"{field} == {'true' if value else 'false'}")
        elif isinstance(value, int):
            clauses.append(f"{field} == {value}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"filter value for {key!r} must be finite, got {value!r}")
            clauses.append(f"{field} == {value!r}")
        elif isinstance(value, str):
            clauses.append(f"{field} == {_string_literal(value)}")
        else:
            raise ValueError(
                f"filter value for {key!r} must be a string, number, boolean or None, got {type(value).__name__}"
            )
    return " and ".join(clauses) if clauses else ""


def _string_literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Rows for new entities: fid -> (uncertainty ||u||^2, uncertainty vector or None, label or None, attributes).
RowFields = tuple[float, "np.ndarray | None", "str | None", Mapping[str, Any]]
RowSource = Callable[[np.ndarray], Mapping[int, RowFields]]


class MilvusBackend(VectorBackend):
    """A Milvus collection as a `VectorBackend`; see the module docstring for the entity fields.

    Make one with `open`. `add(ids, vectors)` takes the other fields of each
    entity from `row_source` (the catalog reads them from SQLite); without one
    an entity has uncertainty 0, no label and no attributes. `add_items` and
    `upsert` take them explicitly.

    Thread contract: as `VectorBackend`; pymilvus clients are thread-safe.
    """

    def __init__(
        self,
        client: Any,
        config: MilvusConfig,
        name: str,
        dimension: int,
        uncertainty_dim: int | None,
        row_source: RowSource | None,
    ):
        self._client = client
        self.config = config
        self.name = name
        self._dimension = dimension
        self.uncertainty_dim = uncertainty_dim
        self.row_source = row_source
        self.kind = KIND_OF_INDEX_TYPE[config.index_type]
        self.tombstone_count = 0  # Milvus compacts deleted entities itself
        self._closed = False
        self._lock = threading.Lock()

    # construction -----------------------------------------------------

    @classmethod
    def open(
        cls,
        config: MilvusConfig,
        name: str,
        dimension: int,
        *,
        uncertainty_dim: int | None = None,
        row_source: RowSource | None = None,
        create: bool = True,
    ) -> "MilvusBackend":
        """Connect to `config.uri` and open collection `name`, creating it when missing.

        Args:
            dimension: d of the semantic embedding.
            uncertainty_dim: du when the uncertainty vector is stored (beta_form "diff"), else None.
            create: create the collection when it does not exist.

        Raises:
            MilvusBackendError: the existing collection has another layout or
                index (rebuild it with `recreate`), Milvus rejected the index
                type, or the collection is missing and `create` is False.
            ImportError: pymilvus is not installed.
        """
        if not _COLLECTION_NAME.match(name):
            raise ValueError(f"Milvus collection name {name!r} is invalid")
        client = connect(config)
        backend = cls(client, config, name, dimension, uncertainty_dim, row_source)
        try:
            if client.has_collection(name, timeout=config.timeout_s):
                backend._check_layout()
                client.load_collection(name, timeout=config.timeout_s)
            elif create:
                backend._create()
            else:
                raise MilvusBackendError(f"Milvus collection {name!r} does not exist at {_redacted(config.uri)}")
        except BaseException:
            backend.close()
            raise
        return backend

    def recreate(self) -> None:
        """Drop the collection and create it empty with the current config."""
        self._client.drop_collection(self.name, timeout=self.config.timeout_s)
        self._create()

    def drop(self) -> None:
        """Drop the collection and its data."""
        self._client.drop_collection(self.name, timeout=self.config.timeout_s)

    def _layout(self) -> dict[str, Any]:
        return {
            "format": 1,
            "dimension": self._dimension,
            "uncertainty_dim": self.uncertainty_dim,
            **self.config.describe(),
        }

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient
        from pymilvus.exceptions import MilvusException

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=json.dumps(self._layout()))
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self._dimension)
        schema.add_field("uncertainty", DataType.FLOAT)
        if self.uncertainty_dim is not None:
            schema.add_field("uncertainty_vector", DataType.FLOAT_VECTOR, dim=self.uncertainty_dim)
        schema.add_field("has_label", DataType.BOOL)
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_MAX_LENGTH)
        schema.add_field("attributes", DataType.JSON)

        index_params = self._client.prepare_index_params()
        index_params.add_index(
            field_name="embedding",
            index_type=self.config.index_type,
            metric_type="IP",
            params=self.config.index_params(),
        )
        if self.uncertainty_dim is not None:
            # Milvus loads a collection only when every vector field has an index.
            index_params.add_index(field_name="uncertainty_vector", index_type="FLAT", metric_type="L2")
        try:
            self._client.create_collection(
                self.name,
                schema=schema,
                index_params=index_params,
                consistency_level=self.config.consistency_level,
                timeout=self.config.timeout_s,
            )
        except MilvusException as error:
            if self._client.has_collection(self.name):
                self._client.drop_collection(self.name)
            raise MilvusBackendError(
                f"Milvus rejected collection {self.name!r} with index {self.config.index_type} "
                f"{self.config.index_params()}: {error.message}"
            ) from None
        logger.info("created Milvus collection %s (%s, d=%d)", self.name, self.config.index_type, self._dimension)

    def _check_layout(self) -> None:
        described = self._client.describe_collection(self.name, timeout=self.config.timeout_s)
        try:
            stored = json.loads(described.get("description") or "{}")
        except ValueError:
            stored = {}
        if stored != self._layout():
            raise MilvusBackendError(
                f"Milvus collection {self.name!r} has layout {stored or 'unknown'}, expected {self._layout()}; "
                "rebuild it (a catalog does this from SQLite when it opens) or use another collection name"
            )

    # VectorBackend ------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def ntotal(self) -> int:
        return self.count()

    def count(self) -> int:
        rows = self._client.query(
            self.name,
            filter="",
            output_fields=["count(*)"],
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        return int(rows[0]["count(*)"])

    def needs_compaction(self) -> bool:
        return False

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check_batch(ids, vectors)
        if len(ids) == 0:
            return
        if self.row_source is None:
            rows: Mapping[int, RowFields] = {}
        else:
            rows = self.row_source(ids)
        self._write("insert", ids, vectors, [rows.get(int(i)) for i in ids.tolist()])

    def add_items(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        uncertainty: np.ndarray | None = None,
        uncertainty_vectors: np.ndarray | None = None,
        labels: Sequence[str | None] | None = None,
        attributes: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Add entities with their fields: uncertainty float32 (n,), uncertainty_vectors float32 (n, du)."""
        self._write("insert", *self._items(ids, vectors, uncertainty, uncertainty_vectors, labels, attributes))

    def upsert(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        uncertainty: np.ndarray | None = None,
        uncertainty_vectors: np.ndarray | None = None,
        labels: Sequence[str | None] | None = None,
        attributes: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Insert entities, replacing those whose id exists; fields as in `add_items`."""
        self._write("upsert", *self._items(ids, vectors, uncertainty, uncertainty_vectors, labels, attributes))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.ascontiguousarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        live = 0
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start : start + ID_BATCH].tolist()
            # Milvus's delete count includes ids that were never stored, so count the live ones first.
            live += len(self._query_ids(f"id in {chunk}", limit=len(chunk)))
            self._client.delete(self.name, ids=chunk, timeout=self.config.timeout_s)
        return live

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        params: BackendSearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
        filter: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `VectorBackend.search`; `filter` is a Milvus boolean expression (see `milvus_filter`), ANDed with `allowed_ids`."""
        queries = _as_matrix(queries, self._dimension)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > MAX_TOPK:
            raise ValueError(f"k must be at most {MAX_TOPK} for Milvus, got {k}")
        nq = queries.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        found = np.full((nq, k), MISSING_ID, dtype=np.int64)
        if nq == 0:
            return scores, found
        clauses = []
        if filter:
            clauses.append(f"({filter})")
        if allowed_ids is not None:
            allowed = np.unique(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            if len(allowed) == 0:
                return scores, found
            clauses.append(f"id in {allowed.tolist()}")
        results = self._client.search(
            self.name,
            data=list(queries),
            anns_field="embedding",
            limit=k,
            filter=" and ".join(clauses),
            search_params={"metric_type": "IP", "params": self._search_params(params or BackendSearchParams(), k)},
            output_fields=[],
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        for q, hits in enumerate(results):
            for slot, hit in enumerate(hits):
                found[q, slot] = int(hit["id"])
                scores[q, slot] = float(hit["distance"])
        return scores, found

    def ids(self) -> np.ndarray:
        count = self.count()
        found = self._query_ids("", limit=max(count, 1) if count <= MAX_TOPK else None)
        return np.sort(np.asarray(found, dtype=np.int64))

    def stored_ids(self) -> np.ndarray:
        return self.ids()

    def fields(self, ids: np.ndarray) -> dict[int, RowFields]:
        """Stored (uncertainty, uncertainty vector or None, label or None, attributes) by id; missing ids are left out."""
        ids = np.unique(np.ascontiguousarray(ids, dtype=np.int64))
        output = ["uncertainty", "has_label", "label", "attributes"]
        if self.uncertainty_dim is not None:
            output.append("uncertainty_vector")
        found: dict[int, RowFields] = {}
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start : start + ID_BATCH].tolist()
            rows = self._client.get(self.name, ids=chunk, output_fields=output, timeout=self.config.timeout_s)
            for row in rows:
                vector = row.get("uncertainty_vector")
                found[int(row["id"])] = (
                    float(row["uncertainty"]),
                    None if vector is None else np.asarray(vector, dtype=np.float32),
                    row["label"] if row["has_label"] else None,
                    dict(row["attributes"] or {}),
                )
        return found

    def flush(self) -> None:
        """Seal the buffered writes into persisted segments (Milvus `flush`)."""
        self._client.flush(self.name, timeout=self.config.timeout_s)

    def save(self, folder: Path, name: str) -> list[Path]:
        """Flush, then write `<name>.milvus.json` naming the collection and its entity count (no vectors)."""
        self.flush()
        path = Path(folder) / f"{name}.milvus.json"
        record = {"uri": _redacted(self.config.uri), "collection": self.name, "count": self.count(), **self._layout()}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        return [path]

    def close(self) -> None:
        """Close the client; for a Milvus Lite file also stop its server process, which releases the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.close()
        finally:
            if self.config.is_local:
                _release_local_server(self.config.uri)

    # helpers ------------------------------------------------------------

    def _search_params(self, params: BackendSearchParams, k: int) -> dict[str, Any]:
        if self.config.index_type == "HNSW":
            # Milvus rejects ef below the requested limit.
            return {"ef": max(int(params.ef_search or self.config.ef_search), k)}
        if self.config.index_type in ("IVF_FLAT", "IVF_SQ8"):
            return {"nprobe": min(int(params.nprobe or self.config.nprobe), self.config.nlist)}
        return {}

    def _check_batch(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = _as_matrix(vectors, self._dimension)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (vectors.shape[0],):
            raise ValueError(f"ids must have shape ({vectors.shape[0]},), got {ids.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique within a batch")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("vectors contain NaN or infinity")
        return ids, vectors

    def _items(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        uncertainty: np.ndarray | None,
        uncertainty_vectors: np.ndarray | None,
        labels: Sequence[str | None] | None,
        attributes: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[np.ndarray, np.ndarray, list[RowFields]]:
        ids, vectors = self._check_batch(ids, vectors)
        n = len(ids)
        if uncertainty is None:
            if uncertainty_vectors is not None:
                uncertainty = np.einsum("ij,ij->i", uncertainty_vectors, uncertainty_vectors)
            else:
                uncertainty = np.zeros(n, dtype=np.float32)
        uncertainty = np.asarray(uncertainty, dtype=np.float32)
        if uncertainty.shape != (n,):
            raise ValueError(f"uncertainty must have shape ({n},), got {uncertainty.shape}")
        if uncertainty_vectors is not None:
            if self.uncertainty_dim is None:
                raise ValueError("this collection stores no uncertainty vectors (beta_form 'sum'); pass uncertainty only")
            uncertainty_vectors = _as_matrix(uncertainty_vectors, self.uncertainty_dim)
            if uncertainty_vectors.shape[0] != n:
                raise ValueError(f"uncertainty_vectors must have {n} rows, got {uncertainty_vectors.shape[0]}")
        for name, values in (("labels", labels), ("attributes", attributes)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} must have {n} entries, got {len(values)}")
        rows = [
            (
                float(uncertainty[i]),
                None if uncertainty_vectors is None else uncertainty_vectors[i],
                None if labels is None else labels[i],
                {} if attributes is None else attributes[i],
            )
            for i in range(n)
        ]
        return ids, vectors, rows

    def _write(self, method: str, ids: np.ndarray, vectors: np.ndarray, rows: Sequence[RowFields | None]) -> None:
        if len(ids) == 0:
            return
        zero_vector = None if self.uncertainty_dim is None else np.zeros(self.uncertainty_dim, dtype=np.float32)
        entities = []
        for fid, vector, row in zip(ids.tolist(), vectors, rows):
            uncertainty, uncertainty_vector, label, attributes = row or (0.0, None, None, {})
            if label is not None and len(label.encode("utf-8")) > LABEL_MAX_LENGTH:
                raise ValueError(f"label of item {fid} is longer than Milvus's {LABEL_MAX_LENGTH} bytes")
            entity = {
                "id": fid,
                "embedding": vector,
                "uncertainty": float(uncertainty),
                "has_label": label is not None,
                "label": label or "",
                "attributes": dict(attributes),
            }
            if self.uncertainty_dim is not None:
                entity["uncertainty_vector"] = zero_vector if uncertainty_vector is None else np.asarray(
                    uncertainty_vector, dtype=np.float32
                )
            entities.append(entity)
        call = getattr(self._client, method)
        for start in range(0, len(entities), INSERT_BATCH):
            call(self.name, data=entities[start : start + INSERT_BATCH], timeout=self.config.timeout_s)

    def _query_ids(self, expression: str, limit: int | None) -> list[int]:
        if limit is not None and limit <= MAX_TOPK:
            rows = self._client.query(
                self.name,
                filter=expression or "id >= 0",
                output_fields=["id"],
                limit=limit,
                consistency_level=self.config.consistency_level,
                timeout=self.config.timeout_s,
            )
            return [int(row["id"]) for row in rows]
        # A query returns at most 16384 rows, so page through all ids with an iterator.
        iterator = self._client.query_iterator(
            self.name,
            batch_size=MAX_TOPK // 2,
            filter=expression or "id >= 0",
            output_fields=["id"],
            consistency_level=self.config.consistency_level,
            timeout=self.config.timeout_s,
        )
        found: list[int] = []
        try:
            while True:
                page = iterator.next()
                if not page:
                    return found
                found.extend(int(row["id"]) for row in page)
        finally:
            iterator.close()


def connect(config: MilvusConfig) -> Any:
    """A `pymilvus.MilvusClient` for `config`; a local ".db" uri starts Milvus Lite on that file."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ImportError(
            "the Milvus backend needs pymilvus: pip install 'idml-search[milvus]' "
            "(and milvus-lite for a local .db file)"
        ) from None
    uri = config.uri
    if config.is_local:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).resolve())
    logger.info("connecting to Milvus at %s", _redacted(uri))
    return MilvusClient(uri=uri, token=config.token, db_name=config.db_name, timeout=config.timeout_s)


def _release_local_server(uri: str) -> None:
    """Stop the Milvus Lite process that pymilvus started for `uri`, so the file can be reopened."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(Path(uri).resolve()))


def _redacted(uri: str) -> str:
    """The uri without user information (user:password@)."""
    return re.sub(r"//[^/@]*@", "//", uri)


def _as_matrix(vectors: np.ndarray, dimension: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise ValueError(f"expected float32 vectors of shape (n, {dimension}), got {vectors.shape}")
    return vectors


# catalog integration -------------------------------------------------------


def collection_name(config: MilvusConfig, generation: int) -> str:
    """The collection of catalog generation `generation`."""
    return f"{config.collection}_g{generation:06d}"


def open_catalog_backend(
    config: MilvusConfig,
    store: Any,
    *,
    generation: int,
    dimension: int,
    uncertainty_dim: int | None,
    read_only: bool,
) -> tuple[MilvusBackend, int]:
    """Open the generation's collection and make it match the SQLite `store` (an `index.metadata.MetadataStore`).

    Ids SQLite no longer has are deleted and rows Milvus lacks are inserted
    with their stored fields; a collection of another layout or index is
    rebuilt from SQLite. A read-only catalog changes nothing in Milvus.

    Returns:
        (backend, entities inserted plus deleted).
    """
    name = collection_name(config, generation)
    source = catalog_row_source(store)
    try:
        backend = MilvusBackend.open(
            config, name, dimension, uncertainty_dim=uncertainty_dim, row_source=source, create=not read_only
        )
    except MilvusBackendError as error:
        if read_only or "has layout" not in str(error):
            raise
        logger.warning("rebuilding Milvus collection %s from SQLite: %s", name, error)
        backend = MilvusBackend(connect(config), config, name, dimension, uncertainty_dim, source)
        backend.recreate()
    if read_only:
        return backend, 0
    live = store.all_fids()
    in_index = backend.ids()
    removed = np.setdiff1d(in_index, live)
    added = np.setdiff1d(live, in_index)
    if len(removed):
        backend.remove(removed)
    for start in range(0, len(added), 8192):
        fids, vectors = store.vectors_by_fids(added[start : start + 8192], dimension)
        backend.add(fids, vectors)
    if len(added) or len(removed):
        logger.info("Milvus collection %s: inserted %d and deleted %d entities to match SQLite", name, len(added), len(removed))
    return backend, int(len(added) + len(removed))


def rebuild_catalog_backend(backend: MilvusBackend, store: Any) -> MilvusBackend:
    """Drop the collection and insert every item of the SQLite `store` again."""
    backend.recreate()
    for fids, vectors in store.iter_vectors(8192):
        backend.add(fids, vectors)
    return backend


def catalog_row_source(store: Any) -> RowSource:
    """Read each fid's uncertainty, label and attributes from the catalog's committed SQLite rows."""

    def rows(fids: np.ndarray) -> dict[int, RowFields]:
        found = store.rows_by_fids(fids.tolist())
        return {
            fid: (row.uncertainty, row.uncertainty_vector, row.label, row.attributes) for fid, row in found.items()
        }

    return rows


__all__ = [
    "MilvusBackend",
    "MilvusBackendError",
    "MilvusConfig",
    "milvus_filter",
    "open_catalog_backend",
    "rebuild_catalog_backend",
]
