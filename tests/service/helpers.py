"""Helpers of the service tests: test images, index requests and bundle variants."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from index.bundle import BundleManifest, ModelBundle, load_bundle, write_manifest

API_KEY = "test-key-0123456789abcdef"
WRITE_HEADERS = {"X-API-Key": API_KEY}


def image_bytes(seed: int, *, size: tuple[int, int] = (40, 40), fmt: str = "PNG", mode: str = "RGB", **save_args) -> bytes:
    """A seeded image of 4x4 random colour blocks encoded as `fmt`; distinct seeds embed far apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    width, height = size
    pixels = np.kron(blocks, np.ones((height // 4 + 1, width // 4 + 1, 1), np.uint8))[:height, :width]
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def index_request(client, entries: list[tuple[str, bytes, str | None, dict]], headers=WRITE_HEADERS):
    """POST /index with (id, image, label, attributes) entries in the `ids`/`labels`/`attributes` fields."""
    files = [("images", (f"{item_id}.png", data, "image/png")) for item_id, data, _, _ in entries]
    fields = {
        "ids": [item_id for item_id, _, _, _ in entries],
        "labels": [label or "" for _, _, label, _ in entries],
        "attributes": [json.dumps(attributes) for _, _, _, attributes in entries],
    }
    return client.post("/index", files=files, data=fields, headers=headers)


def bundle_variant(bundle: ModelBundle, folder: Path, **metric) -> ModelBundle:
    """A copy of `bundle` in `folder` with `metric` fields changed (same graph, so the same model id)."""
    shutil.copytree(bundle.path, folder)
    record = bundle.manifest.model_dump(mode="json")
    record["metric"].update(metric)
    write_manifest(folder, BundleManifest.model_validate(record))
    return load_bundle(folder)
