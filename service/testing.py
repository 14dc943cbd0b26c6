"""Helpers that run the service over a given bundle and catalog folder, for tests and benchmarks.

`running_app` gives an in-process `fastapi.testclient.TestClient` (the
lifespan runs, and the call returns once `/readyz` is 200). `ServerProcess`
starts `idml-serve` as a uvicorn subprocess on 127.0.0.1 and a free port.
Both need the test extras (httpx).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from service.settings import ENV_PREFIX, Settings

# Seconds to wait for the model and catalog to load.
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(bundle: str | Path, index: str | Path, **settings) -> Iterator:
    """Yield a TestClient of an app over `bundle` and the catalog folder `index`, once it is ready.

    Extra keyword arguments are Settings fields, for example `api_key="..."`.
    """
    from fastapi.testclient import TestClient

    from service.app import app_factory

    app = app_factory(Settings(bundle=Path(bundle), index=Path(index), **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


def wait_ready(get, timeout_s: float = READY_TIMEOUT_S) -> dict:
    """Poll GET /readyz with `get(path)` until it is 200; raise RuntimeError on a load failure or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = get("/readyz")
        except OSError:
            response = None
        if response is not None and response.status_code == 200:
            return response.json()
        if response is not None and response.status_code == 503:
            error = response.json().get("error", {})
            if error.get("code") == "load_failed":
                raise RuntimeError(f"the service failed to load: {error.get('message')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s")
        time.sleep(0.05)


class ServerProcess:
    """`python -m service.cli` on 127.0.0.1 and a free port, as a context manager.

    `env` adds IDML_* variables (names without the prefix are prefixed);
    `args` adds command-line options. Output goes to `log_path`.
    """

    def __init__(self, bundle: str | Path, index: str | Path, *, env: dict | None = None,
                 args: list[str] | None = None, log_path: str | Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(index).with_name(f"server-{self.port}.log")
        self.command = [sys.executable, "-m", "service.cli", "--bundle", str(bundle), "--index", str(index),
                        "--host", "127.0.0.1", "--port", str(self.port), *(args or [])]
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
        for key, value in (env or {}).items():
            name = key if key.startswith(ENV_PREFIX) else ENV_PREFIX + key.upper()
            self.env[name] = str(value)
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=root)
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            def get(path):
                if self.process.poll() is not None:
                    raise RuntimeError(f"idml-serve exited with {self.process.returncode}:\n{self.log()}")
                try:
                    return client.get(path)
                except httpx.TransportError:
                    return None

            wait_ready(get)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """Send SIGTERM (a graceful shutdown) and wait; returns the exit code.

        uvicorn 0.29 and later re-raise the signal after shutting down, so a clean stop returns -SIGTERM.
        """
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
