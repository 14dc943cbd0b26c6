"""Sharded embedding: embed a large image list on several machines, then merge into one catalog.

    idml-index embed-shard  --bundle DIR (--folder PATH | --manifest CSV) --shard I --num-shards N --out FILE
    idml-index merge-shards --bundle DIR --index DIR FILE [FILE ...]

`embed-shard` embeds rows [I n / N, (I + 1) n / N) of the n images that the
folder or manifest lists (in `index.sources` order) and writes a shard file:
an `.npz` archive, readable without pickle, with

    header          JSON text: format_version, model_id, shard, num_shards,
                    listing_digest, listing_size, embedding_dim, uncertainty_dim,
                    failures ([path, reason, message] for images that were not embedded)
    ids             str (n,)
    embeddings      float32 (n, d), L2-normalised
    uncertainties   float32 (n, du) uncertainty embeddings
    labels          str (n,), with has_label bool (n,) telling a missing label from ""
    attributes      str (n,), JSON objects
    paths           str (n,), absolute paths of the originals
    content_hashes  str (n,), sha256 hex of each original's bytes when it was embedded

`merge-shards` checks that every shard comes from the bundle's model and from
the same listing. It then reads each original again from its path, because
the catalog stores originals content-addressed. An original whose sha256 no
longer matches is left out, and the rest go through `Catalog.add_embedded`.
Shards decode and preprocess images as `idml-index build` does, so the merged
catalog has the vectors a single build would give.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.bundle import ModelBundle, load_bundle
from index.catalog import Catalog
from index.faiss_backend import SPEC_KINDS, IndexSpec
from index.imaging import ImageDecodeError, decode_image
from index.originals import content_hash
from index.preprocess import PreprocessSpec, preprocess_image
from index.sources import ImageSource, read_manifest, scan_folder

logger = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
COMMANDS = ("embed-shard", "merge-shards")
# Originals read into memory at a time while merging.
MERGE_CHUNK = 256
DECODE_THREADS = 4


class ShardError(ValueError):
    """A shard request or file that cannot be used; the message names the file and the fix."""


@dataclass
class Shard:
    """The contents of one shard file (see the module docstring for the fields)."""

    model_id: str
    shard: int
    num_shards: int
    listing_digest: str  # sha256 of the (id, path) list that all shards of one job split
    listing_size: int  # images in that whole list
    ids: list[str]
    embeddings: np.ndarray  # float32 (n, d)
    uncertainties: np.ndarray  # float32 (n, du)
    labels: list[str | None]
    attributes: list[dict]
    paths: list[str]
    content_hashes: list[str]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, message)

    def __len__(self) -> int:
        return len(self.ids)


def shard_rows(total: int, shard: int, num_shards: int) -> range:
    """Positions [shard * total / num_shards, (shard + 1) * total / num_shards) of a list of `total` images."""
    if num_shards < 1:
        raise ShardError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ShardError(f"--shard {shard} is outside 0..{num_shards - 1} for --num-shards {num_shards}")
    return range(shard * total // num_shards, (shard + 1) * total // num_shards)


def listing_digest(sources: Sequence[ImageSource]) -> str:
    """sha256 hex of the ordered (id, path) pairs, so that merge can tell shards of different listings apart."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(json.dumps([source.id, str(source.path)]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _prepare(data: bytes, spec: PreprocessSpec) -> np.ndarray | ImageDecodeError:
    # The catalog's own decoding for `add_images`: draft decoding at the resize side, then preprocess.
    try:
        decoded = decode_image(data, draft_size=spec.resize)
    except ImageDecodeError as error:
        return error
    return preprocess_image(decoded.image, spec)


