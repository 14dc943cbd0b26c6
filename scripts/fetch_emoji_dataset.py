"""Build the offline emoji benchmark under data/emoji (see training/data/emoji.py).

Usage: python scripts/fetch_emoji_dataset.py [--out data/emoji] [--cache data/npm-cache] [--seed 0]
Needs npm (to fetch four pinned packages) and rsvg-convert (librsvg2-bin).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.emoji import EmojiBuildError, build_emoji_dataset  # noqa: E402

logger = logging.getLogger("fetch_emoji_dataset")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/emoji"), help="output folder (default: data/emoji)")
    parser.add_argument(
        "--cache", type=Path, default=Path("data/npm-cache"), help="folder for the npm tarballs (default: data/npm-cache)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test class split (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="images converted at a time (default: 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def progress(iterable, total):
        return tqdm(iterable, total=total, desc="emoji images", unit="img")

    try:
        summary = build_emoji_dataset(args.out, args.cache, seed=args.seed, workers=args.workers, progress=progress)
    except EmojiBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
