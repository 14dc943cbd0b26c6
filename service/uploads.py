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
import logging
import lzma
import os
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import TypeAdapter, ValidationError

from index.fsync import fsync_dir
from service.errors import ApiError
from service.jobs import SpooledItem
from service.schemas.indexing import ItemFields
from service.validation import load_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
# Size of the manifest.csv an archive may carry, bytes: 10,000 rows of about 1.6 KB each.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Decompression bomb limits: while it is read, an archive may decompress to this many times its
# size, or to MIN_EXPANSION_BYTES if that is more, but never past IDML_MAX_INDEX_UPLOAD_BYTES.
MAX_COMPRESSION_RATIO = 100
MIN_EXPANSION_BYTES = 64 * 1024 * 1024
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
        records = load_json(items_json[0], "items")
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
            record["attributes"] = load_json(attributes[position], f"attributes[{position}]")
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
    size: int  # uncompressed size from the member's header, bytes; reads never return more
    info: zipfile.ZipInfo | tarfile.TarInfo


# Leading bytes of the formats `_Archive` reads; a file that starts with one but does not open is corrupt.
_ARCHIVE_MAGIC = {
    b"PK\x03\x04": "zip",
    b"PK\x05\x06": "zip",
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}
_TAR_MAGIC_OFFSET = 257  # "ustar" in the first tar header
# Errors raised while reading a damaged zip or tar stream.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError)
_TAR_ERRORS = (tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


def expansion_limit(archive_size: int, max_total_bytes: int) -> int:
    """Most bytes an archive of `archive_size` bytes may decompress to while it is read.

    MAX_COMPRESSION_RATIO times its size, at least MIN_EXPANSION_BYTES, at most `max_total_bytes`.
    Images are compressed already, so a real catalog archive stays near 1:1.
    """
    return min(max_total_bytes, max(MAX_COMPRESSION_RATIO * archive_size, MIN_EXPANSION_BYTES))


class _Archive:
    """Regular-file members of a zip or tar archive, listed from their headers without reading the data.

    Every read counts the member's size against `limit` bytes of decompressed data, and listing a
    compressed tar (which decompresses everything it skips) counts the bytes it passes.
    """

    def __init__(self, path: Path, limit: int, max_entries: int):
        self.path = path
        self.limit = limit
        self.max_entries = max_entries
        self.decompressed = 0
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
            except _ZIP_ERRORS as error:
                raise _corrupt(error) from None
        elif tarfile.is_tarfile(path):
            try:
                self._tar = tarfile.open(path, "r:*")
            except _TAR_ERRORS as error:
                raise _corrupt(error) from None
        else:
            kind = _sniff(path)
            if kind is not None:
                raise ApiError(
                    422,
                    "corrupt_archive",
                    f"archive starts like {kind} data but cannot be read as a zip or tar file; "
                    "it may be truncated, so upload it again",
                )
            raise ApiError(
                415,
                "unsupported_archive",
                "archive is neither a zip nor a tar file (tar, tar.gz, tar.bz2, tar.xz are accepted)",
            )
        try:
            self.members = self._list()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def _list(self) -> list[_Member]:
        members = []
        if self._zip is not None:
            # NOTE: ZipFile has parsed the whole central directory before this count, so a zip of many
            # tiny entries costs memory in proportion to its size (bounded by the upload limit).
            infos = self._zip.infolist()
            if len(infos) > self.max_entries:
                raise _too_many_entries(len(infos), self.max_entries)
            for info in infos:
                if not info.is_dir():
                    members.append(_Member(_normalise(info.filename), info.file_size, info))
            return members
        assert self._tar is not None
        count = 0
        try:
            while (info := self._tar.next()) is not None:
                count += 1
                if count > self.max_entries:
                    raise _too_many_entries(count, self.max_entries)
                # The next header is read after this member's data, which a compressed stream must decompress.
                end = info.offset_data + info.size
                if end > self.limit:
                    raise self._over_limit()
                self.decompressed = end
                if info.isfile():
                    members.append(_Member(_normalise(info.name), info.size, info))
        except _TAR_ERRORS as error:
            raise _corrupt(error) from None
        return members

    def _over_limit(self) -> ApiError:
        return ApiError(
            413,
            "too_large",
            f"the archive decompresses to more than {self.limit} bytes: at most {MAX_COMPRESSION_RATIO} times "
            f"its size, at least {MIN_EXPANSION_BYTES}, and no more than IDML_MAX_INDEX_UPLOAD_BYTES",
        )

    def read(self, member: _Member, limit: int) -> bytes:
        """The first `limit` bytes of `member`; raises ApiError 422 `corrupt_archive` when it cannot be read."""
        self._count(member)
        try:
            with self._open(member) as handle:
                return handle.read(limit)
        except (*_ZIP_ERRORS, *_TAR_ERRORS) as error:
            raise _corrupt(error, member.name) from None

    def extract(self, member: _Member, target: Path, limit: int) -> int | None:
        """Copy `member` to `target` like `spool_file`.

        A zip member that cannot be read raises `_UnreadableMember`, because the other members
        are still readable. A damaged tar stream raises ApiError 422 `corrupt_archive`.
        """
        self._count(member)
        try:
            with self._open(member) as source:
                return spool_file(source, target, limit)
        except (*_ZIP_ERRORS, *_TAR_ERRORS) as error:
            target.unlink(missing_ok=True)
            if self._zip is not None:
                if isinstance(error, RuntimeError) and "encrypted" in str(error):
                    # zipfile's message embeds the whole ZipInfo repr.
                    raise _UnreadableMember("it is encrypted, and password-protected archives are not supported") from None
                raise _UnreadableMember(str(error) or type(error).__name__) from None
            raise _corrupt(error, member.name) from None

    def _count(self, member: _Member) -> None:
        if self._zip is not None:
            self.decompressed += member.size
            if self.decompressed > self.limit:
                raise self._over_limit()

    def _open(self, member: _Member) -> BinaryIO:
        if self._zip is not None:
            return self._zip.open(member.info)
        assert self._tar is not None
        handle = self._tar.extractfile(member.info)
        if handle is None:
            raise tarfile.ReadError(f"{member.name} is not a regular file")
        return handle


class _UnreadableMember(Exception):
    """A zip member whose data cannot be read: bad CRC, encryption, an unsupported compression method."""


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(_TAR_MAGIC_OFFSET + 8)
    for magic, kind in _ARCHIVE_MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return None


def _corrupt(error: BaseException, name: str | None = None) -> ApiError:
    where = f"{name} in the archive" if name else "archive"
    return ApiError(422, "corrupt_archive", f"{where} cannot be read: {str(error) or type(error).__name__}")


def _too_many_entries(count: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "too_many_items",
        f"the archive has {count} or more entries, more than the limit of {limit} (10 times IDML_MAX_INDEX_ITEMS, plus 100)",
    )


def _normalise(name: str) -> str:
    name = name.replace("\\", "/")
    normalised = posixpath.normpath(name.lstrip("/"))
    return "" if normalised == "." else normalised


def _find_manifest(members: list[_Member]) -> _Member:
    """The manifest.csv at the root, or the only one in a subfolder; found by name, nothing is read."""
    candidates = [member for member in members if posixpath.basename(member.name) == MANIFEST_NAME]
    root = [member for member in candidates if member.name == MANIFEST_NAME]
    if len(root) > 1:
        raise ApiError(422, "invalid_manifest", f"the archive has {len(root)} {MANIFEST_NAME} entries at its root; keep one")
    if root:
        return root[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ApiError(
            422,
            "missing_manifest",
            f"the archive has no {MANIFEST_NAME}; add one with the columns path,id[,label][,attribute columns...]",
        )
    raise ApiError(
        422,
        "invalid_manifest",
        f"the archive has {len(candidates)} {MANIFEST_NAME} files in subfolders and none at the root; keep one",
    )


def _read_manifest(archive: _Archive) -> tuple[str, bytes]:
    """Find and read manifest.csv; returns (its folder, its bytes)."""
    member = _find_manifest(archive.members)
    if member.size > MAX_MANIFEST_BYTES:
        raise ApiError(413, "too_large", f"{member.name} is larger than {MAX_MANIFEST_BYTES} bytes")
    return posixpath.dirname(member.name), archive.read(member, MAX_MANIFEST_BYTES)


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
    """Extract the images that manifest.csv lists into the job folder, one file per archive member.

    Members are looked up by the manifest's paths only, so names such as `../x` are never
    written anywhere, and members the manifest does not list are never decompressed. Rows
    that list the same path share one file. A row whose file is missing, unreadable or larger
    than `max_item_bytes` gets an item error. Rejects the archive with 413 when the extracted
    files would pass `max_total_bytes`, or when reading it decompresses more than
    `expansion_limit` bytes (a decompression bomb).
    """
    limit = expansion_limit(archive_path.stat().st_size, max_total_bytes)
    archive = _Archive(archive_path, limit, max_entries=10 * max_items + 100)
    try:
        base, manifest = _read_manifest(archive)
        rows = parse_manifest(manifest, max_items)
        results = _extract_rows(archive, rows, base, folder, max_item_bytes, max_total_bytes)
    finally:
        archive.close()
    fsync_dir(folder)
    return results


def _extract_rows(
    archive: _Archive,
    rows: list[tuple[str, ItemFields]],
    base: str,
    folder: Path,
    max_item_bytes: int,
    max_total_bytes: int,
) -> list[SpooledItem]:
    requested_paths: dict[str, list[int]] = {}
    for position, (path, _) in enumerate(rows):
        requested_paths.setdefault(_normalise(posixpath.join(base, path)), []).append(position)
    results: list[SpooledItem | None] = [None] * len(rows)
    extracted = 0
    # Archive order reads a tar stream forwards once; for a duplicated name the first member wins.
    for member in archive.members:
        positions = requested_paths.pop(member.name, None)
        if positions is None:
            continue
        name = f"{positions[0]:07d}"
        error_reason, error = None, None
        if member.size > max_item_bytes:
            error_reason, error = "too_large", f"the image is larger than {max_item_bytes} bytes (IDML_MAX_UPLOAD_BYTES)"
        else:
            if extracted + member.size > max_total_bytes:
                raise ApiError(
                    413,
                    "too_large",
                    f"the archive's images add up to more than {max_total_bytes} bytes (IDML_MAX_INDEX_UPLOAD_BYTES)",
                )
            try:
                size = archive.extract(member, folder / name, max_item_bytes)
            except _UnreadableMember as problem:
                error_reason, error = "unreadable_file", f"{member.name} cannot be extracted from the archive: {problem}"
                logger.warning("archive member %s cannot be extracted: %s", member.name, problem)
            else:
                if size is None:
                    error_reason, error = "too_large", f"the image is larger than {max_item_bytes} bytes (IDML_MAX_UPLOAD_BYTES)"
                else:
                    extracted += size
        for position in positions:
            meta = rows[position][1]
            if error_reason is None:
                results[position] = SpooledItem(meta.id, meta.label, dict(meta.attributes), file=name)
            else:
                results[position] = SpooledItem(
                    meta.id, meta.label, dict(meta.attributes), error_reason=error_reason, error=error
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
    return results