def embed_shard(
    sources: Sequence[ImageSource],
    bundle: ModelBundle,
    embedder: Any,
    *,
    shard: int,
    num_shards: int,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Shard:
    """Embed this shard's rows of `sources` with `embedder` (an `index.embedder.Embedder` of `bundle`).

    Unreadable or undecodable images are left out and listed in `Shard.failures`.

    Raises:
        ShardError: an invalid shard number, or an embedder of another model.
    """
    if batch_size < 1:
        raise ShardError(f"--batch-size must be at least 1, got {batch_size}")
    if embedder.bundle.model_id != bundle.model_id:
        raise ShardError(
            f"the embedder runs model {embedder.bundle.model_id}, but the shard is for model {bundle.model_id}"
        )
    rows = shard_rows(len(sources), shard, num_shards)
    mine = [sources[position] for position in rows]
    spec = bundle.preprocess
    result = Shard(
        model_id=bundle.model_id, shard=shard, num_shards=num_shards, listing_digest=listing_digest(sources),
        listing_size=len(sources), ids=[], embeddings=np.zeros((0, bundle.manifest.outputs.embedding_dim), np.float32),
        uncertainties=np.zeros((0, bundle.manifest.outputs.uncertainty_dim), np.float32), labels=[],
        attributes=[], paths=[], content_hashes=[],
    )
    embeddings: list[np.ndarray] = []
    uncertainties: list[np.ndarray] = []
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="idml-shard-decode") as pool:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            contents: list[bytes | None] = []
            for source in batch:
                try:
                    contents.append(source.path.read_bytes())
                except OSError as error:
                    contents.append(None)
                    result.failures.append(
                        (str(source.path), "unreadable", f"cannot read the file: {error.strerror or error}")
                    )
            prepared = list(pool.map(lambda data: None if data is None else _prepare(data, spec), contents))
            arrays = []
            for source, data, array in zip(batch, contents, prepared):
                if data is None:
                    continue
                if isinstance(array, ImageDecodeError):
                    result.failures.append((str(source.path), array.reason, str(array)))
                    continue
                arrays.append(array)
                result.ids.append(source.id)
                result.labels.append(source.label)
                result.attributes.append(dict(source.attributes))
                result.paths.append(str(source.path.resolve()))
                result.content_hashes.append(content_hash(data))
            if arrays:
                embedded = embedder.embed(np.stack(arrays))
                embeddings.append(embedded.embedding)
                uncertainties.append(embedded.uncertainty)
            if progress is not None:
                progress(min(start + batch_size, len(mine)), len(mine))
    if embeddings:
        result.embeddings = np.concatenate(embeddings).astype(np.float32, copy=False)
        result.uncertainties = np.concatenate(uncertainties).astype(np.float32, copy=False)
    return result


def write_shard(shard: Shard, path: str | Path) -> Path:
    """Write `shard` to `path` (.npz) atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": SHARD_FORMAT_VERSION,
        "model_id": shard.model_id,
        "shard": shard.shard,
        "num_shards": shard.num_shards,
        "listing_digest": shard.listing_digest,
        "listing_size": shard.listing_size,
        "embedding_dim": int(shard.embeddings.shape[1]),
        "uncertainty_dim": int(shard.uncertainties.shape[1]),
        "failures": [list(failure) for failure in shard.failures],
    }
    arrays = {
        "header": np.array(json.dumps(header)),
        "ids": np.array(shard.ids, dtype=np.str_),
        "embeddings": shard.embeddings.astype(np.float32, copy=False),
        "uncertainties": shard.uncertainties.astype(np.float32, copy=False),
        "labels": np.array([label or "" for label in shard.labels], dtype=np.str_),
        "has_label": np.array([label is not None for label in shard.labels], dtype=bool),
        "attributes": np.array([json.dumps(value, sort_keys=True) for value in shard.attributes], dtype=np.str_),
        "paths": np.array(shard.paths, dtype=np.str_),
        "content_hashes": np.array(shard.content_hashes, dtype=np.str_),
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_shard(path: str | Path) -> Shard:
    """Read a shard file written by `write_shard`.

    Raises:
        ShardError: the file is missing, not a shard file, of another format
            version, or has arrays whose lengths disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise ShardError(f"shard file {path} cannot be read: {error}") from None
    required = ("header", "ids", "embeddings", "uncertainties", "labels", "has_label", "attributes", "paths",
                "content_hashes")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ShardError(f"{path} is not a shard file of `idml-index embed-shard` (missing {', '.join(missing)})")
    try:
        header = json.loads(str(arrays["header"]))
        version = header.get("format_version")
        if version != SHARD_FORMAT_VERSION:
            raise ShardError(
                f"shard file {path} has format_version {version}; this version reads {SHARD_FORMAT_VERSION}"
            )
        total = len(arrays["ids"])
        for name in required[1:]:
            if len(arrays[name]) != total:
                raise ShardError(f"shard file {path}: {name} has {len(arrays[name])} rows, ids has {total}")
        return Shard(
            model_id=str(header["model_id"]),
            shard=int(header["shard"]),
            num_shards=int(header["num_shards"]),
            listing_digest=str(header["listing_digest"]),
            listing_size=int(header["listing_size"]),
            ids=[str(value) for value in arrays["ids"]],
            embeddings=arrays["embeddings"].astype(np.float32, copy=False),
            uncertainties=arrays["uncertainties"].astype(np.float32, copy=False),
            labels=[str(label) if has else None for label, has in zip(arrays["labels"], arrays["has_label"])],
            attributes=[json.loads(str(value)) for value in arrays["attributes"]],
            paths=[str(value) for value in arrays["paths"]],
            content_hashes=[str(value) for value in arrays["content_hashes"]],
            failures=[tuple(failure) for failure in header.get("failures", [])],
        )
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ShardError(f"shard file {path} has an invalid header or attributes: {error}") from None


