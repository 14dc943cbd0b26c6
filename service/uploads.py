"""Read POST /index uploads: item metadata from multipart fields, and archives with a manifest.csv.

A multipart form carries one of two things. Either several `images` files
come with metadata aligned by position: repeated `ids`, `labels` and
`attributes` fields, or one `items` JSON list. Or one `archive` file (zip,
tar, tar.gz, tar.bz2 or tar.xz) contains a `manifest.csv` with the columns
`path`, `id`, optional `label`, and one column per attribute. Problems with the request as a whole raise ApiError. A problem
with one item, such as a file too large or a path missing from the archive,
becomes that item's error, and the other items are indexed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from pydantic import TypeAdapter, ValidationError

from index.fsync import fsync_dir, fsync_file
from service.errors import ApiError
from service.jobs import SpooledItem
from service.schemas.indexing import ItemFields

MANIFEST_NAME = "manifest.csv"
# Size of the manifest.csv an archive may carry, bytes.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024

_ITEM_LIST = TypeAdapter(list[ItemFields])


def _problems(error: ValidationError, prefix: str) -> str:
    parts = []
    for problem in error.errors():
        location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem.get("loc", ()))
        parts.append(f"{prefix}{location}: {problem.get('msg', 'invalid value')}")
    return "; ".join(parts)


def check_unique_ids(items: list[ItemFields], where: str) -> None:
    seen: set[str] = set()
    duplicates = []
    for item in items:
        if item.id in seen and item.id not in duplicates:
            duplicates.append(item.id)
        seen.add(item.id)
    if duplicates:
        listed = ", ".join(repr(item_id) for item_id in duplicates[:5])
        raise ApiError(422, "duplicate_ids", f"{where} repeats item ids {listed}; every item needs its own id")


def item_fields_from_form(
    ids: list[str], labels: list[str], attributes: list[str], items_json: list[str], count: int
) -> list[ItemFields]:
    """Metadata of `count` uploaded images from the multipart text fields, aligned by position."""
    if items_json and (ids or labels or attributes):
        raise ApiError(
            422, "invalid_request", "send either one 'items' JSON field or 'ids'/'labels'/'attributes' fields, not both"
        )
    if items_json:
        if len(items_json) != 1:
            raise ApiError(422, "invalid_request", f"send one 'items' field, got {len(items_json)}")
        try:
            records = json.loads(items_json[0])
        except json.JSONDecodeError as error:
            raise ApiError(400, "invalid_json", f"items is not valid JSON: {error.msg} at position {error.pos}") from None
        if not isinstance(records, list):
            raise ApiError(422, "invalid_request", "items must be a JSON list of {id, label, attributes} objects")
        try:
            fields = _ITEM_LIST.validate_python(records)
        except ValidationError as error:
            raise ApiError(422, "invalid_request", _problems(error, "items")) from None
        if len(fields) != count:
            raise ApiError(
                422, "invalid_request", f"items has {len(fields)} entries but {count} images were sent; align them by position"
            )
        check_unique_ids(fields, "the request")
        return fields

    if len(ids) != count:
        raise ApiError(
            422,
            "missing_field" if not ids else "invalid_request",
            f"{count} images need {count} 'ids' fields (one per image, in the same order), got {len(ids)}",
        )
    for name, values in (("labels", labels), ("attributes", attributes)):
        if values and len(values) != count:
            raise ApiError(
                422, "invalid_request", f"'{name}' has {len(values)} fields but {count} images were sent; send none or one per image"
            )
    records = []
    for position, item_id in enumerate(ids):
        record: dict = {"id": item_id}
        if labels and labels[position] != "":
            record["label"] = labels[position]
        if attributes and attributes[position] != "":
            try:
                record["attributes"] = json.loads(attributes[position])
            except json.JSONDecodeError as error:
                raise ApiError(
                    400, "invalid_json", f"attributes[{position}] is not valid JSON: {error.msg} at position {error.pos}"
                ) from None
        records.append(record)
    try:
        fields = _ITEM_LIST.validate_python(records)
    except ValidationError as error:
        raise ApiError(422, "invalid_request", _problems(error, "items")) from None
    check_unique_ids(fields, "the request")
    return fields


def spool_file(source: BinaryIO, target: Path, limit: int) -> int | None:
    """Copy `source` to `target` and fsync it; returns the size, or None (and no file) when it exceeds `limit` bytes."""
    written = 0
    with open(target, "wb") as handle:
        while chunk := source.read(_COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                break
            handle.write(chunk)
        handle.flush()
        if written <= limit:
            os.fsync(handle.fileno())
    if written > limit:
        target.unlink()
        return None
    return written


def spool_images(
    folder: Path, files: list[BinaryIO], fields: list[ItemFields], max_item_bytes: int
) -> list[SpooledItem]:
    """Copy uploaded image files into the job folder, one file per position."""
    items = []
    for position, (source, meta) in enumerate(zip(files, fields)):
        name = f"{position:07d}"
        source.seek(0)
        size = spool_file(source, folder / name, max_item_bytes)
        if size is None:
            items.append(_too_large(meta, max_item_bytes))
        else:
            items.append(SpooledItem(meta.id, meta.label, dict(meta.attributes), file=name))
    fsync_dir(folder)
    return items


def _too_large(meta: ItemFields, limit: int) -> SpooledItem:
    return SpooledItem(
        meta.id,
        meta.label,
        dict(meta.attributes),
        error_reason="too_large",
        error=f"the image is larger than {limit} bytes (IDML_MAX_UPLOAD_BYTES)",
    )


@dataclass
class _Member:
    name: str  # normalised path inside the archive
    size: int
    open: Callable[[], BinaryIO]  # opens the member for reading


class _Archive:
    """Regular-file members of a zip or tar archive, read in archive order."""

    def __init__(self, path: Path):
        self.path = path
        if zipfile.is_zipfile(path):
            self.kind = "zip"
        elif tarfile.is_tarfile(path):
            self.kind = "tar"
        else:
            raise ApiError(
                415,
                "unsupported_archive",
                "archive is neither a zip nor a tar file (tar, tar.gz, tar.bz2, tar.xz are accepted)",
            )

    def members(self) -> Iterator[_Member]:
        try:
            if self.kind == "zip":
                with zipfile.ZipFile(self.path) as archive:
                    for info in archive.infolist():
                        if not info.is_dir():
                            yield _Member(_normalise(info.filename), info.file_size, lambda info=info: archive.open(info))
            else:
                with tarfile.open(self.path, "r:*") as archive:
                    for info in archive:
                        if info.isfile():
                            yield _Member(_normalise(info.name), info.size, lambda info=info: archive.extractfile(info))
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
            raise ApiError(422, "corrupt_archive", f"archive cannot be read: {error}") from None


def _normalise(name: str) -> str:
    name = name.replace("\\", "/")
    normalised = posixpath.normpath(name.lstrip("/"))
    return "" if normalised == "." else normalised


def _read_manifest(archive: _Archive) -> tuple[str, bytes]:
    """Find manifest.csv (at the root, or the only one in the archive); returns (its folder, its bytes)."""
    found: list[tuple[str, bytes]] = []
    for member in archive.members():
        if posixpath.basename(member.name) != MANIFEST_NAME:
            continue
        if member.size > MAX_MANIFEST_BYTES:
            raise ApiError(413, "too_large", f"{member.name} is larger than {MAX_MANIFEST_BYTES} bytes")
        with member.open() as handle:
            found.append((posixpath.dirname(member.name), handle.read(MAX_MANIFEST_BYTES + 1)))
    root = [entry for entry in found if entry[0] == ""]
    if root:
        return root[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ApiError(
            422,
            "missing_manifest",
            f"the archive has no {MANIFEST_NAME}; add one with the columns path,id[,label][,attribute columns...]",
        )
    raise ApiError(
        422,
        "invalid_manifest",
        f"the archive has {len(found)} {MANIFEST_NAME} files in subfolders and none at the root; keep one",
    )


def parse_manifest(data: bytes, max_items: int) -> list[tuple[str, ItemFields]]:
    """Rows of manifest.csv as (path, metadata); attribute cells left empty are omitted."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ApiError(422, "invalid_manifest", f"{MANIFEST_NAME} is not UTF-8 text: {error}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    missing = [name for name in ("path", "id") if name not in columns]
    if missing:
        raise ApiError(
            422,
            "invalid_manifest",
            f"{MANIFEST_NAME} lacks the column(s) {', '.join(missing)}; its header is {','.join(columns) or '(empty)'}",
        )
    attribute_columns = [name for name in columns if name not in ("path", "id", "label") and name]

    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if len(rows) >= max_items:
                raise ApiError(
                    413, "too_many_items", f"{MANIFEST_NAME} has more than {max_items} rows (IDML_MAX_INDEX_ITEMS)"
                )
            if None in row:
                raise ApiError(422, "invalid_manifest", f"{MANIFEST_NAME} line {line} has more cells than the header")

            record = {
                "id": row["id"],
                "label": (row.get("label") or None),
                "attributes": {name: row[name] for name in attribute_columns if row.get(name)},
            }
            try:
                fields = ItemFields.model_validate(record)
            except ValidationError as error:
                raise ApiError(422, "invalid_manifest", _problems(error, f"{MANIFEST_NAME} line {line}: ")) from None

            path = (row.get("path") or "").strip()
            if not path:
                raise ApiError(422, "invalid_manifest", f"{MANIFEST_NAME} line {line}: path is empty")
            rows.append((path, fields))
    except csv.Error as error:
        raise ApiError(422, "invalid_manifest", f"{MANIFEST_NAME} is not valid CSV: {error}") from None

    if not rows:
        raise ApiError(422, "invalid_manifest", f"{MANIFEST_NAME} has a header but no rows")
    check_unique_ids([fields for _, fields in rows], MANIFEST_NAME)
    return rows


