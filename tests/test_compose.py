"""docker-compose.yml, the Dockerfiles and .dockerignore, checked without a Docker engine.

`docker-compose config` validates and resolves the compose file the way
`docker compose up` reads it. Tests that need the binary skip when it is
missing, unless IDML_REQUIRE_TEST_TOOLS=1 (set by .ci/run) turns the skip into
a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICE_DOCKERFILE = ROOT / "docker" / "service.Dockerfile"
TRAINER_DOCKERFILE = ROOT / "docker" / "trainer.Dockerfile"

# Variables a developer's shell or .env file may set, cleared so that the defaults are tested.
COMPOSE_VARIABLES = (
    "IDML_API_KEY",
    "IDML_BUNDLE",
    "IDML_CATALOG_MANIFEST",
    "IDML_CATALOG_FOLDER",
    "IDML_PUBLISH_ADDRESS",
    "IDML_PUBLISH_PORT",
    "IDML_WORKERS",
    "IDML_THREADS",
    "IDML_CPUS",
    "IDML_UID",
    "IDML_GID",
    "IDML_READ_KEY_REQUIRED",
    "IDML_MILVUS_URI",
    "IDML_MILVUS_TOKEN",
    "IDML_MILVUS_COLLECTION",
    "IDML_MILVUS_INDEX_TYPE",
    "IDML_MILVUS_IMAGE",
    "IDML_MILVUS_PUBLISH_PORT",
    "IDML_ETCD_IMAGE",
    "IDML_MINIO_IMAGE",
    "IDML_MINIO_ACCESS_KEY",
    "IDML_MINIO_SECRET_KEY",
)


def missing_tool(reason: str) -> None:
    """Skip the test, or fail it when IDML_REQUIRE_TEST_TOOLS=1 (CI)."""
    if os.environ.get("IDML_REQUIRE_TEST_TOOLS") == "1":
        pytest.fail(f"{reason}, and IDML_REQUIRE_TEST_TOOLS=1 requires it")
    pytest.skip(reason)


def compose_command() -> list[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        missing_tool("docker-compose is not installed (Debian package docker-compose)")
    return [binary]


def run_compose_config(tmp_path: Path, **overrides: str) -> dict:
    """Return `docker-compose config` of the repository's compose file, parsed, with `overrides` in the environment."""
    env = {key: value for key, value in os.environ.items() if key not in COMPOSE_VARIABLES}
    env.update(overrides)
    # An empty env file keeps a developer's .env next to the compose file out of the test.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    command = compose_command() + [
        "--project-directory",
        str(ROOT),
        "--env-file",
        str(env_file),
        "-f",
        str(COMPOSE_FILE),
        "config",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def default_config(tmp_path_factory) -> dict:
    """`docker-compose config` with no variables set."""
    return run_compose_config(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def compose_source() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def test_compose_file_has_no_version_key(compose_source):
    # The Compose Specification dropped `version`; v2 warns about it and docker-compose 1.27+ needs none.
    assert "version" not in compose_source


def test_compose_config_services(default_config):
    assert set(default_config["services"]) == {"index", "search", "trainer", "milvus", "milvus-etcd", "milvus-minio"}
    assert set(default_config["volumes"]) == {"index-data", "milvus-etcd", "milvus-minio", "milvus-data"}


def test_compose_milvus_profile(default_config):
    services = default_config["services"]
    milvus = services["milvus"]

    for name in ("milvus", "milvus-etcd", "milvus-minio"):
        assert services[name]["profiles"] == ["milvus"], f"{name} must start only with --profile milvus"
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
        assert services[name]["image"].rsplit(":", 1)[1] != "latest", f"{name} image is not pinned"
    assert milvus["depends_on"] == {
        "milvus-etcd": {"condition": "service_healthy"},
        "milvus-minio": {"condition": "service_healthy"},
    }
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "milvus-etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "milvus-minio:9000"
    assert milvus["ports"] in (["127.0.0.1:19530:19530/tcp"], ["127.0.0.1:19530:19530"])
    # The default profile keeps FAISS: the catalog services get an empty Milvus uri.
    for name in ("index", "search"):
        assert services[name]["environment"]["IDML_MILVUS_URI"] == ""
        assert "milvus" not in services[name].get("depends_on", {})


def test_compose_milvus_uri_passthrough(tmp_path):
    config = run_compose_config(tmp_path, IDML_MILVUS_URI="http://milvus:19530", IDML_MILVUS_INDEX_TYPE="IVF_SQ8")

    for name in ("index", "search"):
        environment = config["services"][name]["environment"]
        assert environment["IDML_MILVUS_URI"] == "http://milvus:19530"
        assert environment["IDML_MILVUS_INDEX_TYPE"] == "IVF_SQ8"


def test_compose_search_service(default_config):
    search = default_config["services"]["search"]

    assert search["build"]["dockerfile"] == "docker/service.Dockerfile"
    assert Path(search["build"]["context"]).resolve() == ROOT
    assert search["depends_on"] == {"index": {"condition": "service_completed_successfully"}}
    environment = search["environment"]
    assert environment["IDML_HOST"] == "0.0.0.0"
    assert environment["IDML_PORT"] == "8000"
    assert environment["IDML_BUNDLE"] == "/models/default"
    assert environment["IDML_INDEX"] == "/data/index"
    assert environment["IDML_API_KEY"] == ""
    assert search["restart"] == "unless-stopped"


def test_compose_search_port_on_loopback(default_config):
    ports = default_config["services"]["search"]["ports"]

    assert len(ports) == 1
    assert ports[0] in ("127.0.0.1:8000:8000/tcp", "127.0.0.1:8000:8000")


def test_compose_port_and_bundle_overrides(tmp_path):
    config = run_compose_config(
        tmp_path,
        IDML_PUBLISH_ADDRESS="0.0.0.0",
        IDML_PUBLISH_PORT="9000",
        IDML_BUNDLE="/models/emoji-v2",
        IDML_API_KEY="k" * 32,
        IDML_THREADS="4",
        IDML_CPUS="4",
    )
    search = config["services"]["search"]

    assert search["ports"][0] in ("0.0.0.0:9000:8000/tcp", "0.0.0.0:9000:8000")
    assert search["environment"]["IDML_BUNDLE"] == "/models/emoji-v2"
    assert config["services"]["index"]["environment"]["IDML_BUNDLE"] == "/models/emoji-v2"
    assert search["environment"]["IDML_API_KEY"] == "k" * 32
    assert search["environment"]["IDML_THREADS"] == "4"
    assert float(search["cpus"]) == 4.0


def test_compose_volumes(default_config):
    services = default_config["services"]

    for name in ("index", "search"):
        volumes = services[name]["volumes"]
        assert f"{ROOT / 'models'}:/models:ro" in volumes, name
        assert any(volume.startswith("index-data:/data/index") for volume in volumes), name
    trainer_volumes = services["trainer"]["volumes"]
    for folder in ("models", "data", "runs"):
        # docker-compose 1.29 writes ":rw" explicitly, v2 leaves it out.
        assert any(volume in (f"{ROOT / folder}:/app/{folder}", f"{ROOT / folder}:/app/{folder}:rw") for volume in trainer_volumes), folder
    assert f"{ROOT / 'configs'}:/app/configs:ro" in trainer_volumes


def test_compose_healthcheck_targets_readyz(default_config):
    healthcheck = default_config["services"]["search"]["healthcheck"]

    assert healthcheck["test"][0] == "CMD"
    assert "http://127.0.0.1:8000/readyz" in " ".join(healthcheck["test"])
    assert "retries" in healthcheck
    assert "start_period" in healthcheck


def test_compose_index_job(default_config):
    index = default_config["services"]["index"]

    assert index["entrypoint"] == ["/app/scripts/ensure-index.sh"]
    assert index["environment"]["IDML_CATALOG_MANIFEST"] == "/app/demo/catalog.csv"
    assert "restart" not in index
    assert (ROOT / "scripts" / "ensure-index.sh").stat().st_mode & 0o111, "ensure-index.sh is not executable"
    assert (ROOT / "demo" / "catalog.csv").is_file(), "the image's default manifest demo/catalog.csv is missing"


def test_compose_trainer_on_demand(default_config):
    trainer = default_config["services"]["trainer"]

    assert trainer["profiles"] == ["train"]
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert trainer["user"] == "1000:1000"


def test_compose_read_key_required_passthrough(tmp_path):
    config = run_compose_config(tmp_path, IDML_READ_KEY_REQUIRED="true", IDML_API_KEY="k" * 32)

    assert config["services"]["search"]["environment"]["IDML_READ_KEY_REQUIRED"] == "true"


@pytest.mark.parametrize(
    ("dockerfile", "mode", "entrypoint"),
    [
        (SERVICE_DOCKERFILE, "--serve", "idml-serve"),
        (TRAINER_DOCKERFILE, "--train", "idml-train"),
    ],
)
def test_dockerfile_installs_through_script(dockerfile, mode, entrypoint):
    instructions = dockerfile_instructions(dockerfile)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]

    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(f"scripts/install.sh {mode}" in run for run in runs), runs
    assert not any("pip install" in run for run in runs), "packages must come from scripts/install.sh"
    environment = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    assert "VENV=/opt/venv" in environment
    assert "PATH=/opt/venv/bin:$PATH" in environment
    assert users, "the image must switch to an unprivileged user"
    assert users[-1] not in ("root", "0")
    assert json.loads(entrypoints[-1]) == [entrypoint]


