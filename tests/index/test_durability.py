"""Durability: a writer killed with SIGKILL loses no acknowledged change and leaves a consistent catalog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index.catalog import Catalog
from index.faults import ENV_VAR
from tests.index.crash_child import vector_of

CHILD = Path(__file__).with_name("crash_child.py")
KILLS = 15


class Expectations:
    """Replays a child's log: the state of every id whose last operation was acknowledged."""

    def __init__(self, log: Path):
        self.state: dict[str, int | None] = {}  # id -> version present, or None when deleted
        self.uncertain: set[str] = set()  # ids with an operation in flight at a kill
        self.reembed_acknowledged = False
        pending: dict[str, str] = {}
        for line in log.read_text().splitlines():
            if line in ("ready", "done"):
                self.uncertain.update(pending)  # the previous run died with these in flight
                pending.clear()
                continue
            phase, operation, payload = line.split(" ", 2)
            if operation == "reembed" and phase == "ack":
                self.reembed_acknowledged = True
            if operation not in ("add", "delete"):
                continue
            for entry in payload.split(","):
                item_id, _, version = entry.partition(":")
                if phase == "begin":
                    pending[item_id] = entry
                else:
                    pending.pop(item_id, None)
                    self.state[item_id] = int(version) if operation == "add" else None
        self.uncertain.update(pending)

    def certain(self) -> dict[str, int | None]:
        return {item_id: version for item_id, version in self.state.items() if item_id not in self.uncertain}


def check_catalog(path: Path, expectations: Expectations, *, check_vectors: bool = True) -> None:
    with Catalog.open(path, None, create=False) as catalog:
        report = catalog.verify()
        assert report.problems == []
        certain = expectations.certain()
        present = {item_id: version for item_id, version in certain.items() if version is not None}
        for item_id, version in certain.items():
            item = catalog.get(item_id)
            if version is None:
                assert item is None, f"deleted item {item_id} is back"
                continue
            assert item is not None, f"acknowledged item {item_id} is missing"
            assert item.label == f"v{version}"
        if check_vectors and present:
            keys = [f"{item_id}:{version}" for item_id, version in present.items()]
            results = catalog.search(np.stack([vector_of(key) for key in keys]), 1)
            for key, result in zip(keys, results):
                assert result[0].item.id == key.split(":")[0]
                assert result[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert len(present) <= catalog.count() <= len(present) + len(expectations.uncertain)


def start_child(catalog: Path, bundle, log: Path, seed: int, mode: str, *extra: str, env=None):
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(catalog), str(bundle.path), str(log), str(seed), mode, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for_ready(log: Path, runs: int, child: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("ready\n") >= runs:
            return
        if child.poll() is not None:
            raise AssertionError(f"child exited with {child.returncode}: {child.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("child did not open the catalog in time")


@pytest.mark.slow
def test_random_kills_lose_nothing_acknowledged(tmp_path, tiny_bundle):
    catalog = tmp_path / "catalog"
    log = tmp_path / "child.log"
    rng = np.random.default_rng(7)
    started = time.monotonic()

    for run in range(1, KILLS + 1):
        child = start_child(catalog, tiny_bundle, log, run, "random")
        wait_for_ready(log, run, child)
        time.sleep(float(rng.uniform(0.02, 0.5)))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, "the child stopped before it was killed"
        if time.monotonic() - started > 50:  # bound the run on a slow machine
            break

    expectations = Expectations(log)
    assert sum(1 for version in expectations.certain().values() if version is not None) > 20
    check_catalog(catalog, expectations)


@pytest.mark.parametrize(
    "point",
    [
        "originals_written",
        "before_commit",
        "after_commit:2",
        "snapshot_files_written:2",
        "snapshot_published:2",
        "reembed_before_switch",
        "reembed_after_switch",
    ],
)
def test_kill_at_crash_point(tmp_path, tiny_bundle, other_bundle, point):
    catalog = tmp_path / "catalog"
    log = tmp_path / "child.log"
    env = {**os.environ, ENV_VAR: point}

    child = start_child(catalog, tiny_bundle, log, 0, "script", str(other_bundle.path), env=env)
    child.wait(timeout=60)
    errors = child.stderr.read().decode()
    child.stderr.close()

    assert child.returncode == -signal.SIGKILL, f"crash point {point} was not reached: {errors[-2000:]}"
    expectations = Expectations(log)
    with Catalog.open(catalog, None, create=False) as reopened:
        switched = reopened.model_id == other_bundle.model_id
    assert switched == (point == "reembed_after_switch")
    check_catalog(catalog, expectations, check_vectors=not switched)
    assert not list(catalog.glob("gen-*"))[1:]  # one generation left
