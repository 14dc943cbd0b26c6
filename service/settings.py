"""Service configuration from `IDML_*` environment variables, validated at start-up.

`idml-serve` options override the environment. Every field below is read
from the variable `IDML_<FIELD NAME IN CAPITALS>`; for example `max_batch` is
`IDML_MAX_BATCH`. An invalid value stops the start with a message naming the
variable (see `describe_validation_error`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.imaging import DEFAULT_MAX_PIXELS

ENV_PREFIX = "IDML_"
MIN_API_KEY_LENGTH = 16
MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything `idml-serve` and `app_factory` need, one comment per field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Model bundle folder with model.onnx and model.json.
    bundle: Path
    # Catalog folder; created empty when it does not exist and create_index is true.
    index: Path
    # Create an empty catalog at `index` when there is none.
    create_index: bool = True
    # FAISS index kind; None keeps the catalog's stored kind ("auto" for a new catalog: flat, then HNSW, then IVF-PQ
    # as it grows). A kind different from the stored one rebuilds the vector index at start-up.
    index_kind: Literal["auto", "flat", "hnsw", "ivf_sq8", "ivf_pq"] | None = None

    # Address uvicorn binds. The default serves this machine only.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # uvicorn worker processes; each loads its own model and catalog. With more than one, the first to take the
    # catalog's lock writes, and the others follow its commits and forward writes to it (service/workers.py).
    workers: int = Field(default=1, ge=1, le=64)
    # Threads per worker for onnxruntime intra-op and FAISS OpenMP; None: CPU count // workers.
    threads: int | None = Field(default=None, ge=1, le=256)
    # Threads per worker that decode and preprocess images; None: same as `threads`, at least 2.
    decode_threads: int | None = Field(default=None, ge=1, le=256)
    # Seconds uvicorn waits for open connections at shutdown; 0 waits without limit. The index job step in
    # progress is always finished.
    graceful_shutdown_s: float = Field(default=30.0, ge=0.0, le=3600.0)

    # Key for writes (and reads when read_key_required); sent as X-API-Key or Authorization: Bearer.
    api_key: SecretStr | None = None
    # Require the API key for reads too (search, items, stats, jobs, metrics).
    read_key_required: bool = False
    # Allow writes without a key when no api_key is set; for local demos only.
    allow_unauthenticated_writes: bool = False

    # Largest request body for /search and every other route except /index, bytes.
    max_upload_bytes: int = Field(default=20 * MIB, ge=1024, le=1024 * MIB)
    # Largest request body for POST /index (several images or one archive), bytes.
    max_index_upload_bytes: int = Field(default=1024 * MIB, ge=1024, le=64 * 1024 * MIB)
    # Largest image, in pixels, that is decoded; larger ones get 413 before decoding.
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1024, le=1_000_000_000)

    # How long the micro-batcher waits for announced /search requests to join a model call, ms.
    batch_window_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    # Most queries embedded in one model call.
    max_batch: int = Field(default=16, ge=1, le=1024)
    # Serve the usual multipart POST /search without FastAPI's per-request machinery (service/fastpath.py);
    # false sends every request through the FastAPI route, with the same results.
    search_fast_path: bool = True
    # Upper bound of the `candidates` search parameter.
    max_candidates: int = Field(default=1000, ge=1, le=10_000)  # the catalog searches at most 10,000 per query

    # POST /index requests with at most this many images (and no archive) run inline and return 200.
    inline_index_max_items: int = Field(default=16, ge=0, le=10_000)
    # Maximum items in one POST /index request.
    max_index_items: int = Field(default=10_000, ge=1, le=1_000_000)
    # Items embedded and stored per job step; shutdown waits for the step in progress.
    job_batch_size: int = Field(default=32, ge=1, le=4096)
    # Run index jobs in this process; false accepts jobs and leaves them for the next start with it true.
    run_jobs: bool = True

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per line; "text": key=value lines.
    log_format: Literal["json", "text"] = "json"

    @field_validator("api_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"the API key must have at least {MIN_API_KEY_LENGTH} characters; "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("bundle")
    @classmethod
    def _bundle_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model bundle folder {value} does not exist")
        return value

    @field_validator("index")
    @classmethod
    def _index_is_folder(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"catalog path {value} exists but is not a folder")
        return value

    @model_validator(mode="after")
    def _read_key_needs_key(self) -> "Settings":
        if self.read_key_required and self.api_key is None:
            raise ValueError(
                f"{ENV_PREFIX}READ_KEY_REQUIRED is true but {ENV_PREFIX}API_KEY is not set; "
                "set a key or turn read_key_required off"
            )
        if not self.create_index and not self.index.is_dir():
            raise ValueError(
                f"catalog folder {self.index} does not exist and {ENV_PREFIX}CREATE_INDEX is false"
            )
        return self

    @property
    def resolved_threads(self) -> int:
        """Threads per worker for onnxruntime and FAISS: `threads`, else CPU count // workers (at least 1)."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def resolved_decode_threads(self) -> int:
        """Threads per worker that decode and preprocess uploads."""
        if self.decode_threads is not None:
            return self.decode_threads
        return max(2, self.resolved_threads)

    @property
    def jobs_folder(self) -> Path:
        """Folder of the job table and spooled uploads, inside the catalog folder."""
        return self.index / "jobs"


def describe_validation_error(error: ValidationError) -> str:
    """Turn a settings ValidationError into lines that name the environment variable of each field."""
    lines = []
    for problem in error.errors():
        location = [str(part) for part in problem.get("loc", ())]
        message = problem.get("msg", "invalid value")
        message = message.removeprefix("Value error, ")
        if location:
            variable = ENV_PREFIX + location[0].upper()
            value = problem.get("input")
            # The API key is never echoed, and a dict input is the whole settings object.
            echoed_value = "" if isinstance(value, dict) or location[0] == "api_key" else f" (got {value!r})"
            lines.append(f"{variable}: {message}{echoed_value}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)
