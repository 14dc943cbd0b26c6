"""`idml-serve`: run the search service under uvicorn.

Options override the IDML_* environment variables of the same name (see
`service.settings.Settings`). The API key is read from IDML_API_KEY only, so
it never shows in the process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from service.settings import ENV_PREFIX, Settings, describe_validation_error

logger = logging.getLogger("service.cli")

# Seconds an idle keep-alive connection stays open, and the largest request head for h11, bytes.
KEEP_ALIVE_TIMEOUT_S = 5
MAX_HEADER_BYTES = 16 * 1024

# Command-line options and the Settings field each one sets.
_OPTIONS = {
    "bundle": "model bundle folder (model.onnx + model.json)",
    "index": "catalog folder; created empty when missing unless IDML_CREATE_INDEX=false",
    "host": "address to bind (default 127.0.0.1: this machine only)",
    "port": "TCP port (default 8000)",
    "workers": "uvicorn worker processes (default 1)",
    "threads": "onnxruntime and FAISS threads per worker (default: CPU count // workers)",
    "decode_threads": "image decoding threads per worker (default: --threads, at least 2)",
    "batch_window_ms": "how long a query waits for concurrent queries to share a model call, ms (default 2)",
    "max_batch": "most queries per model call (default 16)",
    "max_upload_bytes": "largest /search request body and indexed image, bytes",
    "max_index_upload_bytes": "largest POST /index request body, bytes",
    "max_pixels": "largest image decoded, pixels",
    "index_kind": "FAISS index kind: auto, flat, hnsw, ivf_sq8 or ivf_pq (default: the catalog's own)",
    "log_level": "debug, info, warning or error (default info)",
    "log_format": "json or text (default json)",
}
_INTEGER_OPTIONS = {"port", "workers", "threads", "decode_threads", "max_batch", "max_upload_bytes",
                    "max_index_upload_bytes", "max_pixels"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idml-serve",
        description="Serve image similarity search over a catalog. Every option can also be set "
        f"with the environment variable {ENV_PREFIX}<OPTION> (for example {ENV_PREFIX}PORT); "
        f"the API key only with {ENV_PREFIX}API_KEY.",
    )
    for name, help_text in _OPTIONS.items():
        option_type = str
        if name in _INTEGER_OPTIONS:
            option_type = int
        elif name == "batch_window_ms":
            option_type = float
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=option_type, default=None, help=help_text)
    parser.add_argument(
        "--no-run-jobs", dest="run_jobs", action="store_false", default=None,
        help="accept index jobs but leave them for another process to run",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(f"idml-serve: {describe_validation_error(error)}", file=sys.stderr)
        return 2

    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    from index.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as error:
        logger.error("cannot serve: %s (%sBUNDLE=%s)", error, ENV_PREFIX, settings.bundle)
        return 2

    # Worker processes build their settings from the environment, so the options go there too.
    for name, value in overrides.items():
        os.environ[ENV_PREFIX + name.upper()] = str(value)
    # Libraries that read OpenMP's variable at import get the same per-worker share.
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.resolved_threads))

    logger.info(
        "starting idml-serve on http://%s:%d: model %s, catalog %s, %d worker(s) x %d threads",
        settings.host,
        settings.port,
        bundle.model_id,
        settings.index,
        settings.workers,
        settings.resolved_threads,
        extra={
            "model_id": bundle.model_id,
            "workers": settings.workers,
            "threads": settings.resolved_threads,
            "decode_threads": settings.resolved_decode_threads,
            "api_key_set": settings.api_key is not None,
            "read_key_required": settings.read_key_required,
        },
    )

    import uvicorn

    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        # An idle keep-alive connection is closed after this many seconds. uvicorn has no timeout
        # for a request whose headers arrive slowly, so a reverse proxy should front the server.
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        # Largest request line plus headers with the h11 protocol, bytes (httptools has its own).
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