def check_shards(shards: Sequence[tuple[Path, Shard]], model_id: str, *, allow_missing: bool = False) -> None:
    """Check that the shards come from model `model_id` and together form one complete job.

    Raises:
        ShardError: a shard of another model, shards of different listings or
            shard counts, a shard given twice, or (unless `allow_missing`)
            shards missing from the job. The message names the files.
    """
    if not shards:
        raise ShardError("no shard files given")
    for path, shard in shards:
        if shard.model_id != model_id:
            raise ShardError(
                f"shard file {path} was embedded with model {shard.model_id}, but the bundle and catalog use "
                f"model {model_id}; embed the shard again with the catalog's bundle"
            )
    first_path, first = shards[0]
    seen: dict[int, Path] = {}
    for path, shard in shards:
        if (shard.listing_digest, shard.num_shards) != (first.listing_digest, first.num_shards):
            raise ShardError(
                f"shard files {first_path} and {path} split different image lists or shard counts "
                f"({first.num_shards} and {shard.num_shards} shards); merge shards of one embed-shard job"
            )
        if shard.shard in seen:
            raise ShardError(f"shard {shard.shard} is given twice: {seen[shard.shard]} and {path}")
        seen[shard.shard] = path
    missing = sorted(set(range(first.num_shards)) - set(seen))
    if missing and not allow_missing:
        raise ShardError(
            f"shards {missing} of {first.num_shards} are missing; pass every shard file of the job, "
            "or --allow-missing to merge these now and the rest later"
        )


