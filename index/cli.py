"""`idml-index`: build and maintain a catalog from the command line.

    idml-index build   --bundle DIR --index DIR (--folder PATH | --manifest CSV)
    idml-index add     --bundle DIR --index DIR (--folder PATH | --manifest CSV)
    idml-index delete  --index DIR ID [ID ...] | --ids-file FILE
    idml-index stats   --index DIR
    idml-index reembed --index DIR --bundle NEW_DIR
    idml-index verify  --index DIR
    idml-index embed-shard  --bundle DIR (--folder PATH | --manifest CSV) --shard I --num-shards N --out FILE
    idml-index merge-shards --bundle DIR --index DIR FILE [FILE ...]

Exit status: 0 on success (also when some images were skipped), 1 when
`verify` finds problems or every image of a build, shard or merge failed, 2 on
invalid input.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from index import shards
from index.bundle import BundleError, load_bundle
from index.catalog import Catalog, CatalogError, CatalogLockedError, ItemInput, ItemOutcome
from index.faiss_backend import SPEC_KINDS, IndexSpec
from index.sources import ImageSource, SourceError, iter_chunks, read_manifest, scan_folder

logger = logging.getLogger(__name__)

# Images read into memory at a time; each chunk is added in batches of --batch-size.
READ_CHUNK = 512


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idml-index", description="Build and maintain an image catalog.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, text in (("build", "create the catalog if needed and add images"),
                       ("add", "add images to an existing catalog")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--bundle", required=True, type=Path, help="model bundle folder")
        command.add_argument("--index", required=True, type=Path, help="catalog folder")
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--folder", type=Path, help="image folder; class subfolders give labels")
        source.add_argument("--manifest", type=Path, help="CSV with a path column and optional id, label, attributes")
        command.add_argument("--batch-size", type=int, default=32, help="images per model run and commit (default 32)")
        command.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0 = all cores)")
        command.add_argument("--errors", type=Path, help="write every failed file to this CSV")
        command.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        if name == "build":
            command.add_argument("--index-kind", choices=SPEC_KINDS, help="vector index kind (default auto)")

    delete = commands.add_parser("delete", help="delete items by id")
    delete.add_argument("--index", required=True, type=Path, help="catalog folder")
    delete.add_argument("ids", nargs="*", help="item ids")
    delete.add_argument("--ids-file", type=Path, help="file with one id per line")

    stats = commands.add_parser("stats", help="print counts, model and index as JSON")
    stats.add_argument("--index", required=True, type=Path, help="catalog folder")

    reembed = commands.add_parser("reembed", help="embed every original again with a new bundle")
    reembed.add_argument("--index", required=True, type=Path, help="catalog folder")
    reembed.add_argument("--bundle", required=True, type=Path, help="new model bundle folder")
    reembed.add_argument("--batch-size", type=int, default=32, help="images per model run (default 32)")
    reembed.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0 = all cores)")
    reembed.add_argument("--drop-failed", action="store_true",
                         help="leave out items whose original is missing or undecodable instead of stopping")
    reembed.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    verify = commands.add_parser("verify", help="check that vectors, metadata and originals agree")
    verify.add_argument("--index", required=True, type=Path, help="catalog folder")
    verify.add_argument("--no-content", action="store_true", help="skip rehashing every original")
    shards.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("build", "add"):
            return _add(args)
        if args.command == "delete":
            return _delete(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "reembed":
            return _reembed(args)
        if args.command in shards.COMMANDS:
            return shards.run_command(args)
        return _verify(args)
    except (CatalogError, BundleError, SourceError, ValueError) as error:
        print(f"idml-index {args.command}: {error}", file=sys.stderr)
        return 2


def _add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from index.embedder import Embedder

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    sources = scan_folder(args.folder) if args.folder else read_manifest(args.manifest)
    bundle = load_bundle(args.bundle)
    spec = IndexSpec(kind=args.index_kind) if getattr(args, "index_kind", None) else None
    # Images are decoded beside the model, so onnxruntime's threads sleep between runs (spin=False).
    embedder = Embedder(bundle, intra_op_threads=args.threads, max_batch=max(args.batch_size, 1), spin=False)
    counts: Counter[str] = Counter()
    failures: list[tuple[str, str, str]] = []  # (path, reason, message)
    started = time.perf_counter()
    with Catalog.open(args.index, bundle, index_spec=spec, create=args.command == "build") as catalog:
        bar = tqdm(total=len(sources), unit="img", disable=args.no_progress, file=sys.stderr)
        for chunk in iter_chunks(sources, READ_CHUNK):
            inputs, unread = _read_images(chunk)
            for source, reason, message in unread:
                failures.append((str(source.path), reason, message))
                counts["error"] += 1
            bar.update(len(unread))
            done_before = 0

            def advance(done: int, total: int) -> None:
                nonlocal done_before
                bar.update(done - done_before)
                done_before = done

            outcomes = catalog.add_images(inputs, embedder, batch_size=args.batch_size, progress=advance)
            by_id = {source.id: source for source in chunk}
            for outcome in outcomes:
                counts[outcome.status] += 1
                if outcome.status == "error":
                    failures.append(_failure_row(outcome, by_id))
        bar.close()
        count = catalog.count()
    seconds = time.perf_counter() - started
    processed = sum(counts.values())
    for path, reason, message in failures[:20]:
        print(f"skipped {path}: {reason}: {message}", file=sys.stderr)
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more skipped files", file=sys.stderr)
    if args.errors:
        with open(args.errors, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason", "message"])
            writer.writerows(failures)
    rate = processed / seconds if seconds > 0 else 0.0
    print(
        f"added {counts['added']}, replaced {counts['replaced']}, failed {counts['error']} "
        f"of {processed} images in {seconds:.1f} s ({rate:.1f} images/s); catalog has {count} items"
    )
    return 1 if processed and counts["error"] == processed else 0


def _read_images(chunk: list[ImageSource]) -> tuple[list[ItemInput], list[tuple[ImageSource, str, str]]]:
    inputs, unread = [], []
    for source in chunk:
        try:
            data = source.path.read_bytes()
        except OSError as error:
            unread.append((source, "unreadable", f"cannot read the file: {error.strerror or error}"))
            continue
        inputs.append(ItemInput(id=source.id, image=data, label=source.label, attributes=dict(source.attributes)))
    return inputs, unread


def _failure_row(outcome: ItemOutcome, by_id: dict[str, ImageSource]) -> tuple[str, str, str]:
    source = by_id.get(outcome.id)
    where = str(source.path) if source else outcome.id
    return where, outcome.reason or "error", outcome.error or ""


def _delete(args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if args.ids_file:
        ids += [line.strip() for line in args.ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise ValueError("no ids given; pass ids as arguments or --ids-file FILE")
    with Catalog.open(args.index, None, create=False) as catalog:
        deleted = catalog.delete(ids)
        count = catalog.count()
    print(f"deleted {deleted} of {len(ids)} ids; catalog has {count} items")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with Catalog.open(args.index, None, create=False, read_only=True) as catalog:
        print(json.dumps(catalog.stats(), indent=2))
    return 0


def _reembed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from index.embedder import Embedder

    bundle = load_bundle(args.bundle)
    # Images are decoded beside the model, so onnxruntime's threads sleep between runs (spin=False).
    embedder = Embedder(bundle, intra_op_threads=args.threads, max_batch=max(args.batch_size, 1), spin=False)
    started = time.perf_counter()
    with Catalog.open(args.index, None, create=False) as catalog:
        previous = catalog.model_id
        bar = tqdm(total=catalog.count(), unit="img", disable=args.no_progress, file=sys.stderr)

        def advance(done: int, total: int) -> None:
            bar.update(done - bar.n)

        catalog.reembed(bundle, embedder, progress=advance, batch_size=args.batch_size, drop_failed=args.drop_failed)
        bar.close()
        count = catalog.count()
    print(f"re-embedded {count} items from model {previous} to {bundle.model_id} in {time.perf_counter() - started:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        catalog = Catalog.open(args.index, None, create=False)
    except CatalogLockedError as error:
        logger.warning("%s; verifying a read-only view of the committed state", error)
        catalog = Catalog.open(args.index, None, create=False, read_only=True)
    with catalog:
        report = catalog.verify(check_content=not args.no_content)
    for problem in report.problems:
        subject = f" {problem.id}" if problem.id else ""
        print(f"{problem.kind}{subject}: {problem.detail}")
    print(
        f"{report.items} items, {report.vectors} vectors, {report.originals} originals: "
        + ("ok" if report.ok else f"{len(report.problems)} problems")
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
