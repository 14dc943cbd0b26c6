"""Original images, content-addressed on disk.

An image with sha256 hex digest `abcdef...` lives at `originals/ab/cdef...`
(the first two hex digits name the shard folder). Identical bytes are stored
once. Files are written to `originals/tmp/`, fsynced and renamed into place,
and the shard folder is fsynced, so a file under its final name is always
complete. The catalog removes a file when no item references its hash any
more, and sweeps files left by a crash on the next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from index.fsync import fsync_dir, fsync_file

logger = logging.getLogger(__name__)

_HASH = re.compile(r"^[0-9a-f]{64}$")


def content_hash(data: bytes) -> str:
    """sha256 hex digest of `data`, 64 characters."""
    return hashlib.sha256(data).hexdigest()


# Concurrent fsyncs share the file system's journal commits.
_SYNC_THREADS = 16


def _parallel(function: Callable[[Path], None], paths: list[Path]) -> None:
    if len(paths) == 1:
        function(paths[0])
        return
    with ThreadPoolExecutor(min(_SYNC_THREADS, len(paths))) as pool:
        list(pool.map(function, paths))


class OriginalStore:
    """Content-addressed files under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        if not _HASH.match(digest):
            raise ValueError(f"content hash {digest!r} is not a 64-digit lowercase sha256 hex digest")
        return self.root / digest[:2] / digest[2:]

    def put(self, data: bytes) -> tuple[str, bool]:
        """Store `data` durably; returns (sha256 hex, whether a new file was written)."""
        digest = content_hash(data)
        final = self.path_for(digest)
        if final.exists() and final.stat().st_size == len(data):
            return digest, False
        shard = final.parent
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            fsync_dir(self.root)
        temporary = self.tmp / f"{digest}.{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        fsync_dir(shard)
        return digest, True

    def put_many(self, images: list[bytes], *, sync: bool = True) -> list[tuple[str, bool]]:
        """Store several images; returns (sha256 hex, whether a new file was written) for each.

        The new files are fsynced in parallel, then renamed into place, then
        their shard folders are fsynced, so the cost is a few disk flushes
        per batch instead of two per file. `sync=False` skips the fsyncs: the
        files then survive a process crash but not a power cut.
        """
        results: list[tuple[str, bool]] = []
        pending: dict[str, Path] = {}  # digest -> temporary file
        for data in images:
            digest = content_hash(data)
            final = self.path_for(digest)
            if digest in pending or (final.exists() and final.stat().st_size == len(data)):
                results.append((digest, False))
                continue
            temporary = self.tmp / f"{digest}.{uuid.uuid4().hex}"
            with open(temporary, "wb") as handle:
                handle.write(data)
            pending[digest] = temporary
            results.append((digest, True))
        if not pending:
            return results

        if sync:
            _parallel(fsync_file, list(pending.values()))
        new_shards = False
        shards: set[Path] = set()
        for digest, temporary in pending.items():
            final = self.path_for(digest)
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                new_shards = True
            os.replace(temporary, final)
            shards.add(final.parent)
        if sync:
            if new_shards:
                fsync_dir(self.root)
            _parallel(fsync_dir, sorted(shards))
        return results

    def read(self, digest: str) -> bytes:
        """Bytes of the original. Raises FileNotFoundError when it is missing."""
        return self.path_for(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def remove(self, digest: str) -> bool:
        """Delete the file of `digest`; returns whether it existed."""
        try:
            self.path_for(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_hashes(self) -> Iterator[str]:
        """Yield every stored hash, by walking the shard folders."""
        for shard in sorted(self.root.iterdir()):
            if shard.name == "tmp" or not shard.is_dir() or len(shard.name) != 2:
                continue
            for entry in os.scandir(shard):
                digest = shard.name + entry.name
                if entry.is_file() and _HASH.match(digest):
                    yield digest

    def clear_tmp(self) -> int:
        """Delete half-written files left in `tmp/` by a crash; returns how many."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_file():
                os.unlink(entry.path)
                removed += 1
        return removed

    def verify(self, digest: str) -> str | None:
        """Check a stored file: None when it exists and hashes to `digest`, else the problem."""
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return f"original {path} is missing"
        actual = content_hash(data)
        if actual != digest:
            return f"original {path} has sha256 {actual}, expected {digest}"
        return None
