"""Emoji benchmark and demo catalog: matching, filters, builds from tiny tarballs, scripts."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from training.data.emoji import (
    VENDORS,
    EmojiBuildError,
    EmojiClass,
    build_emoji_dataset,
    drop_reason,
    fetch_package,
    normalize_sequence,
    split_classes,
)

REPO = Path(__file__).resolve().parents[2]
needs_rsvg = pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="rsvg-convert (librsvg2-bin) is not installed")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1F600", "1f600"),
        ("00AE-FE0F", "00ae"),
        ("ae-fe0f", "00ae"),
        ("2764-FE0F-200D-1F525", "2764-200d-1f525"),
        ("0023_fe0f_20e3", "0023-20e3"),
        ("E000-1F3FB", "e000-1f3fb"),
        ("FE0F", None),
        ("extra-icon", None),
        ("110000", None),
    ],
)
def test_normalize_sequence(text, expected):
    assert normalize_sequence(text) == expected


@pytest.mark.parametrize(
    ("name", "category", "reason"),
    [
        ("1f1fa-1f1f8", "Flags", "flag"),
        ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f", "Flags", "flag"),
        ("1f1e6-1f1e8", "Symbols", "flag"),
        ("1f3c1", "Flags", "flag"),
        ("1f44b-1f3fd", "People & Body", "skin tone"),
        ("1f3fb", "Component", "skin tone"),
        ("1f9b0", "Component", None),
        ("1f600", "Smileys & Emotion", None),
    ],
)
def test_drop_reason(name, category, reason):
    assert drop_reason(name, category) == reason


def test_split_classes_halves_and_repeats():
    classes = [EmojiClass(f"1f6{index:02x}", "face", "Smileys & Emotion") for index in range(11)]

    first = split_classes(classes, seed=0)
    again = split_classes(list(reversed(classes)), seed=0)

    assert first == again
    assert sum(item.split == "train" for item in first) == 5
    assert sum(item.split == "test" for item in first) == 6


def png_bytes(size: int, color: tuple[int, int, int, int], file_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), color).save(buffer, format=file_format)
    return buffer.getvalue()


def svg_bytes(color: str) -> bytes:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
        f'<circle cx="36" cy="36" r="30" fill="{color}"/></svg>'
    ).encode()


def write_tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


EMOJI_JSON = [
    {"unified": "1F600", "name": "GRINNING FACE", "category": "Smileys & Emotion", "image": "1f600.png"},
    {"unified": "1F601", "name": "BEAMING FACE", "category": "Smileys & Emotion", "image": "1f601.png"},
    {"unified": "1F602", "name": "FACE WITH TEARS OF JOY", "category": "Smileys & Emotion", "image": "1f602.png"},
    {"unified": "00AE-FE0F", "name": "REGISTERED SIGN", "category": "Symbols", "image": "00ae-fe0f.png"},
    {"unified": "2764-FE0F-200D-1F525", "name": "HEART ON FIRE", "category": "Smileys & Emotion",
     "image": "2764-fe0f-200d-1f525.png"},
    {"unified": "1F525", "name": "FIRE", "category": "Travel & Places", "image": "1f525.png"},
    {"unified": "1F1FA-1F1F8", "name": "US", "category": "Flags", "image": "1f1fa-1f1f8.png"},
    {"unified": "1F3FB", "name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "category": "Component", "image": "1f3fb.png"},
]
KEPT = {"1f600", "1f601", "1f602", "00ae", "2764-200d-1f525"}


@pytest.fixture
def tiny_cache(tmp_path) -> Path:
    """Write four tiny vendor tarballs, named as npm pack names them, into a cache folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    stems = [entry["image"][:-4] for entry in EMOJI_JSON]
    metadata = json.dumps(EMOJI_JSON).encode()
    for vendor, color in (("google", (200, 30, 30, 255)), ("twitter", (30, 200, 30, 255))):
        members = {"emoji.json": metadata, "LICENSE": b"MIT licence of emoji-data\n"}
        members |= {f"img/{vendor}/64/{stem}.png": png_bytes(64, color) for stem in stems}
        members[f"img/{vendor}/64/1f600-1f3fb.png"] = png_bytes(64, color)  # a skin-tone variant file
        write_tarball(cache / next(s for s in VENDORS if s.vendor == vendor).tarball_name, members)

    openmoji = {f"color/svg/{stem.upper()}.svg": svg_bytes("#f4a") for stem in stems}
    openmoji["color/svg/00AE.svg"] = svg_bytes("#00f")  # without FE0F: the FE0F file must win
    openmoji["color/svg/E000.svg"] = svg_bytes("#000")  # an OpenMoji extra, in no class
    openmoji["LICENSE.txt"] = b"Attribution-ShareAlike 4.0 International\n"
    write_tarball(cache / "openmoji-17.0.0.tgz", openmoji)

    fluent = {f"assets/{stem}.webp": png_bytes(200, (250, 200, 0, 255), "WEBP") for stem in stems if stem != "1f525"}
    fluent["assets/ae-fe0f.webp"] = fluent.pop("assets/00ae-fe0f.webp")  # fluent drops leading zeros
    write_tarball(cache / "lobehub-fluent-emoji-3d-1.1.0.tgz", fluent)
    return cache


