"""The shell entry points: scripts/ensure-index.sh and scripts/demo.sh run for real, the rest parsed.

scripts/demo.sh runs with SKIP_INSTALL=1 (the test environment is installed
already), over a few demo images and the tiny test bundle, on a free port.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from index.catalog import Catalog
from service.testing import free_port
from tests.bundle_factory import make_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/install.sh", "scripts/demo.sh", "scripts/test.sh", "scripts/ensure-index.sh", ".ci/run"]
DEMO_MANIFEST = ROOT / "demo" / "catalog.csv"
# Demo images indexed by these tests.
IMAGES = 4
# Seconds scripts/demo.sh may take to index and start serving.
DEMO_START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    """The first IMAGES rows of demo/catalog.csv, with absolute image paths."""
    with open(DEMO_MANIFEST, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames
        rows = [dict(row, path=str(DEMO_MANIFEST.parent / row["path"])) for _, row in zip(range(IMAGES), reader)]
    path = tmp_path_factory.mktemp("manifest") / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles")
    return make_bundle(folder / "first", seed=0), make_bundle(folder / "second", seed=1)


def first_image(manifest: Path) -> Path:
    with open(manifest, newline="", encoding="utf-8") as handle:
        return Path(next(csv.DictReader(handle))["path"])


def script_env(**variables: str) -> dict[str, str]:
    """The test's environment without IDML_* settings, plus `variables`, with the venv's tools first on PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDML_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(variables)
    return env


def run_ensure_index(bundle, index: Path, manifest: Path) -> subprocess.CompletedProcess:
    env = script_env(IDML_BUNDLE=str(bundle), IDML_INDEX=str(index), IDML_CATALOG_MANIFEST=str(manifest), IDML_THREADS="1")
    return subprocess.run(
        [str(ROOT / "scripts" / "ensure-index.sh")], env=env, capture_output=True, text=True, timeout=300
    )


def catalog_state(index: Path) -> tuple[str, int]:
    catalog = Catalog.open(index, None, create=False, read_only=True)
    try:
        return catalog.model_id, catalog.count()
    finally:
        catalog.close()


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax_and_mode(script):
    path = ROOT / script

    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()


def test_ensure_index_builds_keeps_and_reembeds(tmp_path, small_manifest, bundles):
    first, second = bundles
    index = tmp_path / "index"

    built = run_ensure_index(first.path, index, small_manifest)
    assert built.returncode == 0, built.stderr
    assert "building catalog" in built.stdout
    assert catalog_state(index) == (first.model_id, IMAGES)

    unchanged = run_ensure_index(first.path, index, small_manifest)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "up to date" in unchanged.stdout
    assert catalog_state(index) == (first.model_id, IMAGES)

    reembedded = run_ensure_index(second.path, index, small_manifest)
    assert reembedded.returncode == 0, reembedded.stderr
    assert "re-embedding" in reembedded.stdout
    assert catalog_state(index) == (second.model_id, IMAGES)


def test_ensure_index_rejects_missing_bundle(tmp_path, small_manifest):
    result = run_ensure_index(tmp_path / "no-bundle", tmp_path / "index", small_manifest)

    assert result.returncode == 2
    assert "is not a model bundle" in result.stderr
    assert not (tmp_path / "index").exists()


def test_ensure_index_rejects_missing_manifest(tmp_path, bundles):
    result = run_ensure_index(bundles[0].path, tmp_path / "index", tmp_path / "missing.csv")

    assert result.returncode == 2
    assert "missing.csv not found" in result.stderr


def test_demo_serves_search(tmp_path, small_manifest, bundles):
    port = free_port()
    env = script_env(
        SKIP_INSTALL="1",
        VENV=str(Path(sys.executable).parent.parent),
        IDML_BUNDLE=str(bundles[0].path),
        IDML_INDEX=str(tmp_path / "demo-index"),
        IDML_CATALOG_MANIFEST=str(small_manifest),
        IDML_PORT=str(port),
        IDML_THREADS="1",
    )
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "demo.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = None
        deadline = time.monotonic() + DEMO_START_TIMEOUT_S
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while ready is None and time.monotonic() < deadline and process.poll() is None:
                try:
                    response = client.get("/readyz")
                    ready = response.json() if response.status_code == 200 else None
                except httpx.TransportError:
                    pass
                if ready is None:
                    time.sleep(0.2)
            assert ready is not None, f"demo.sh did not serve within {DEMO_START_TIMEOUT_S} s:\n{log_path.read_text()}"
            image = first_image(small_manifest)
            search = client.post("/search?k=2", files={"image": (image.name, image.read_bytes(), "image/png")})
            page = client.get("/")
    finally:
        # demo.sh execs idml-serve, so the process is the server; SIGTERM shuts it down gracefully.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    output = log_path.read_text()
    assert ready == {"status": "ready", "model_id": bundles[0].model_id, "count": IMAGES}
    assert search.status_code == 200, search.text
    assert len(search.json()["results"]) == 2
    assert page.status_code == 200
    assert 'id="image-input"' in page.text
    assert f"Search page:  http://127.0.0.1:{port}/" in output
    # The example names the first image of the manifest, relative to the checkout.
    example = first_image(small_manifest).relative_to(ROOT)
    assert f"curl -F image=@{example} 'http://127.0.0.1:{port}/search?k=5'" in output
