"""SQLite store of the catalog: the source of truth for metadata AND vectors.

One row per item contains the user id, label, JSON attributes, content hash of the
original image, the model id, timestamps, the semantic embedding (float32
BLOB), the uncertainty scalar ||u||^2 and, when the metric's beta_form is
"diff", the uncertainty embedding (float32 BLOB). The FAISS index is a snapshot
that can always be rebuilt from this table.

`fid` (the SQLite rowid, AUTOINCREMENT) is the vector id in the backend. Every
write of an item (add or replace) gets a new fid and fids are never reused, so
the set of live fids identifies the catalog state: a snapshot of the vector
index is brought up to date by adding the fids it lacks and removing the ones
SQLite no longer has.

The database runs in WAL mode. With synchronous=FULL (the default) a
committed transaction survives a process kill and a power cut; with NORMAL it
survives a process kill. One writer connection is
used under the catalog's write lock; searches read through a pool of
connections that never block the writer.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# SQLite's limit on bound parameters is 32766 since 3.32; stay well below it.
_CHUNK = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,  -- vector id in the backend
    id TEXT NOT NULL UNIQUE,                -- user id
    label TEXT,
    attributes TEXT NOT NULL,               -- JSON object
    content_hash TEXT NOT NULL,             -- sha256 hex of the original image bytes
    media_type TEXT,                        -- for example image/png
    image_bytes INTEGER NOT NULL,           -- size of the original image
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,               -- ISO 8601 UTC; kept when an item is replaced
    updated_at TEXT NOT NULL,
    embedding BLOB NOT NULL,                -- float32 (d,), L2-normalised
    uncertainty REAL NOT NULL,              -- ||u||^2
    uncertainty_vector BLOB                 -- float32 (du,) when beta_form is "diff", else NULL
);
CREATE INDEX IF NOT EXISTS items_content_hash ON items(content_hash);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
-- Fids deleted from items, in order: read-only followers of a writing process apply these removals
-- (and the rows with fids above the last one they saw) instead of comparing every fid.
CREATE TABLE IF NOT EXISTS removed (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    fid INTEGER NOT NULL
);
"""

# Entries of the `removed` log kept when it is pruned; a follower further behind compares every fid instead.
REMOVED_LOG_KEEP = 100_000

ITEM_COLUMNS = (
    "fid, id, label, attributes, content_hash, media_type, image_bytes, model_id, "
    "created_at, updated_at, uncertainty, uncertainty_vector"
)


@dataclass(frozen=True)
class ItemRow:
    """One row of `items` without the embedding, as read from SQLite."""

    fid: int
    id: str
    label: str | None
    attributes: dict
    content_hash: str
    media_type: str | None
    image_bytes: int
    model_id: str
    created_at: str
    updated_at: str
    uncertainty: float  # ||u||^2
    uncertainty_vector: np.ndarray | None  # float32 (du,) or None
    embedding: np.ndarray | None = None  # float32 (d,) when requested


@dataclass(frozen=True)
class NewRow:
    """An item to insert; `fid` None lets SQLite assign the next one."""

    id: str
    label: str | None
    attributes_json: str
    content_hash: str
    media_type: str | None
    image_bytes: int
    model_id: str
    created_at: str
    updated_at: str
    embedding: np.ndarray  # float32 (d,)
    uncertainty: float
    uncertainty_vector: np.ndarray | None
    fid: int | None = None


def _row_from_tuple(record: tuple, with_embedding: bool) -> ItemRow:
    vector = None if record[11] is None else np.frombuffer(record[11], dtype=np.float32)
    embedding = np.frombuffer(record[12], dtype=np.float32) if with_embedding else None
    return ItemRow(
        fid=record[0],
        id=record[1],
        label=record[2],
        attributes=json.loads(record[3]),
        content_hash=record[4],
        media_type=record[5],
        image_bytes=record[6],
        model_id=record[7],
        created_at=record[8],
        updated_at=record[9],
        uncertainty=float(record[10]),
        uncertainty_vector=vector,
        embedding=embedding,
    )


def _connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    connection = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=30.0
    )
    connection.execute("PRAGMA busy_timeout = 30000")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    return connection


