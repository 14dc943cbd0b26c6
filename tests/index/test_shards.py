"""Sharded embedding: `idml-index embed-shard` and `merge-shards` against a single `idml-index build`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index.catalog import Catalog
from index.cli import main
from index.metadata import MetadataStore
from index.shards import read_shard, shard_rows, write_shard
from tests.bundle_factory import make_image_bytes

VECTOR_TOLERANCE = 1e-6  # absolute, float32 vectors from the same ONNX graph in different batches
NUM_SHARDS = 3


@pytest.fixture
def manifest(tmp_path) -> Path:
    """A manifest of 10 images (ids, labels, one attribute column), one of them truncated."""
    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["path,id,label,colour"]
    for seed in range(10):
        name = f"{seed}.png" if seed % 3 else f"{seed}.jpg"
        data = make_image_bytes(seed, image_format="PNG" if seed % 3 else "JPEG")
        if seed == 7:
            data = data[:60]
        (folder / name).write_bytes(data)
        colour = "red" if seed % 2 else ""
        label = "" if seed == 4 else f"class{seed % 4}"
        lines.append(f"images/{name},item-{seed},{label},{colour}")
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _catalog_rows(index: Path) -> dict[str, object]:
    generation = json.loads((index / "catalog.json").read_text())["generation"]
    store = MetadataStore(index / f"gen-{generation:06d}" / "catalog.sqlite3", read_only=True)
    try:
        return {row.id: row for row in store.iter_rows_with_embeddings()}
    finally:
        store.close()


def _embed_shards(bundle, manifest: Path, out: Path, *extra: str) -> list[Path]:
    paths = []
    for shard in range(NUM_SHARDS):
        path = out / f"shard_{shard}.npz"
        code = main(["embed-shard", "--bundle", str(bundle.path), "--manifest", str(manifest), "--shard", str(shard),
                     "--num-shards", str(NUM_SHARDS), "--out", str(path), "--no-progress", *extra])
        assert code == 0
        paths.append(path)
    return paths


def test_merged_shards_equal_single_build(tmp_path, tiny_bundle, manifest, capsys):
    single = tmp_path / "single"
    assert main(["build", "--bundle", str(tiny_bundle.path), "--index", str(single), "--manifest", str(manifest),
                 "--no-progress", "--batch-size", "4"]) == 0
    shard_files = _embed_shards(tiny_bundle, manifest, tmp_path / "shards", "--batch-size", "2")
    capsys.readouterr()

    merged = tmp_path / "merged"
    errors = tmp_path / "errors.csv"
    code = main(["merge-shards", "--bundle", str(tiny_bundle.path), "--index", str(merged), "--no-progress",
                 "--errors", str(errors), *map(str, shard_files)])

    assert code == 0
    assert "added 9, replaced 0, failed 0 of 9 items" in capsys.readouterr().out
    expected, got = _catalog_rows(single), _catalog_rows(merged)
    assert sorted(got) == sorted(expected)
    assert len(got) == 9
    assert "item-7" not in got  # the truncated image fails in both
    for item_id, row in expected.items():
        other = got[item_id]
        np.testing.assert_allclose(other.embedding, row.embedding, atol=VECTOR_TOLERANCE, err_msg=item_id)
        assert other.uncertainty == pytest.approx(row.uncertainty, abs=VECTOR_TOLERANCE), item_id
        assert other.label == row.label, item_id
        assert other.attributes == row.attributes, item_id
        assert other.content_hash == row.content_hash, item_id
        assert other.media_type == row.media_type, item_id
    assert got["item-4"].label is None
    assert got["item-1"].attributes == {"colour": "red"}
    with Catalog.open(merged, tiny_bundle) as catalog:
        assert catalog.count() == 9
        assert catalog.original_path("item-3").read_bytes() == (manifest.parent / "images" / "3.jpg").read_bytes()
        assert catalog.verify().ok


def test_shard_records_failures_and_rows(tmp_path, tiny_bundle, manifest, capsys):
    shard_files = _embed_shards(tiny_bundle, manifest, tmp_path)
    shards = [read_shard(path) for path in shard_files]

    assert [len(shard) + len(shard.failures) for shard in shards] == [len(shard_rows(10, i, 3)) for i in range(3)]
    assert [shard.ids for shard in shards] == [
        ["item-0", "item-1", "item-2"], ["item-3", "item-4", "item-5"], ["item-6", "item-8", "item-9"],
    ]
    (failure,) = shards[2].failures
    assert failure[0].endswith("7.png")
    assert failure[1] == "truncated"
    assert shards[0].embeddings.dtype == np.float32
    assert shards[0].embeddings.shape == (3, 16)
    assert shards[0].uncertainties.shape == (3, 8)
    assert "failed 1 of 4 images" in capsys.readouterr().out


def test_merge_rejects_shard_of_other_model(tmp_path, tiny_bundle, other_bundle, manifest, capsys):
    good = _embed_shards(tiny_bundle, manifest, tmp_path / "good")
    foreign = tmp_path / "foreign.npz"
    assert main(["embed-shard", "--bundle", str(other_bundle.path), "--manifest", str(manifest), "--shard", "1",
                 "--num-shards", "3", "--out", str(foreign), "--no-progress"]) == 0
    capsys.readouterr()

    code = main(["merge-shards", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--no-progress", str(good[0]), str(foreign), str(good[2])])

    assert code == 2
    message = capsys.readouterr().err
    assert "foreign.npz" in message
    assert other_bundle.model_id in message
    assert tiny_bundle.model_id in message
    assert not (tmp_path / "catalog").exists()


def test_merge_rejects_incomplete_or_mixed_jobs(tmp_path, tiny_bundle, manifest, capsys):
    files = _embed_shards(tiny_bundle, manifest, tmp_path)
    catalog = str(tmp_path / "catalog")
    arguments = ["merge-shards", "--bundle", str(tiny_bundle.path), "--index", catalog, "--no-progress"]

    assert main([*arguments, str(files[0]), str(files[2])]) == 2
    assert "shards [1] of 3 are missing" in capsys.readouterr().err
    assert main([*arguments, str(files[0]), str(files[0]), str(files[1]), str(files[2])]) == 2
    assert "shard 0 is given twice" in capsys.readouterr().err

    other_split = tmp_path / "two.npz"
    assert main(["embed-shard", "--bundle", str(tiny_bundle.path), "--manifest", str(manifest), "--shard", "0",
                 "--num-shards", "2", "--out", str(other_split), "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*arguments, str(files[0]), str(other_split)]) == 2
    assert "split different image lists or shard counts" in capsys.readouterr().err

    # --allow-missing merges part of a job now and the rest later.
    assert main([*arguments, "--allow-missing", str(files[0])]) == 0
    assert main([*arguments, "--allow-missing", str(files[1]), str(files[2])]) == 0
    with Catalog.open(catalog, tiny_bundle) as opened:
        assert opened.count() == 9


def test_merge_skips_changed_original(tmp_path, tiny_bundle, manifest, capsys):
    files = _embed_shards(tiny_bundle, manifest, tmp_path)
    (manifest.parent / "images" / "1.png").write_bytes(make_image_bytes(100))
    (manifest.parent / "images" / "2.png").unlink()

    code = main(["merge-shards", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--no-progress", *map(str, files)])

    assert code == 0
    output = capsys.readouterr()
    assert "added 7, replaced 0, failed 2 of 9 items" in output.out
    assert "1.png: changed: the file changed after it was embedded" in output.err
    assert "2.png: unreadable" in output.err
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as catalog:
        assert catalog.get("item-1") is None
        assert catalog.get("item-0") is not None


def test_embed_shard_rejects_bad_numbers(tmp_path, tiny_bundle, manifest, capsys):
    base = ["embed-shard", "--bundle", str(tiny_bundle.path), "--manifest", str(manifest),
            "--out", str(tmp_path / "s.npz"), "--no-progress"]
    assert main([*base, "--shard", "3", "--num-shards", "3"]) == 2
    assert "--shard 3 is outside 0..2" in capsys.readouterr().err
    assert main([*base, "--shard", "0", "--num-shards", "0"]) == 2
    assert "--num-shards must be at least 1" in capsys.readouterr().err


def test_read_shard_rejects_other_files(tmp_path, tiny_bundle, manifest):
    from index.shards import ShardError

    stray = tmp_path / "stray.npz"
    np.savez(stray, vectors=np.zeros((2, 3)))
    with pytest.raises(ShardError, match="is not a shard file"):
        read_shard(stray)
    with pytest.raises(ShardError, match="does not exist"):
        read_shard(tmp_path / "missing.npz")

    (path,) = _embed_shards_one(tiny_bundle, manifest, tmp_path)
    shard = read_shard(path)
    shard.ids = shard.ids[:1]
    write_shard(shard, tmp_path / "broken.npz")
    with pytest.raises(ShardError, match="embeddings has 3 rows, ids has 1"):
        read_shard(tmp_path / "broken.npz")


def _embed_shards_one(bundle, manifest: Path, out: Path) -> list[Path]:
    path = out / "only.npz"
    assert main(["embed-shard", "--bundle", str(bundle.path), "--manifest", str(manifest), "--shard", "0",
                 "--num-shards", "3", "--out", str(path), "--no-progress"]) == 0
    return [path]