def spool_archive(
    archive_path: Path, folder: Path, *, max_items: int, max_item_bytes: int, max_total_bytes: int
) -> list[SpooledItem]:
    """Extract the images that manifest.csv lists into the job folder, one file per row.

    Members are looked up by the manifest's paths only, so names such as
    `../x` are never written anywhere. A row whose file is missing or larger
    than `max_item_bytes` gets an item error. Extracting more than
    `max_total_bytes` in all (a decompression bomb) rejects the archive with 413.
    """
    archive = _Archive(archive_path)
    base, manifest = _read_manifest(archive)
    rows = parse_manifest(manifest, max_items)

    requested_paths: dict[str, list[int]] = {}
    for position, (path, _) in enumerate(rows):
        requested_paths.setdefault(_normalise(posixpath.join(base, path)), []).append(position)
    results: list[SpooledItem | None] = [None] * len(rows)
    extracted = 0
    for member in archive.members():
        positions = requested_paths.pop(member.name, None)
        if positions is None:
            continue
        first = positions[0]
        name = f"{first:07d}"
        if member.size > max_item_bytes:
            size = None
        else:
            with member.open() as source:
                size = spool_file(source, folder / name, max_item_bytes)
        for position in positions:
            meta = rows[position][1]
            if size is None:
                results[position] = _too_large(meta, max_item_bytes)
                continue
            if position != first:
                shutil.copyfile(folder / name, folder / f"{position:07d}")
                fsync_file(folder / f"{position:07d}")
            results[position] = SpooledItem(meta.id, meta.label, dict(meta.attributes), file=f"{position:07d}")
        extracted += (size or 0) * len(positions)
        if extracted > max_total_bytes:
            raise ApiError(
                413,
                "too_large",
                f"the archive's images add up to more than {max_total_bytes} bytes (IDML_MAX_INDEX_UPLOAD_BYTES)",
            )
    for position, item in enumerate(results):
        if item is None:
            path, meta = rows[position]
            results[position] = SpooledItem(
                meta.id,
                meta.label,
                dict(meta.attributes),
                error_reason="missing_file",
                error=f"{path} is listed in {MANIFEST_NAME} but is not a file in the archive",
            )
    fsync_dir(folder)
    return results
