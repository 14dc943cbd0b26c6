"""Shared fixtures: tiny but real ONNX model bundles built without torch."""

from __future__ import annotations

import pytest

from index.bundle import ModelBundle
from tests.bundle_factory import make_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> ModelBundle:
    """Random-projection bundle: uint8 (n, 32, 32, 3) -> embedding (n, 16), uncertainty (n, 8), beta_form "sum"."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny", seed=0)


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory) -> ModelBundle:
    """Same shapes as `tiny_bundle` with other weights, so another model id."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "other", seed=1)


@pytest.fixture(scope="session")
def diff_bundle(tmp_path_factory) -> ModelBundle:
    """Like `tiny_bundle` but with beta_form "diff", so catalogs keep uncertainty vectors."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "diff", seed=2, beta_form="diff")
