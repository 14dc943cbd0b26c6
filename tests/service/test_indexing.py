"""POST /index: inline requests, jobs, archives, per-item errors, and jobs that survive a restart."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import time
import zipfile

import pytest

from service.testing import running_app
from tests.service.conftest import TEST_SETTINGS
from tests.service.helpers import WRITE_HEADERS, image_bytes, index_request


def wait_for_job(client, job_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s: {job['progress']}")
        time.sleep(0.05)


def post_archive(client, name: str, data: bytes):
    return client.post("/index", files={"archive": (name, data, "application/octet-stream")}, headers=WRITE_HEADERS)


def manifest(rows: list[dict], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def zip_archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_index_inline_with_one_bad_image(app_client):
    entries = [
        ("good0", image_bytes(1), "cat", {"vendor": "a"}),
        ("bad", b"not an image", None, {}),
        ("good1", image_bytes(2), None, {"size": 3, "flag": True}),
    ]
    response = index_request(app_client, entries)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["counts"] == {"added": 2, "replaced": 0, "error": 1}
    outcomes = {item["id"]: item for item in body["items"]}
    assert outcomes["bad"]["status"] == "error"
    assert outcomes["bad"]["reason"] == "not_an_image"
    assert outcomes["bad"]["position"] == 1
    assert app_client.get("/items/good1").json()["attributes"] == {"size": 3, "flag": True}
    assert app_client.get("/items/bad").status_code == 404


def test_index_items_json_field(app_client):
    files = [("images", ("x.png", image_bytes(seed), "image/png")) for seed in (1, 2)]
    items = [{"id": "x1", "label": "one"}, {"id": "x2", "attributes": {"vendor": "v"}}]
    response = app_client.post("/index", files=files, data={"items": json.dumps(items)}, headers=WRITE_HEADERS)
    assert response.status_code == 200, response.text
    assert app_client.get("/items/x1").json()["label"] == "one"
    assert app_client.get("/items/x2").json()["attributes"] == {"vendor": "v"}


def test_index_image_over_item_limit(app_client):
    big = image_bytes(1, size=(400, 400), fmt="BMP")
    assert 256 * 1024 < len(big) < 1024 * 1024
    response = index_request(app_client, [("big", big, None, {}), ("small", image_bytes(2), None, {})])
    assert response.status_code == 200, response.text
    outcomes = {item["id"]: item for item in response.json()["items"]}
    assert outcomes["big"]["reason"] == "too_large"
    assert "IDML_MAX_UPLOAD_BYTES" in outcomes["big"]["error"]
    assert outcomes["small"]["status"] == "added"


@pytest.mark.parametrize(
    ("fields", "status", "code", "fragment"),
    [
        ({"ids": ["only-one"]}, 422, "invalid_request", "2 images need 2 'ids'"),
        ({}, 422, "missing_field", "'ids'"),
        ({"ids": ["same", "same"]}, 422, "duplicate_ids", "'same'"),
        ({"ids": ["a\tb", "c"]}, 422, "invalid_request", "items[0].id"),
        ({"ids": ["a", "b"], "attributes": ["{", "{}"]}, 400, "invalid_json", "attributes[0]"),
        ({"ids": ["a", "b"], "attributes": ["[1]", "{}"]}, 422, "invalid_request", "items[0].attributes"),
        ({"ids": ["a", "b"], "labels": ["x"]}, 422, "invalid_request", "'labels' has 1"),
        ({"ids": ["a", "b"], "items": "[]"}, 422, "invalid_request", "not both"),
        ({"items": "[{\"id\": \"a\"}]"}, 422, "invalid_request", "items has 1 entries"),
        ({"ids": ["a", "b"], "extra": "x"}, 422, "invalid_request", "'extra'"),
    ],
)
def test_index_bad_metadata(app_client, fields, status, code, fragment):
    files = [("images", ("x.png", image_bytes(seed), "image/png")) for seed in (1, 2)]
    response = app_client.post("/index", files=files, data=fields, headers=WRITE_HEADERS)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert fragment in error["message"]
    assert app_client.get("/stats").json()["count"] == 0


def test_index_without_images(app_client):
    response = app_client.post("/index", files={"ids": (None, b"a")}, headers=WRITE_HEADERS)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "missing_field"


def test_index_needs_multipart(app_client):
    response = app_client.post("/index", json={"ids": ["a"]}, headers=WRITE_HEADERS)
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_index_large_request_becomes_job(app_client):
    entries = [(f"j{seed}", image_bytes(seed), None, {"n": seed}) for seed in range(6)]
    entries.append(("broken", image_bytes(99)[:50], None, {}))
    response = index_request(app_client, entries)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["progress"] == {"done": 0, "total": 7}
    assert response.headers["location"] == f"/jobs/{accepted['job_id']}"

    job = wait_for_job(app_client, accepted["job_id"])
    assert job["status"] == "completed"
    assert job["progress"] == {"done": 7, "total": 7}
    assert job["counts"] == {"added": 6, "replaced": 0, "error": 1}
    assert job["items"][6]["id"] == "broken"
    assert job["items"][6]["reason"] in ("truncated", "corrupt")
    assert app_client.get("/stats").json()["count"] == 6
    page = app_client.get(f"/jobs/{accepted['job_id']}", params={"offset": 5, "limit": 1}).json()
    assert [item["position"] for item in page["items"]] == [5]
    listing = app_client.get("/jobs").json()
    assert listing["total"] == 1
    assert listing["jobs"][0]["id"] == accepted["job_id"]


def test_index_zip_archive(app_client):
    files = {
        "img/one.png": image_bytes(1),
        "img/two.png": image_bytes(2),
        "img/bad.png": b"garbage",
        "manifest.csv": manifest(
            [
                {"path": "img/one.png", "id": "one", "label": "cat", "vendor": "apple", "year": "2020"},
                {"path": "img/two.png", "id": "two", "label": "", "vendor": "google", "year": ""},
                {"path": "img/bad.png", "id": "bad", "label": "", "vendor": "", "year": ""},
                {"path": "img/missing.png", "id": "missing", "label": "", "vendor": "", "year": ""},
                {"path": "../img/one.png", "id": "escape", "label": "", "vendor": "", "year": ""},
            ],
            ["path", "id", "label", "vendor", "year"],
        ),
    }
    response = post_archive(app_client, "upload.zip", zip_archive(files))
    assert response.status_code == 202, response.text
    job = wait_for_job(app_client, response.json()["job_id"])
    outcomes = {item["id"]: item for item in job["items"]}
    assert job["counts"] == {"added": 2, "replaced": 0, "error": 3}
    assert outcomes["missing"]["reason"] == "missing_file"
    assert outcomes["escape"]["reason"] == "missing_file"
    assert outcomes["bad"]["reason"] == "not_an_image"
    first_item = app_client.get("/items/one").json()
    assert first_item["label"] == "cat"
    assert first_item["attributes"] == {"vendor": "apple", "year": "2020"}
    second_item = app_client.get("/items/two").json()
    assert second_item["label"] is None
    assert second_item["attributes"] == {"vendor": "google"}


def test_index_tar_gz_archive_in_subfolder(app_client):
    files = {
        "export/manifest.csv": manifest([{"path": "a.png", "id": "ta"}, {"path": "b.png", "id": "tb"}], ["path", "id"]),
        "export/a.png": image_bytes(5),
        "export/b.png": image_bytes(6),
    }
    response = post_archive(app_client, "upload.tar.gz", tar_archive(files))
    assert response.status_code == 202, response.text
    job = wait_for_job(app_client, response.json()["job_id"])
    assert job["counts"]["added"] == 2
    assert app_client.get("/items/tb/image").content == image_bytes(6)


@pytest.mark.parametrize(
    ("files", "status", "code", "fragment"),
    [
        ({"a.png": b"x"}, 422, "missing_manifest", "manifest.csv"),
        ({"manifest.csv": b"file,name\na.png,x\n"}, 422, "invalid_manifest", "path, id"),
        ({"manifest.csv": b"path,id\n"}, 422, "invalid_manifest", "no rows"),
        ({"manifest.csv": b"path,id\na.png,x\nb.png,x\n"}, 422, "duplicate_ids", "'x'"),
        ({"manifest.csv": b"path,id\na.png,\n"}, 422, "invalid_manifest", "line 2"),
        ({"manifest.csv": b"path,id\na.png,x,extra\n"}, 422, "invalid_manifest", "more cells"),
    ],
)
def test_index_bad_archive(app_client, files, status, code, fragment):
    response = post_archive(app_client, "upload.zip", zip_archive(files))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert fragment in response.json()["error"]["message"]
    assert app_client.get("/jobs").json()["total"] == 0


def test_index_archive_not_an_archive(app_client):
    response = post_archive(app_client, "upload.zip", b"plain bytes, no archive")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_archive"


def test_index_archive_with_images(app_client):
    files = [("archive", ("a.zip", zip_archive({"x": b"y"}), "application/zip")), ("images", ("a.png", image_bytes(1), "image/png"))]
    response = app_client.post("/index", files=files, data={"ids": ["a"]}, headers=WRITE_HEADERS)
    assert response.status_code == 422
    assert "not both" in response.json()["error"]["message"]


def test_index_body_over_limit(app_client):
    big = b"\0" * (1100 * 1024)
    response = app_client.post(
        "/index", files={"images": ("a.png", big, "image/png")}, data={"ids": ["a"]}, headers=WRITE_HEADERS
    )
    assert response.status_code == 413
    assert "IDML_MAX_INDEX_UPLOAD_BYTES" in response.json()["error"]["message"]


def test_job_survives_restart(tiny_bundle, tmp_path):
    """A job accepted by a server that does not run jobs is resumed by the next server on the same catalog."""
    catalog = tmp_path / "catalog"
    entries = [(f"r{seed}", image_bytes(seed), None, {}) for seed in range(7)]
    with running_app(tiny_bundle.path, catalog, **{**TEST_SETTINGS, "run_jobs": False}) as client:
        response = index_request(client, entries)
        assert response.status_code == 202
        job_id = response.json()["job_id"]
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "queued"
        assert {item["status"] for item in job["items"]} == {"pending"}

    with running_app(tiny_bundle.path, catalog, **TEST_SETTINGS) as client:
        job = wait_for_job(client, job_id)
        assert job["counts"] == {"added": 7, "replaced": 0, "error": 0}
        assert client.get("/stats").json()["count"] == 7
    assert not (catalog / "jobs" / job_id).exists()


def test_job_resumes_after_partial_progress(tiny_bundle, tmp_path):
    """A server that stopped after one step leaves the rest pending; the next one finishes without repeating it."""
    catalog = tmp_path / "catalog"
    entries = [(f"p{seed}", image_bytes(seed), None, {}) for seed in range(8)]
    with running_app(tiny_bundle.path, catalog, **{**TEST_SETTINGS, "run_jobs": False}) as client:
        job_id = index_request(client, entries).json()["job_id"]
        runner = client.app.state.runtime.jobs
        assert client.portal.call(runner.run_step, job_id) is True
        job = client.get(f"/jobs/{job_id}").json()
        assert job["progress"] == {"done": 3, "total": 8}
        assert [item["status"] for item in job["items"]] == ["added"] * 3 + ["pending"] * 5

    with running_app(tiny_bundle.path, catalog, **TEST_SETTINGS) as client:
        job = wait_for_job(client, job_id)
        assert job["counts"] == {"added": 8, "replaced": 0, "error": 0}
        assert client.get("/stats").json()["count"] == 8


def test_stop_finishes_current_step_only(tiny_bundle, tmp_path):
    """A stop requested while a step runs lets that step finish and record; the rest stays pending."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from index.catalog import Catalog
    from index.embedder import Embedder
    from service.indexing import process_job_step
    from service.jobs import JobRunner, JobStore, SpooledItem

    store = JobStore(tmp_path / "jobs")
    job_id, folder = store.new_job_folder()
    items = []
    for position in range(6):
        (folder / f"{position:07d}").write_bytes(image_bytes(position))
        items.append(SpooledItem(f"s{position}", None, {}, file=f"{position:07d}"))
    store.create(job_id, items)

    catalog = Catalog.open(tmp_path / "catalog", tiny_bundle)
    embedder = Embedder(tiny_bundle, intra_op_threads=1)
    step_started, release = threading.Event(), threading.Event()

    def gated_step(pending):
        step_started.set()
        release.wait(30)
        return process_job_step(catalog, embedder, pending)

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            loop = asyncio.get_running_loop()
            runner = JobRunner(
                store, gated_step, lambda function, *args: loop.run_in_executor(executor, function, *args), batch_size=2
            )
            runner.start()
            await loop.run_in_executor(None, step_started.wait, 30)
            stopping = asyncio.create_task(runner.stop())
            await asyncio.sleep(0.05)
            release.set()
            await stopping

    try:
        asyncio.run(scenario())
        record = store.get(job_id)
        assert record.status == "running"
        assert record.done == 2
        assert [item["status"] for item in store.outcomes(job_id, 0, 10)] == ["added"] * 2 + ["pending"] * 4
        assert catalog.count() == 2
        assert store.next_unfinished() == job_id
    finally:
        catalog.close()
        store.close()