class MetadataStore:
    """The SQLite database of one catalog generation.

    Write methods (`begin`, `insert`, `delete_fid`, `commit`, ...) use the one
    writer connection and must be called under the catalog's write lock. Read
    methods take a pooled connection and are safe from any thread.
    """

    def __init__(self, path: Path, *, read_only: bool = False, synchronous: str = "FULL"):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.path = Path(path)
        self.read_only = read_only
        self._writer = _connect(self.path, synchronous)
        if read_only:
            self._writer.execute("PRAGMA query_only = 1")
        else:
            self._writer.executescript(_SCHEMA)
        self._pool: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = [self._writer]
        self._pool_lock = threading.Lock()
        self._pinned = threading.local()  # the connection of a `read_snapshot` block, per thread

    def close(self) -> None:
        with self._pool_lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
            self._pool.clear()

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """Lend a read connection from the pool and take it back afterwards.

        Inside a `read_snapshot` block of the same thread, lend that block's connection.
        """
        pinned = getattr(self._pinned, "connection", None)
        if pinned is not None:
            yield pinned
            return
        with self._pool_lock:
            connection = self._pool.pop() if self._pool else None
        if connection is None:
            connection = _connect(self.path)
            connection.execute("PRAGMA query_only = 1")
            with self._pool_lock:
                self._all.append(connection)
        try:
            yield connection
        finally:
            with self._pool_lock:
                if connection in self._all:
                    self._pool.append(connection)

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Make every read of the calling thread inside the block see one committed state.

        The reads share one connection in one read transaction, so commits of
        other connections or processes made meanwhile stay invisible to them.
        """
        if getattr(self._pinned, "connection", None) is not None:
            yield  # nested: the outer block's snapshot holds
            return
        with self.reader() as connection:
            connection.execute("BEGIN")
            self._pinned.connection = connection
            try:
                yield
            finally:
                self._pinned.connection = None
                connection.execute("COMMIT")

    def data_version(self) -> int:
        """Return SQLite's data_version of the writer connection: it changes when another connection commits.

        On a read-only store that is every commit of the writing process.
        """
        with self._pool_lock:
            return int(self._writer.execute("PRAGMA data_version").fetchone()[0])

    # meta ----------------------------------------------------------------

    def get_meta(self) -> dict[str, Any]:
        with self.reader() as connection:
            rows = connection.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Write meta keys in their own transaction (call outside `begin`/`commit`)."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._writer.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(key, json.dumps(value)) for key, value in values.items()],
            )
            self._writer.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    # counters ------------------------------------------------------------

    def fid_counter(self) -> int:
        """Return the largest fid ever assigned (0 for a new table); it never decreases."""
        with self.reader() as connection:
            row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        return int(row[0]) if row else 0

    def count(self) -> int:
        with self.reader() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def all_fids(self) -> np.ndarray:
        """Return every live fid, int64, sorted."""
        with self.reader() as connection:
            cursor = connection.execute("SELECT fid FROM items ORDER BY fid")
            return np.fromiter((row[0] for row in cursor), dtype=np.int64)

    def content_hashes(self) -> set[str]:
        with self.reader() as connection:
            return {row[0] for row in connection.execute("SELECT DISTINCT content_hash FROM items")}

    # reads ---------------------------------------------------------------

    def rows_by_fids(self, fids: Sequence[int], *, with_embedding: bool = False) -> dict[int, ItemRow]:
        """Rows for the given fids that exist, keyed by fid."""
        columns = ITEM_COLUMNS + (", embedding" if with_embedding else "")
        result: dict[int, ItemRow] = {}
        unique = sorted({int(fid) for fid in fids})
        with self.reader() as connection:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {columns} FROM items WHERE fid IN ({marks})"
                for record in connection.execute(query, chunk):
                    result[record[0]] = _row_from_tuple(record, with_embedding)
        return result

    def vectors_by_fids(self, fids: np.ndarray, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the given fids that exist: (fids int64 (m,), float32 (m, d))."""
        found: list[int] = []
        blobs: list[bytes] = []
        unique = np.unique(np.asarray(fids, dtype=np.int64)).tolist()
        with self.reader() as connection:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT fid, embedding FROM items WHERE fid IN ({marks})"
                for fid, blob in connection.execute(query, chunk):
                    found.append(fid)
                    blobs.append(blob)
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found), dimension)
        return np.asarray(found, dtype=np.int64), matrix

    def iter_vectors(self, batch: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (fids int64 (m,), embeddings float32 (m, d)) in fid order, `batch` rows at a time."""
        last = 0
        while True:
            with self.reader() as connection:
                records = connection.execute(
                    "SELECT fid, embedding FROM items WHERE fid > ? ORDER BY fid LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not records:
                return
            fids = np.asarray([record[0] for record in records], dtype=np.int64)
            blob = b"".join(record[1] for record in records)
            yield fids, np.frombuffer(blob, dtype=np.float32).reshape(len(records), -1)
            last = int(fids[-1])

    def page_after(self, fid: int, limit: int, max_fid: int | None = None) -> list[ItemRow]:
        """Rows with fid > `fid` (and <= `max_fid`), in fid order, without embeddings."""
        upper = max_fid if max_fid is not None else 2**62
        with self.reader() as connection:
            records = connection.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE fid > ? AND fid <= ? ORDER BY fid LIMIT ?",
                (fid, upper, limit),
            ).fetchall()
        return [_row_from_tuple(record, False) for record in records]

    def get_by_id(self, item_id: str, *, with_embedding: bool = False) -> ItemRow | None:
        columns = ITEM_COLUMNS + (", embedding" if with_embedding else "")
        with self.reader() as connection:
            record = connection.execute(f"SELECT {columns} FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if record is None else _row_from_tuple(record, with_embedding)

    def list_rows(self, offset: int, limit: int) -> list[ItemRow]:
        """Rows ordered by user id."""
        with self.reader() as connection:
            records = connection.execute(
                f"SELECT {ITEM_COLUMNS} FROM items ORDER BY id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [_row_from_tuple(record, False) for record in records]

    def filter_fids(self, filter: Mapping[str, Any]) -> np.ndarray:
        """Fids of the items that match every (key, value) of `filter`, int64 sorted.

        Raises:
            ValueError: a key or value that cannot be used as a filter.
        """
        where, params = filter_sql(filter)
        with self.reader() as connection:
            cursor = connection.execute(f"SELECT fid FROM items WHERE {where} ORDER BY fid", params)
            return np.fromiter((row[0] for row in cursor), dtype=np.int64)

    def stored_bytes(self) -> tuple[int, int]:
        """(distinct originals, their total size in bytes)."""
        with self.reader() as connection:
            row = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM "
                "(SELECT MAX(image_bytes) AS size FROM items GROUP BY content_hash)"
            ).fetchone()
        return int(row[0]), int(row[1])

    def iter_rows_with_embeddings(self, batch: int = 2048) -> Iterator[ItemRow]:
        """Yield every row with its embedding, in fid order."""
        last = 0
        while True:
            with self.reader() as connection:
                records = connection.execute(
                    f"SELECT {ITEM_COLUMNS}, embedding FROM items WHERE fid > ? ORDER BY fid LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not records:
                return
            for record in records:
                yield _row_from_tuple(record, True)
            last = records[-1][0]

    # writes (under the catalog's write lock) -------------------------------

    def begin(self) -> None:
        self._writer.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._writer.execute("COMMIT")

    def rollback(self) -> None:
        if self._writer.in_transaction:
            self._writer.execute("ROLLBACK")

    def find_for_write(self, item_id: str) -> tuple[int, str, str] | None:
        """(fid, content_hash, created_at) of the item, seen by the open write transaction."""
        row = self._writer.execute(
            "SELECT fid, content_hash, created_at FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), row[1], row[2])

    def insert(self, row: NewRow) -> int:
        """Insert a row in the open transaction; returns its fid."""
        vector = None if row.uncertainty_vector is None else _blob(row.uncertainty_vector)
        cursor = self._writer.execute(
            "INSERT INTO items (fid, id, label, attributes, content_hash, media_type, image_bytes, "
            "model_id, created_at, updated_at, embedding, uncertainty, uncertainty_vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.fid,
                row.id,
                row.label,
                row.attributes_json,
                row.content_hash,
                row.media_type,
                row.image_bytes,
                row.model_id,
                row.created_at,
                row.updated_at,
                _blob(row.embedding),
                float(row.uncertainty),
                vector,
            ),
        )
        return int(cursor.lastrowid)

    def delete_fid(self, fid: int) -> None:
        """Delete a row in the open transaction and log its fid in `removed` for followers."""
        self._writer.execute("DELETE FROM items WHERE fid = ?", (int(fid),))
        self._writer.execute("INSERT INTO removed(fid) VALUES (?)", (int(fid),))

    def prune_removed(self, keep: int = REMOVED_LOG_KEEP) -> None:
        """Drop all but the last `keep` entries of the `removed` log, in their own transaction."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._writer.execute("DELETE FROM removed WHERE seq <= (SELECT MAX(seq) FROM removed) - ?", (int(keep),))
            self._writer.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def change_marks(self) -> tuple[int, int]:
        """Return (fid counter, last `removed` seq); with `changes_since` they tell a follower what is new."""
        with self.read_snapshot(), self.reader() as connection:
            return self.fid_counter(), _last_removed_seq(connection)

    def changes_since(self, fid: int, seq: int, dimension: int) -> "Changes":
        """Read what was committed after the marks (`fid`, `seq`) of `change_marks`, in one snapshot.

        `Changes.complete` is False when the `removed` log no longer reaches back
        to `seq` (it was pruned), so the caller must compare every fid instead.
        """
        with self.read_snapshot(), self.reader() as connection:
            last_seq = _last_removed_seq(connection)
            first_seq = connection.execute("SELECT MIN(seq) FROM removed").fetchone()[0]
            complete = seq >= last_seq or (first_seq is not None and first_seq <= seq + 1)
            removed = np.fromiter(
                (row[0] for row in connection.execute("SELECT fid FROM removed WHERE seq > ? ORDER BY seq", (seq,))),
                dtype=np.int64,
            )
            records = connection.execute("SELECT fid, embedding FROM items WHERE fid > ? ORDER BY fid", (fid,)).fetchall()
            added = np.asarray([record[0] for record in records], dtype=np.int64)
            vectors = np.frombuffer(b"".join(record[1] for record in records), dtype=np.float32)
            return Changes(
                added=added,
                vectors=vectors.reshape(len(records), dimension),
                removed=removed,
                fid_counter=self.fid_counter(),
                seq=last_seq,
                count=self.count(),
                complete=complete,
            )

    def is_referenced(self, content_hash: str) -> bool:
        """Return whether any committed or pending row still uses this original."""
        row = self._writer.execute(
            "SELECT 1 FROM items WHERE content_hash = ? LIMIT 1", (content_hash,)
        ).fetchone()
        return row is not None

    def raise_fid_counter(self, value: int) -> None:
        """Make the next assigned fid larger than `value` (in the open transaction)."""
        updated = self._writer.execute(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'items'", (int(value),)
        ).rowcount
        if updated == 0:
            self._writer.execute(
                "INSERT INTO sqlite_sequence(name, seq) VALUES ('items', ?)", (int(value),)
            )

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it."""
        self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@dataclass(frozen=True)
class Changes:
    """Changes a writing process committed after a follower's marks, read in one snapshot."""

    added: np.ndarray  # fids of new rows, int64 (m,)
    vectors: np.ndarray  # their embeddings, float32 (m, d)
    removed: np.ndarray  # fids deleted since, int64; some may belong to rows the follower never saw
    fid_counter: int  # marks to pass to the next `changes_since`
    seq: int
    count: int  # live items
    complete: bool  # False: the removed log was pruned past the marks


def _last_removed_seq(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'removed'").fetchone()
    return int(row[0]) if row else 0


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def filter_sql(filter: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """Translate an equality filter into a WHERE clause over `items`.

    Key "label" compares the label column; any other key compares the
    top-level attribute of that name with SQLite's JSON1 functions. Values may
    be strings, numbers, booleans or None (matches a JSON null or, for
    "label", a missing label). A string never equals a number.

    Raises:
        ValueError: the filter is not a mapping, a key is empty or contains
            a double quote or control character, or a value has another type.
    """
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping of attribute name to value, got {type(filter).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in filter.items():
        if not isinstance(key, str) or not key or '"' in key or any(ord(ch) < 32 for ch in key):
            raise ValueError(
                f"filter key {key!r} is invalid: use a non-empty attribute name without double quotes "
                "or control characters"
            )
        if key == "label":
            if value is None:
                clauses.append("label IS NULL")
            elif isinstance(value, str):
                clauses.append("label = ?")
                params.append(value)
            else:
                raise ValueError(f"filter value for 'label' must be a string or None, got {value!r}")
            continue
        path = f'$."{key}"'
        if value is None:
            # A missing attribute (json_type is SQL NULL) or one stored as JSON null.
            clauses.append("(json_type(attributes, ?) IS NULL OR json_type(attributes, ?) = 'null')")
            params.extend([path, path])
        elif isinstance(value, bool):
            clauses.append("json_type(attributes, ?) = ?")
            params.extend([path, "true" if value else "false"])
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"filter value for {key!r} must be finite, got {value!r}")
            clauses.append("json_type(attributes, ?) IN ('integer', 'real') AND json_extract(attributes, ?) = ?")
            params.extend([path, path, value])
        elif isinstance(value, str):
            clauses.append("json_type(attributes, ?) = 'text' AND json_extract(attributes, ?) = ?")
            params.extend([path, path, value])
        else:
            raise ValueError(
                f"filter value for {key!r} must be a string, number, boolean or None, "
                f"got {type(value).__name__}"
            )
    if not clauses:
        return "1", []
    return " AND ".join(f"({clause})" for clause in clauses), params
