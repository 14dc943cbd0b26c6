"""Settings validation at start-up and the idml-serve command line."""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import ValidationError

from service.cli import main
from service.settings import Settings, describe_validation_error
from tests.service.helpers import API_KEY


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No IDML_* variables from the caller; the root logger's handlers restored after main() set up logging."""
    for name in list(os.environ):
        if name.startswith("IDML_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def settings_error(**values) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    return describe_validation_error(caught.value)


def test_settings_from_environment(monkeypatch, tiny_bundle, tmp_path):
    monkeypatch.setenv("IDML_BUNDLE", str(tiny_bundle.path))
    monkeypatch.setenv("IDML_INDEX", str(tmp_path / "catalog"))
    monkeypatch.setenv("IDML_PORT", "9123")
    monkeypatch.setenv("IDML_WORKERS", "2")
    monkeypatch.setenv("IDML_THREADS", "3")
    monkeypatch.setenv("IDML_API_KEY", API_KEY)
    settings = Settings()
    assert settings.port == 9123
    assert settings.resolved_threads == 3
    assert settings.workers == 2
    assert settings.api_key.get_secret_value() == API_KEY
    assert settings.host == "127.0.0.1"


def test_threads_default_to_share_of_cpus(monkeypatch, tiny_bundle, tmp_path):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    settings = Settings(bundle=tiny_bundle.path, index=tmp_path, workers=4)
    assert settings.resolved_threads == 4
    assert settings.resolved_decode_threads == 4


def test_invalid_port_names_variable(monkeypatch, tiny_bundle, tmp_path):
    monkeypatch.setenv("IDML_PORT", "eighty")
    message = settings_error(bundle=tiny_bundle.path, index=tmp_path)
    assert "IDML_PORT" in message
    assert "'eighty'" in message


def test_missing_bundle_names_variable(tmp_path):
    message = settings_error(bundle=tmp_path / "nope", index=tmp_path)
    assert "IDML_BUNDLE" in message
    assert "does not exist" in message


def test_short_api_key_rejected_without_echo(tiny_bundle, tmp_path):
    message = settings_error(bundle=tiny_bundle.path, index=tmp_path, api_key="short-secret")
    assert "IDML_API_KEY" in message
    assert "16 characters" in message
    assert "short-secret" not in message


def test_empty_api_key_means_none(tiny_bundle, tmp_path):
    assert Settings(bundle=tiny_bundle.path, index=tmp_path, api_key="").api_key is None


def test_read_key_required_needs_key(tiny_bundle, tmp_path):
    message = settings_error(bundle=tiny_bundle.path, index=tmp_path, read_key_required=True)
    assert "IDML_READ_KEY_REQUIRED" in message
    assert "IDML_API_KEY" in message


def test_batch_window_bounds(tiny_bundle, tmp_path):
    assert "IDML_BATCH_WINDOW_MS" in settings_error(bundle=tiny_bundle.path, index=tmp_path, batch_window_ms=-1)
    assert "IDML_MAX_BATCH" in settings_error(bundle=tiny_bundle.path, index=tmp_path, max_batch=0)


def test_cli_rejects_bad_environment(monkeypatch, tiny_bundle, tmp_path, capsys):
    monkeypatch.setenv("IDML_MAX_UPLOAD_BYTES", "-5")
    code = main(["--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog")])
    assert code == 2
    error = capsys.readouterr().err
    assert "IDML_MAX_UPLOAD_BYTES" in error
    assert "greater than or equal to 1024" in error


def test_cli_rejects_missing_bundle(tmp_path, capsys):
    assert main(["--bundle", str(tmp_path / "missing"), "--index", str(tmp_path / "catalog")]) == 2
    assert "IDML_BUNDLE" in capsys.readouterr().err


def test_cli_rejects_broken_bundle(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    assert main(["--bundle", str(broken), "--index", str(tmp_path / "catalog"), "--log-format", "text"]) == 2
    error = capsys.readouterr().err
    assert "is missing model.onnx" in error
    assert "IDML_BUNDLE" in error


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--bundle", "--index", "--workers", "--threads", "--batch-window-ms", "--max-batch"):
        assert option in text
