"""`idml-index` run in-process through `main(argv)`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from index.catalog import Catalog
from index.cli import main
from tests.bundle_factory import make_image_bytes


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for label, seeds in (("cats", range(0, 4)), ("dogs", range(4, 7))):
        (root / label).mkdir(parents=True)
        for seed in seeds:
            (root / label / f"{seed}.png").write_bytes(make_image_bytes(seed))
    (root / "loose.jpg").write_bytes(make_image_bytes(9, image_format="JPEG"))
    (root / "dogs" / "broken.png").write_bytes(make_image_bytes(8)[:60])
    (root / "notes.txt").write_text("not an image, and not listed")
    return root


def test_build_from_folder_skips_corrupt_file(tmp_path, tiny_bundle, image_folder, capsys):
    index = tmp_path / "catalog"
    errors = tmp_path / "errors.csv"

    code = main(["build", "--bundle", str(tiny_bundle.path), "--index", str(index), "--folder", str(image_folder),
                 "--no-progress", "--batch-size", "3", "--errors", str(errors)])

    output = capsys.readouterr()
    assert code == 0
    assert "added 8, replaced 0, failed 1 of 9 images" in output.out
    assert "images/s" in output.out
    assert "broken.png: truncated" in output.err
    rows = list(csv.DictReader(errors.open()))
    assert [(row["path"].endswith("broken.png"), row["reason"]) for row in rows] == [(True, "truncated")]
    with Catalog.open(index, tiny_bundle) as catalog:
        assert catalog.get("cats/0.png").label == "cats"
        assert catalog.get("loose.jpg").label is None
        assert catalog.get("loose.jpg").media_type == "image/jpeg"
        assert catalog.count() == 8


def test_build_again_replaces(tmp_path, tiny_bundle, image_folder, capsys):
    arguments = ["build", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--folder", str(image_folder / "cats"), "--no-progress"]
    main(arguments)
    capsys.readouterr()

    assert main(arguments) == 0
    assert "added 0, replaced 4, failed 0" in capsys.readouterr().out


def test_build_from_manifest_with_attributes(tmp_path, tiny_bundle, image_folder, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,id,label,colour\n"
        f"{image_folder / 'cats' / '0.png'},first,cat,black\n"
        "images/dogs/4.png,,dog,\n"
        "images/missing.png,gone,dog,red\n"
    )

    code = main(["build", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--manifest", str(manifest), "--no-progress", "--index-kind", "flat"])

    output = capsys.readouterr()
    assert code == 0
    assert "added 2, replaced 0, failed 1" in output.out
    assert "missing.png: unreadable" in output.err
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as catalog:
        assert catalog.get("first").attributes == {"colour": "black"}
        assert catalog.get("images/dogs/4.png").attributes == {}
        assert catalog.get("images/dogs/4.png").label == "dog"


def test_manifest_without_path_column(tmp_path, tiny_bundle, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,label\na.png,x\n")

    code = main(["build", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--manifest", str(manifest), "--no-progress"])

    assert code == 2
    assert "no 'path' column" in capsys.readouterr().err


def test_add_needs_existing_catalog(tmp_path, tiny_bundle, image_folder, capsys):
    code = main(["add", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "none"),
                 "--folder", str(image_folder), "--no-progress"])

    assert code == 2
    assert "no catalog" in capsys.readouterr().err


def test_delete_stats_verify_reembed(tmp_path, tiny_bundle, other_bundle, image_folder, capsys):
    index = str(tmp_path / "catalog")
    main(["build", "--bundle", str(tiny_bundle.path), "--index", index, "--folder", str(image_folder), "--no-progress"])
    capsys.readouterr()

    assert main(["delete", "--index", index, "cats/0.png", "unknown"]) == 0
    assert "deleted 1 of 2 ids; catalog has 7 items" in capsys.readouterr().out

    assert main(["stats", "--index", index]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 7
    assert stats["model_id"] == tiny_bundle.model_id

    assert main(["verify", "--index", index]) == 0
    assert "7 items, 7 vectors, 7 originals: ok" in capsys.readouterr().out

    assert main(["reembed", "--index", index, "--bundle", str(other_bundle.path), "--no-progress"]) == 0
    assert other_bundle.model_id in capsys.readouterr().out
    assert main(["stats", "--index", index]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == other_bundle.model_id

    with Catalog.open(index, other_bundle) as catalog:
        catalog.original_path("cats/1.png").unlink()
    assert main(["verify", "--index", index]) == 1
    assert "missing_original cats/1.png" in capsys.readouterr().out


def test_build_with_mismatched_bundle(tmp_path, tiny_bundle, other_bundle, image_folder, capsys):
    index = str(tmp_path / "catalog")
    main(["build", "--bundle", str(tiny_bundle.path), "--index", index, "--folder", str(image_folder / "cats"), "--no-progress"])
    capsys.readouterr()

    code = main(["add", "--bundle", str(other_bundle.path), "--index", index, "--folder", str(image_folder), "--no-progress"])

    assert code == 2
    assert "idml-index reembed" in capsys.readouterr().err


DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.mark.skipif(not (DEMO / "catalog.csv").is_file(), reason="demo catalog not present")
def test_build_from_demo_manifest(tmp_path, tiny_bundle, capsys):
    lines = (DEMO / "catalog.csv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:41]
    manifest = tmp_path / "demo.csv"
    manifest.write_text("\n".join([header] + [f"{DEMO}/{row}" for row in rows]) + "\n", encoding="utf-8")

    code = main(["build", "--bundle", str(tiny_bundle.path), "--index", str(tmp_path / "catalog"),
                 "--manifest", str(manifest), "--no-progress"])

    assert code == 0
    assert f"added {len(rows)}, replaced 0, failed 0" in capsys.readouterr().out
    first = next(csv.DictReader([header, rows[0]]))
    with Catalog.open(tmp_path / "catalog", tiny_bundle) as catalog:
        item = catalog.get(first["id"])
        assert item.label == first["label"]
        assert item.attributes == {"vendor": first["vendor"], "name": first["name"]}
        query = np.zeros((1, 16), np.float32)
        query[0, 0] = 1.0
        found = catalog.search(query, 100, filter={"vendor": first["vendor"]})[0]
        assert found
        assert {c.item.attributes["vendor"] for c in found} == {first["vendor"]}
        assert catalog.verify().ok