def test_service_dockerfile_has_no_torch():
    text = " ".join(f"{keyword} {arguments}" for keyword, arguments in dockerfile_instructions(SERVICE_DOCKERFILE))

    assert "--train" not in text
    assert "--all" not in text
    assert "torch" not in text.lower()


def test_trainer_dockerfile_has_emoji_tools():
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions(TRAINER_DOCKERFILE) if keyword == "RUN")

    assert re.search(r"apt-get install .*librsvg2-bin", runs)
    assert re.search(r"apt-get install .*\bnpm\b", runs)


def test_dockerignore_excludes_local_state():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}

    for pattern in (".git", ".venv", "data/", "runs/", "var/", "models/"):
        assert pattern in patterns, pattern


class _ReadinessHandler(BaseHTTPRequestHandler):
    ready = True

    def do_GET(self):  # noqa: N802 (http.server's method name)
        status = 200 if self.path == "/readyz" and self.ready else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


@pytest.fixture()
def readiness_server():
    handler = type("Handler", (_ReadinessHandler,), {"ready": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def healthcheck_command() -> list[str]:
    """The service image's HEALTHCHECK command, as the exec-form JSON list in the Dockerfile."""
    for keyword, arguments in dockerfile_instructions(SERVICE_DOCKERFILE):
        if keyword == "HEALTHCHECK":
            _, _, command = arguments.partition(" CMD ")
            return json.loads(command)
    raise AssertionError("service.Dockerfile has no HEALTHCHECK")


def test_dockerfile_healthcheck_follows_readyz(readiness_server):
    server, handler = readiness_server
    command = healthcheck_command()
    assert command[0] == "python"
    command = [sys.executable, *command[1:]]
    env = {**os.environ, "IDML_PORT": str(server.server_address[1])}

    ready = subprocess.run(command, env=env, capture_output=True, timeout=30)
    handler.ready = False
    not_ready = subprocess.run(command, env=env, capture_output=True, timeout=30)

    assert ready.returncode == 0, ready.stderr
    assert not_ready.returncode != 0