def merge_shards(
    catalog: Catalog,
    shards: Sequence[tuple[Path, Shard]],
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[Counter[str], list[tuple[str, str, str]]]:
    """Add every shard's items to `catalog`, reading each original again from its path.

    An original that cannot be read, or whose sha256 differs from the one
    recorded when it was embedded, is left out. `progress(n)` is called with
    the number of items handled since the last call.

    Returns:
        (counts of "added", "replaced" and "error" outcomes, failures as (path or id, reason, message)).
    """
    counts: Counter[str] = Counter()
    failures: list[tuple[str, str, str]] = []
    for shard_path, shard in shards:
        logger.info("merging shard %d of %d from %s: %d items", shard.shard, shard.num_shards, shard_path, len(shard))
        for start in range(0, len(shard), MERGE_CHUNK):
            positions, images = [], []
            for position in range(start, min(start + MERGE_CHUNK, len(shard))):
                path = shard.paths[position]
                try:
                    data = Path(path).read_bytes()
                except OSError as error:
                    failures.append((path, "unreadable", f"cannot read the original: {error.strerror or error}"))
                    continue
                if content_hash(data) != shard.content_hashes[position]:
                    failures.append((path, "changed", "the file changed after it was embedded; embed its shard again"))
                    continue
                positions.append(position)
                images.append(data)
            counts["error"] += (min(start + MERGE_CHUNK, len(shard)) - start) - len(positions)
            if positions:
                outcomes = catalog.add_embedded(
                    [shard.ids[position] for position in positions],
                    shard.embeddings[positions],
                    shard.uncertainties[positions],
                    labels=[shard.labels[position] for position in positions],
                    attributes=[shard.attributes[position] for position in positions],
                    images=images,
                    model_id=shard.model_id,
                )
                for outcome in outcomes:
                    counts[outcome.status] += 1
                    if outcome.status == "error":
                        failures.append((outcome.id, outcome.reason or "error", outcome.error or ""))
            if progress is not None:
                progress(min(start + MERGE_CHUNK, len(shard)) - start)
    return counts, failures


# Command line ----------------------------------------------------------------


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add the embed-shard and merge-shards subcommands to `idml-index`."""
    embed = commands.add_parser("embed-shard", help="embed one shard of a folder or manifest into a shard file")
    embed.add_argument("--bundle", required=True, type=Path, help="model bundle folder")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="image folder; class subfolders give labels")
    source.add_argument("--manifest", type=Path, help="CSV with a path column and optional id, label, attributes")
    embed.add_argument("--shard", required=True, type=int, help="this shard's number, 0 .. --num-shards - 1")
    embed.add_argument("--num-shards", required=True, type=int, help="number of shards the image list is split into")
    embed.add_argument("--out", required=True, type=Path, help="shard file to write (.npz)")
    embed.add_argument("--batch-size", type=int, default=32, help="images per model run (default 32)")
    embed.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0 = all cores)")
    embed.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    merge = commands.add_parser("merge-shards", help="add shard files into a catalog, storing their originals")
    merge.add_argument("--bundle", required=True, type=Path, help="model bundle folder the shards were embedded with")
    merge.add_argument("--index", required=True, type=Path, help="catalog folder; created if needed")
    merge.add_argument("shards", nargs="+", type=Path, help="shard files of `idml-index embed-shard`")
    merge.add_argument("--index-kind", choices=SPEC_KINDS, help="vector index kind (default auto)")
    merge.add_argument("--allow-missing", action="store_true",
                       help="merge even when some shards of the job are not given")
    merge.add_argument("--errors", type=Path, help="write every item left out to this CSV")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_command(args: argparse.Namespace) -> int:
    """Run embed-shard or merge-shards; returns the exit status (1 when every image failed)."""
    if args.command == "embed-shard":
        return _run_embed(args)
    return _run_merge(args)


def _run_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from index.embedder import Embedder

    sources = scan_folder(args.folder) if args.folder else read_manifest(args.manifest)
    rows = shard_rows(len(sources), args.shard, args.num_shards)
    bundle = load_bundle(args.bundle)
    # Images are decoded beside the model, so onnxruntime's threads sleep between runs (spin=False).
    embedder = Embedder(bundle, intra_op_threads=args.threads, max_batch=max(args.batch_size, 1), spin=False)
    started = time.perf_counter()
    bar = tqdm(total=len(rows), unit="img", disable=args.no_progress, file=sys.stderr)

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    shard = embed_shard(sources, bundle, embedder, shard=args.shard, num_shards=args.num_shards,
                        batch_size=args.batch_size, progress=advance)
    bar.close()
    write_shard(shard, args.out)
    seconds = time.perf_counter() - started
    _print_failures(shard.failures)
    print(
        f"shard {args.shard} of {args.num_shards}: embedded {len(shard)}, failed {len(shard.failures)} "
        f"of {len(rows)} images in {seconds:.1f} s; wrote {args.out}"
    )
    return 1 if rows and not len(shard) else 0


def _run_merge(args: argparse.Namespace) -> int:
    import csv

    from tqdm import tqdm

    bundle = load_bundle(args.bundle)
    shards = [(path, read_shard(path)) for path in args.shards]
    check_shards(shards, bundle.model_id, allow_missing=args.allow_missing)
    spec = IndexSpec(kind=args.index_kind) if args.index_kind else None
    started = time.perf_counter()
    total = sum(len(shard) for _, shard in shards)
    with Catalog.open(args.index, bundle, index_spec=spec, create=True) as catalog:
        bar = tqdm(total=total, unit="item", disable=args.no_progress, file=sys.stderr)
        counts, failures = merge_shards(catalog, shards, progress=bar.update)
        bar.close()
        count = catalog.count()
    _print_failures(failures)
    if args.errors:
        with open(args.errors, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason", "message"])
            writer.writerows(failures)
    print(
        f"merged {len(shards)} shards: added {counts['added']}, replaced {counts['replaced']}, "
        f"failed {counts['error']} of {total} items in {time.perf_counter() - started:.1f} s; "
        f"catalog has {count} items"
    )
    return 1 if total and counts["error"] == total else 0


def _print_failures(failures: Sequence[tuple[str, str, str]], limit: int = 20) -> None:
    for path, reason, message in failures[:limit]:
        print(f"skipped {path}: {reason}: {message}", file=sys.stderr)
    if len(failures) > limit:
        print(f"... and {len(failures) - limit} more skipped files", file=sys.stderr)