def read_classes(out: Path) -> list[dict[str, str]]:
    with (out / "classes.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@needs_rsvg
def test_build_from_tiny_tarballs(tmp_path, tiny_cache):
    out = tmp_path / "emoji"

    summary = build_emoji_dataset(out, tiny_cache, seed=0, workers=2)

    rows = read_classes(out)
    assert {row["class"] for row in rows} == KEPT
    assert summary.classes == {"train": 2, "test": 3}
    assert summary.images == {"google": 5, "twitter": 5, "openmoji": 5, "fluent": 5}
    assert summary.dropped == {"flag": 1, "missing in fluent": 1, "skin tone": 1}
    assert summary.written == 20
    names = {row["class"]: row["name"] for row in rows}
    assert names["2764-200d-1f525"] == "heart on fire"

    sizes = {}
    for row in rows:
        for vendor in ("google", "twitter", "openmoji", "fluent"):
            image = Image.open(out / row["split"] / row["class"] / f"{vendor}.png")
            assert image.mode == "RGBA"
            sizes[vendor] = image.size
    assert sizes == {"google": (64, 64), "twitter": (64, 64), "openmoji": (128, 128), "fluent": (128, 128)}

    registered = Image.open(next(out.glob("*/00ae/openmoji.png"))).convert("RGB").getpixel((64, 64))
    assert registered == (255, 68, 170)  # the FE0F SVG (#f4a), not the plain one (#00f)

    ready = json.loads((out / "READY").read_text())
    assert ready["classes"] == {"train": 2, "test": 3}
    attribution = (out / "ATTRIBUTION.md").read_text()
    for source in VENDORS:
        assert source.package in attribution
        assert source.license_id in attribution
    licence_files = sorted(path.name for path in (out / "LICENSES").iterdir())
    assert licence_files == [
        "fluent-MIT.txt",
        "google-Apache-2.0.txt",
        "google-emoji-data-MIT.txt",
        "openmoji-CC-BY-SA-4.0.txt",
        "twitter-CC-BY-4.0.txt",
        "twitter-emoji-data-MIT.txt",
    ]


@needs_rsvg
def test_build_rerun_skips_and_new_seed_moves_classes(tmp_path, tiny_cache):
    out = tmp_path / "emoji"
    build_emoji_dataset(out, tiny_cache, seed=0)

    rerun = build_emoji_dataset(out, tiny_cache, seed=0)
    assert rerun.written == 0
    assert rerun.skipped == 20

    splits_by_seed = {}
    for seed in range(1, 6):
        build_emoji_dataset(out, tiny_cache, seed=seed)
        rows = read_classes(out)
        splits_by_seed[seed] = {row["class"]: row["split"] for row in rows}
        on_disk = {(path.parent.name, path.name) for path in out.glob("*/*") if path.is_dir()}
        assert on_disk == {(row["split"], row["class"]) for row in rows}
    assert len({tuple(sorted(split.items())) for split in splits_by_seed.values()}) > 1


def test_fetch_without_npm_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))

    with pytest.raises(EmojiBuildError, match="npm was not found"):
        fetch_package(VENDORS[0], tmp_path / "cache")


def test_corrupt_tarball_names_the_fix(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for source in VENDORS:
        (cache / source.tarball_name).write_bytes(b"not a gzip file")

    with pytest.raises(EmojiBuildError, match="delete the file"):
        build_emoji_dataset(tmp_path / "emoji", cache)



def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@needs_rsvg
def test_scripts_build_then_demo(tmp_path, tiny_cache, capsys):
    fetch = load_script("fetch_emoji_dataset")
    make_demo = load_script("make_demo_catalog")
    out = tmp_path / "emoji"

    assert fetch.main(["--out", str(out), "--cache", str(tiny_cache), "--seed", "0"]) == 0
    assert "images per vendor: google 5" in capsys.readouterr().out

    demo = tmp_path / "demo"
    assert make_demo.main(["--emoji-root", str(out), "--out", str(demo), "--classes", "2"]) == 0

    rows = read_rows(demo / "catalog.csv")
    assert list(rows[0]) == ["path", "label", "id", "vendor", "name"]
    assert len(rows) == 8
    test_classes = {row["class"] for row in read_rows(out / "classes.csv") if row["split"] == "test"}
    assert {row["label"] for row in rows} <= test_classes
    assert {row["label"] for row in rows} <= KEPT
    for row in rows:
        assert (demo / row["path"]).is_file()
        assert row["id"] == f"{row['label']}-{row['vendor']}"
    licence = (demo / "LICENSE.md").read_text()
    assert "CC BY-SA 4.0" in licence
    assert "Attribution-ShareAlike 4.0 International" in licence  # the licence text itself


def test_demo_script_rejects_missing_benchmark(tmp_path, capsys):
    make_demo = load_script("make_demo_catalog")

    assert make_demo.main(["--emoji-root", str(tmp_path / "none"), "--out", str(tmp_path / "demo")]) == 1
    assert "fetch_emoji_dataset.py" in capsys.readouterr().err


def test_committed_demo_catalog_matches_manifest():
    demo = REPO / "demo"
    rows = read_rows(demo / "catalog.csv")

    assert len(rows) == 400
    assert len({row["id"] for row in rows}) == 400
    assert len({row["label"] for row in rows}) == 100
    assert {row["vendor"] for row in rows} == {"google", "twitter", "openmoji", "fluent"}
    on_disk = {path.relative_to(demo).as_posix() for path in (demo / "catalog").rglob("*.png")}
    assert on_disk == {row["path"] for row in rows}
    for row in rows[::37]:
        with Image.open(demo / row["path"]) as image:
            assert max(image.size) <= 128
    assert (demo / "LICENSE.md").is_file()
