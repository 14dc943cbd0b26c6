"""Two uvicorn workers over one catalog: the writer, and a follower that forwards writes and sees them at once."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from service.testing import ServerProcess
from tests.service.helpers import WRITE_HEADERS, image_bytes
from tests.service.test_uvicorn import SERVER_ENV

# Connections opened at most while looking for one served by each worker; the kernel hands each
# new connection to whichever worker accepts it first.
MAX_CONNECTIONS = 64


def _clients_by_role(base_url: str, deadline: float) -> tuple[dict[str, httpx.Client], list[httpx.Client]]:
    """Open keep-alive connections until one reached the writer and one a follower; returns them and all opened."""
    by_role: dict[str, httpx.Client] = {}
    opened = []
    while len(by_role) < 2 and len(opened) < MAX_CONNECTIONS and time.monotonic() < deadline:
        client = httpx.Client(base_url=base_url, timeout=30.0)
        opened.append(client)
        response = client.get("/stats")
        if response.status_code != 200:  # that worker is still loading
            time.sleep(0.1)
            continue
        by_role.setdefault(response.json()["worker"]["role"], client)
    return by_role, opened


def _index(client: httpx.Client, entries: dict[str, bytes], headers=WRITE_HEADERS) -> httpx.Response:
    files = [("images", (f"{item_id}.png", data, "image/png")) for item_id, data in entries.items()]
    return client.post("/index", files=files, data={"ids": list(entries)}, headers=headers)


def _index_until_accepted(client: httpx.Client, entries: dict[str, bytes], pause_s: float) -> list[httpx.Response]:
    """POST /index every `pause_s` until it returns 200 or 90 s pass; returns every response."""
    responses = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        responses.append(_index(client, entries))
        if responses[-1].status_code == 200:
            break
        time.sleep(pause_s)
    return responses


def _top_id(client: httpx.Client, image: bytes) -> str:
    response = client.post("/search", files={"image": ("q.png", image, "image/png")}, params={"k": 1})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["id"]


@pytest.fixture()
def workers(tiny_bundle, tmp_path):
    env = {**SERVER_ENV, "WORKERS": 2}
    with ServerProcess(tiny_bundle.path, tmp_path / "catalog", env=env, log_path=tmp_path / "workers.log") as server:
        clients, opened = _clients_by_role(server.base_url, time.monotonic() + 90)
        try:
            assert set(clients) == {"writer", "follower"}, f"{len(opened)} connections reached only {set(clients)}"
            yield server, clients["writer"], clients["follower"]
        finally:
            for client in opened:
                client.close()


def test_follower_forwards_writes_and_reads_them(workers):
    _, writer, follower = workers

    response = _index(follower, {"f1": image_bytes(21), "f2": image_bytes(22)})
    assert response.status_code == 200, response.text
    assert [item["status"] for item in response.json()["items"]] == ["added", "added"]
    assert writer.get("/items/f1").status_code == 200
    assert follower.get("/items/f2").status_code == 200
    assert _top_id(follower, image_bytes(21)) == "f1"

    assert _index(writer, {"w1": image_bytes(23)}).status_code == 200
    assert _top_id(follower, image_bytes(23)) == "w1"  # acknowledged by the writer, seen by the follower's next read
    assert follower.get("/items", params={"limit": 10}).json()["total"] == 3

    assert follower.delete("/items/f2", headers=WRITE_HEADERS).status_code == 204
    assert writer.get("/items/f2").status_code == 404
    assert follower.get("/items/f2").status_code == 404
    assert follower.delete("/items/f2", headers=WRITE_HEADERS).status_code == 404

    follower_metrics = follower.get("/metrics").text
    assert 'idml_errors_total{code="item_not_found"}' in follower_metrics  # the writer's code, relayed
    assert 'method="DELETE",route="/items/{item_id}",status="404"' in follower_metrics
    assert 'method="DELETE"' not in writer.get("/metrics").text  # forwarded requests are counted once

    stats = [client.get("/stats").json() for client in (writer, follower)]
    assert [entry["count"] for entry in stats] == [2, 2]
    assert stats[0]["worker"]["pid"] != stats[1]["worker"]["pid"]
    assert stats[1]["catalog"]["following"] is True


def test_follower_checks_key_and_relays_item_errors(workers):
    _, _, follower = workers

    rejected = _index(follower, {"k1": image_bytes(31)}, headers={})
    assert rejected.status_code == 401
    assert rejected.json()["error"]["code"] == "missing_api_key"
    assert "x-request-id" in rejected.headers

    mixed = _index(follower, {"k2": image_bytes(32), "k3": b"not an image"})
    assert mixed.status_code == 200, mixed.text
    assert [item["status"] for item in mixed.json()["items"]] == ["added", "error"]
    assert len(mixed.headers.get_list("x-request-id")) == 1

    too_many = {f"j{n}": image_bytes(40 + n) for n in range(6)}  # above INLINE_INDEX_MAX_ITEMS: a job
    accepted = _index(follower, too_many)
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.json()["status_url"]
    deadline = time.monotonic() + 60
    while follower.get(status_url).json()["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert follower.get(status_url).json()["status"] == "completed"
    assert _top_id(follower, image_bytes(45)) == "j5"


def test_writer_restart_takes_writes_again(workers):
    _, writer, follower = workers
    assert _index(writer, {"r1": image_bytes(51)}).status_code == 200
    writer_pid = writer.get("/stats").json()["worker"]["pid"]

    os.kill(writer_pid, signal.SIGKILL)
    responses = _index_until_accepted(follower, {"r2": image_bytes(52)}, pause_s=0.2)
    assert responses[-1].status_code == 200, [response.status_code for response in responses]
    for rejected in responses[:-1]:
        assert rejected.status_code == 503, rejected.text
        assert rejected.json()["error"]["code"] == "writer_unavailable"
        assert "pid" in rejected.json()["error"]["message"]
    assert follower.get("/items/r1").status_code == 200
    assert _top_id(follower, image_bytes(52)) == "r2"


def _ready_client(base_url: str, deadline: float) -> tuple[httpx.Client | None, list[httpx.Client]]:
    """Open keep-alive connections until one reaches a worker that has loaded; returns it and all opened."""
    opened = []
    while len(opened) < MAX_CONNECTIONS and time.monotonic() < deadline:
        client = httpx.Client(base_url=base_url, timeout=30.0)
        opened.append(client)
        if client.get("/stats").status_code == 200:
            return client, opened
        time.sleep(0.1)
    return None, opened


def test_second_server_takes_over_writes(tiny_bundle, tmp_path):
    """A second two-worker server on the catalog forwards to the first, and writes itself once the first stops."""
    catalog = tmp_path / "catalog"
    env = {**SERVER_ENV, "WORKERS": 2}
    with ServerProcess(tiny_bundle.path, catalog, env=env, log_path=tmp_path / "first.log") as first:
        first_clients, opened = _clients_by_role(first.base_url, time.monotonic() + 90)
        try:
            assert "writer" in first_clients
            with ServerProcess(tiny_bundle.path, catalog, env=env, log_path=tmp_path / "second.log") as second:
                # The server is up once one worker is ready; a connection may reach the other, still loading.
                client, second_opened = _ready_client(second.base_url, time.monotonic() + 90)
                opened.extend(second_opened)
                assert client is not None, f"no worker of the second server was ready after {len(second_opened)} tries"
                assert client.get("/stats").json()["worker"]["role"] == "follower"
                assert _index(client, {"s1": image_bytes(61)}).status_code == 200  # through the first's writer
                assert first_clients["writer"].get("/items/s1").status_code == 200

                first.stop()
                responses = _index_until_accepted(client, {"s2": image_bytes(62)}, pause_s=0.5)
                assert responses[-1].status_code == 200, [response.status_code for response in responses]
                for rejected in responses[:-1]:
                    assert rejected.json()["error"]["code"] == "writer_unavailable", rejected.text
                assert _top_id(client, image_bytes(61)) == "s1"
                assert _top_id(client, image_bytes(62)) == "s2"
        finally:
            for connection in opened:
                connection.close()
