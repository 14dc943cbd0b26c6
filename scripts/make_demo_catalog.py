"""Copy a small demo catalog out of the emoji benchmark's test classes.

Usage: python scripts/make_demo_catalog.py [--emoji-root data/emoji] [--out demo] [--classes 100] [--seed 0]

Writes ``<out>/catalog/<class>/<vendor>.png``, the manifest ``<out>/catalog.csv``
(columns path,label,id,vendor,name; paths relative to ``<out>``) and
``<out>/LICENSE.md`` with the attribution and licence text of every vendor.
Build the benchmark first with scripts/fetch_emoji_dataset.py.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.emoji import (  # noqa: E402
    MAX_SIDE,
    OPENMOJI_RENDER_SIZE,
    VENDORS,
    read_classes_csv,
)

logger = logging.getLogger("make_demo_catalog")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emoji-root", type=Path, default=Path("data/emoji"), help="emoji benchmark folder (default: data/emoji)")
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    parser.add_argument("--classes", type=int, default=100, help="number of test classes to copy (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class draw (default: 0)")
    return parser.parse_args(argv)


def license_markdown(emoji_root: Path) -> str:
    """Return LICENSE.md: attribution per vendor, then the full licence texts from ``emoji_root/LICENSES``."""
    lines = [
        "# Demo catalog: attribution and licences",
        "",
        "The images under `catalog/` are emoji drawn by four vendors, copied from the emoji",
        "benchmark that `scripts/fetch_emoji_dataset.py` builds from npm packages. They are",
        "not covered by this repository's Apache-2.0 licence; each vendor's images keep their",
        "own licence, below. `catalog.csv` names the vendor of every image.",
        "",
        "Changes made to every image: converted to RGBA PNG; images larger than",
        f"{MAX_SIDE} px on a side were downscaled with Lanczos resampling to {MAX_SIDE} px;",
        f"OpenMoji SVGs were rendered with rsvg-convert to {OPENMOJI_RENDER_SIZE} x {OPENMOJI_RENDER_SIZE} px.",
        "",
    ]
    for source in VENDORS:
        files = [entry[1] for entry in source.license_files] or ["fluent-MIT.txt"]
        lines += [
            f"## {source.vendor} (`catalog/*/{source.vendor}.png`)",
            "",
            f"- Source: npm package `{source.package}` {source.version}, {source.homepage}",
            f"- Licence: {source.license_id}",
            f"- Copyright: {source.copyright}",
            f"- Licence statement: {source.license_note}",
            "- Licence texts: " + ", ".join(f"[{name}](#{name.lower().replace('.', '')})" for name in files),
            "",
        ]
        if source.vendor == "openmoji":
            lines += [
                "All emojis designed by [OpenMoji](https://openmoji.org/) – the open-source emoji and",
                "icon project. License: [CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/).",
                "",
                "Share-alike: the rendered OpenMoji PNGs here are adaptations of the OpenMoji graphics",
                "and are licensed under CC BY-SA 4.0 as well. If you share them or your own",
                "adaptations of them, you must do so under CC BY-SA 4.0 (or a licence that Creative",
                "Commons lists as compatible), keep this attribution and indicate your changes.",
                "",
            ]
        if source.vendor == "twitter":
            lines += [
                "Twemoji graphics by Twitter, Inc and other contributors, licensed under",
                "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).",
                "",
            ]

    lines += ["# Licence texts", ""]
    for path in sorted((emoji_root / "LICENSES").glob("*.txt")):
        lines += [f"## {path.name}", "", "```text", path.read_text(encoding="utf-8").rstrip("\n"), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    classes_csv = args.emoji_root / "classes.csv"
    if not classes_csv.is_file() or not (args.emoji_root / "READY").is_file():
        print(
            f"error: {args.emoji_root} is not a complete emoji benchmark (classes.csv or READY missing); "
            "build it first with python scripts/fetch_emoji_dataset.py",
            file=sys.stderr,
        )
        return 1

    test_classes = [item for item in read_classes_csv(classes_csv) if item.split == "test"]
    if not 1 <= args.classes <= len(test_classes):
        print(f"error: --classes must be between 1 and {len(test_classes)}, got {args.classes}", file=sys.stderr)
        return 2
    chosen = sorted(random.Random(args.seed).sample(test_classes, args.classes), key=lambda item: item.name)

    catalog_dir = args.out / "catalog"
    if catalog_dir.exists():
        shutil.rmtree(catalog_dir)  # drop classes of an earlier draw
    rows = []
    for item in chosen:
        for source in VENDORS:
            relative = Path("catalog") / item.name / f"{source.vendor}.png"
            (args.out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.emoji_root / "test" / item.name / f"{source.vendor}.png", args.out / relative)
            rows.append([relative.as_posix(), item.name, f"{item.name}-{source.vendor}", source.vendor, item.title])

    with (args.out / "catalog.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "id", "vendor", "name"])
        writer.writerows(rows)
    (args.out / "LICENSE.md").write_text(license_markdown(args.emoji_root), encoding="utf-8")

    total_bytes = sum(path.stat().st_size for path in catalog_dir.rglob("*.png"))
    print(f"{args.out}: {len(chosen)} classes, {len(rows)} images, {total_bytes / 1e6:.2f} MB of PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
