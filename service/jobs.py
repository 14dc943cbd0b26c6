"""Durable index jobs: a SQLite job table plus spooled upload files, and the runner that works through them.

Layout inside the jobs folder (`<catalog>/jobs/`):

    jobs.sqlite3        tables `jobs` and `job_items`
    runner.lock         held (flock) by the one process that runs jobs
    <job id>/<position> the spooled image of each pending item

A job row is inserted only after every file is spooled and fsynced, so a
202 response always refers to a complete job. The runner embeds and stores
pending items in steps of `batch_size` and records each step's outcomes in
one transaction. A stop request lets the current step finish; the remaining
items stay pending and the next start resumes them. A crash between storing a
step and recording it makes the next start store those items again, which
the catalog's upsert by id turns into `replaced` outcomes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

# Seconds between looks at the job table for jobs submitted through other worker processes.
POLL_INTERVAL_S = 1.0
# Spool folders without a job row are removed at start-up once they are this old, seconds.
ORPHAN_AGE_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- queued, running, completed, failed
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    label TEXT,
    attributes TEXT NOT NULL,        -- JSON object
    file TEXT,                       -- spooled file name inside the job folder; NULL once processed
    status TEXT NOT NULL,            -- pending, added, replaced, error
    reason TEXT,
    error TEXT,
    PRIMARY KEY (job_id, position)
);
CREATE INDEX IF NOT EXISTS job_items_pending ON job_items (job_id, status, position);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class SpooledItem:
    """One item of a job: metadata plus either a spooled file or an error found while spooling."""

    id: str
    label: str | None
    attributes: dict
    file: str | None = None  # file name inside the job folder
    error_reason: str | None = None
    error: str | None = None


@dataclass
class PendingItem:
    position: int
    id: str
    label: str | None
    attributes: dict
    path: Path


@dataclass
class JobRecord:
    id: str
    status: str
    created_at: str
    updated_at: str
    total: int
    done: int
    error: str | None
    counts: dict = field(default_factory=dict)


class JobStore:
    """The job table. Safe to call from several threads; every call is one short transaction."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / "jobs.sqlite3", check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def new_job_folder(self) -> tuple[str, Path]:
        """Create a job id and its empty spool folder; returns both."""
        job_id = uuid.uuid4().hex
        path = self.folder / job_id
        path.mkdir()
        return job_id, path

    def create(self, job_id: str, items: list[SpooledItem]) -> JobRecord:
        """Insert a queued job whose files are already spooled in its folder."""
        now = _now()
        done = sum(1 for item in items if item.error_reason is not None)
        status = "queued" if done < len(items) else "completed"
        rows = [
            (
                job_id,
                position,
                item.id,
                item.label,
                json.dumps(item.attributes),
                item.file,
                "error" if item.error_reason else "pending",
                item.error_reason,
                item.error,
            )
            for position, item in enumerate(items)
        ]
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO jobs (id, status, created_at, updated_at, total, done, error) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (job_id, status, now, now, len(items), done),
            )
            self._db.executemany("INSERT INTO job_items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if status == "completed":
            self.remove_spool(job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, status, created_at, updated_at, total, done, error FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            counts = dict(
                self._db.execute(
                    "SELECT status, COUNT(*) FROM job_items WHERE job_id = ? GROUP BY status", (job_id,)
                ).fetchall()
            )
        return JobRecord(*row, counts=counts)

    def list_jobs(self, offset: int, limit: int) -> tuple[int, list[JobRecord]]:
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            rows = self._db.execute(
                "SELECT id, status, created_at, updated_at, total, done, error FROM jobs "
                "ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return total, [JobRecord(*row) for row in rows]

    def outcomes(self, job_id: str, offset: int, limit: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT position, item_id, status, reason, error FROM job_items "
                "WHERE job_id = ? ORDER BY position LIMIT ? OFFSET ?",
                (job_id, limit, offset),
            ).fetchall()
        return [
            {"position": position, "id": item_id, "status": status, "reason": reason, "error": error}
            for position, item_id, status, reason, error in rows
        ]

    def next_unfinished(self) -> str | None:
        """Return the oldest job that is queued or was running when its process stopped, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at, id LIMIT 1"
            ).fetchone()
        return row[0] if row else None

    def pending(self, job_id: str, limit: int) -> list[PendingItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT position, item_id, label, attributes, file FROM job_items "
                "WHERE job_id = ? AND status = 'pending' ORDER BY position LIMIT ?",
                (job_id, limit),
            ).fetchall()
        folder = self.folder / job_id
        return [
            PendingItem(position, item_id, label, json.loads(attributes), folder / file)
            for position, item_id, label, attributes, file in rows
        ]

    def set_status(self, job_id: str, status: str, error: str | None = None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, updated_at = ? WHERE id = ?", (status, error, _now(), job_id)
            )

    def record(self, job_id: str, outcomes: list[tuple[int, str, str | None, str | None]]) -> None:
        """Store (position, status, reason, error) for processed items and advance `done`, atomically."""
        with self._lock, self._db:
            self._db.executemany(
                "UPDATE job_items SET status = ?, reason = ?, error = ?, file = NULL "
                "WHERE job_id = ? AND position = ? AND status = 'pending'",
                [(status, reason, error, job_id, position) for position, status, reason, error in outcomes],
            )
            self._db.execute(
                "UPDATE jobs SET done = (SELECT COUNT(*) FROM job_items WHERE job_id = ? AND status != 'pending'), "
                "updated_at = ? WHERE id = ?",
                (job_id, _now(), job_id),
            )

    def remove_spool(self, job_id: str) -> None:
        shutil.rmtree(self.folder / job_id, ignore_errors=True)

    def remove_orphan_folders(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete spool folders without a job row (uploads cut off before their 202); returns how many.

        Folders younger than `min_age_s` are kept: another worker may still be spooling into them.
        """
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT id FROM jobs").fetchall()}
        removed = 0
        now = time.time()
        for path in self.folder.iterdir():
            if path.is_dir() and path.name not in known and now - path.stat().st_mtime >= min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


class RunnerLock:
    """An exclusive flock on `runner.lock`, so one process of several runs the jobs."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "runner.lock"
        self._handle = None

    def try_acquire(self) -> bool:
        if self._handle is not None:
            return True
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


# (position, status, reason, error) for each item of a step.
StepOutcomes = list[tuple[int, str, str | None, str | None]]


class JobRunner:
    """Works through unfinished jobs, one step of `batch_size` items at a time.

    `process_step(items)` stores the items in the catalog and returns their
    outcomes. It runs through `run_step_in_thread`, which the caller provides,
    so job steps share the single catalog writer thread with inline requests.
    """

    def __init__(
        self,
        store: JobStore,
        process_step: Callable[[list[PendingItem]], StepOutcomes],
        run_step_in_thread: Callable,
        *,
        batch_size: int,
        on_step: Callable[[StepOutcomes], None] | None = None,
    ):
        self.store = store
        self.process_step = process_step
        self.run_step_in_thread = run_step_in_thread
        self.batch_size = batch_size
        self.on_step = on_step
        self.lock = RunnerLock(store.folder)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="idml-job-runner")

    def wake(self) -> None:
        """Tell the runner a new job is in the table."""
        self._wake.set()

    async def stop(self) -> None:
        """Let the step in progress finish and end the runner; unfinished jobs stay resumable."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self.lock.release()

    async def _run(self) -> None:
        while not self._stopping:
            job_id = self.store.next_unfinished() if self.lock.try_acquire() else None
            if job_id is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
                continue
            await self.run_job(job_id)

    async def run_job(self, job_id: str) -> None:
        """Process `job_id` step by step until it is finished or a stop is requested."""
        logger.info("index job %s started", job_id, extra={"job_id": job_id})
        self.store.set_status(job_id, "running")
        while not self._stopping:
            more = await self.run_step(job_id)
            if not more:
                break
        record = self.store.get(job_id)
        if record is not None and record.status == "running" and self._stopping:
            logger.info(
                "index job %s paused at %d of %d items; it resumes at the next start",
                job_id,
                record.done,
                record.total,
                extra={"job_id": job_id},
            )

    async def run_step(self, job_id: str) -> bool:
        """Process one step of `job_id`; returns whether pending items remain."""
        try:
            return await self.run_step_in_thread(self._step, job_id)
        except Exception as error:  # the catalog failed as a whole: the job stops, its items stay pending
            logger.exception("index job %s failed", job_id, extra={"job_id": job_id})
            self.store.set_status(job_id, "failed", f"{type(error).__name__}: {error}")
            return False

    def _step(self, job_id: str) -> bool:
        items = self.store.pending(job_id, self.batch_size)
        if not items:
            self._finish(job_id)
            return False
        outcomes = self.process_step(items)
        self.store.record(job_id, outcomes)
        if self.on_step is not None:
            self.on_step(outcomes)
        return True

    def _finish(self, job_id: str) -> None:
        self.store.set_status(job_id, "completed")
        self.store.remove_spool(job_id)
        record = self.store.get(job_id)
        logger.info(
            "index job %s completed: %d items, %s",
            job_id,
            record.total,
            ", ".join(f"{count} {status}" for status, count in sorted(record.counts.items())),
            extra={"job_id": job_id},
        )
