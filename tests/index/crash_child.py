"""Child process for the durability tests: writes to a catalog until it is killed.

Usage: crash_child.py CATALOG BUNDLE LOG SEED MODE [OTHER_BUNDLE]

MODE "random": loops over adds, upserts, deletes and snapshots forever. Before
each operation it appends `begin OP id:version,...` to LOG and after the call
returns `ack OP id:version,...`; each line is written with one unbuffered
write, so it is in the file even when the process is killed right after.
MODE "script": one fixed sequence (add, upsert, delete, save, re-embed with
OTHER_BUNDLE) for the crash-point tests, which kill it at a named step.

Item vectors are derived from "id:version", so the parent can recompute them.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from index.bundle import load_bundle  # noqa: E402
from index.catalog import Catalog  # noqa: E402
from tests.bundle_factory import make_image_bytes  # noqa: E402

DIMENSION = 16


def vector_of(key: str) -> np.ndarray:
    """The unit vector float32 (16,) of an "id:version" key."""
    vector = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(DIMENSION).astype(np.float32)
    return vector / np.linalg.norm(vector)


def image_of(key: str) -> bytes:
    return make_image_bytes(zlib.crc32(key.encode()) % 1000, size=8)


def add(catalog: Catalog, log, keys: list[str]) -> None:
    joined = ",".join(keys)
    os.write(log, f"begin add {joined}\n".encode())
    outcomes = catalog.add_embedded(
        [key.split(":")[0] for key in keys],
        np.stack([vector_of(key) for key in keys]),
        np.full(len(keys), 0.25, np.float32),
        labels=[f"v{key.split(':')[1]}" for key in keys],
        images=[image_of(key) for key in keys],
    )
    if any(outcome.status == "error" for outcome in outcomes):
        raise RuntimeError(f"unexpected error outcomes {outcomes}")
    os.write(log, f"ack add {joined}\n".encode())


def delete(catalog: Catalog, log, ids: list[str]) -> None:
    joined = ",".join(ids)
    os.write(log, f"begin delete {joined}\n".encode())
    catalog.delete(ids)
    os.write(log, f"ack delete {joined}\n".encode())


def run_random(catalog: Catalog, log, seed: int) -> None:
    rng = np.random.default_rng(seed)
    live: dict[str, int] = {}  # id -> version, for the ids this child acknowledged
    serial = 0
    while True:
        choice = rng.random()
        if choice < 0.55 or not live:
            keys = [f"s{seed}-{serial + i}:0" for i in range(int(rng.integers(1, 12)))]
            serial += len(keys)
            add(catalog, log, keys)
            live.update({key.split(":")[0]: 0 for key in keys})
        elif choice < 0.7:
            chosen = list(rng.choice(sorted(live), size=min(3, len(live)), replace=False))
            keys = [f"{item_id}:{live[item_id] + 1}" for item_id in chosen]
            add(catalog, log, keys)
            live.update({item_id: live[item_id] + 1 for item_id in chosen})
        elif choice < 0.85:
            chosen = list(rng.choice(sorted(live), size=min(2, len(live)), replace=False))
            delete(catalog, log, chosen)
            for item_id in chosen:
                live.pop(item_id)
        else:
            os.write(log, b"begin save -\n")
            catalog.save()
            os.write(log, b"ack save -\n")


def run_script(catalog: Catalog, log, other_bundle: str) -> None:
    from index.embedder import Embedder

    add(catalog, log, [f"a{i}:0" for i in range(8)])
    add(catalog, log, ["a1:1", "a2:1", "b0:0"])
    delete(catalog, log, ["a3"])
    os.write(log, b"begin save -\n")
    catalog.save()
    os.write(log, b"ack save -\n")
    bundle = load_bundle(other_bundle)
    os.write(log, b"begin reembed -\n")
    catalog.reembed(bundle, Embedder(bundle))
    os.write(log, b"ack reembed -\n")


def main() -> None:
    catalog_path, bundle_path, log_path, seed, mode = sys.argv[1:6]
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # Snapshots every few changes, so kills also land inside snapshot writes.
    catalog = Catalog.open(catalog_path, load_bundle(bundle_path), snapshot_every=20)
    os.write(log, b"ready\n")
    if mode == "random":
        run_random(catalog, log, int(seed))
    else:
        run_script(catalog, log, sys.argv[6])
        catalog.close()
        os.write(log, b"done\n")


if __name__ == "__main__":
    main()
