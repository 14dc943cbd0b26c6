"""Lists of images to index: a folder tree or a CSV manifest.

Folder: every image file below the folder (by extension, recursively). The
first subfolder under the root is the label (`root/cat/x.jpg` -> "cat"); files
directly in the root have no label. The id is the path relative to the root,
with forward slashes.

CSV manifest: a header row with a `path` column (required), and optional `id`
and `label` columns; every other column becomes a string attribute (empty
cells are left out). Relative paths are resolved against the manifest's
folder. The id defaults to `path` as written.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".mpo"}
)


class SourceError(ValueError):
    """A folder or manifest that cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class ImageSource:
    """One image to add: where to read it and what to store with it."""

    path: Path
    id: str
    label: str | None = None
    attributes: dict = field(default_factory=dict)


def scan_folder(root: str | Path) -> list[ImageSource]:
    """Image files under `root`, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    sources = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        relative = path.relative_to(root)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        sources.append(ImageSource(path=path, id=relative.as_posix(), label=label))
    return sources


def read_manifest(manifest: str | Path) -> list[ImageSource]:
    """Rows of a CSV manifest, in file order.

    Raises:
        SourceError: the file is missing, has no `path` column, or has a row
            with an empty path.
    """
    manifest = Path(manifest)
    try:
        handle = open(manifest, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise SourceError(f"manifest {manifest} cannot be read: {error}") from None
    with handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise SourceError(f"manifest {manifest} has no 'path' column (columns: {columns}); add a header row")
        extra = [name for name in columns if name not in ("path", "id", "label")]
        sources = []
        for line, row in enumerate(reader, start=2):
            written = (row.get("path") or "").strip()
            if not written:
                raise SourceError(f"manifest {manifest} line {line} has an empty path")
            path = Path(written)
            if not path.is_absolute():
                path = manifest.parent / path
            label = (row.get("label") or "").strip() or None
            item_id = (row.get("id") or "").strip() or written
            attributes = {name: row[name] for name in extra if row.get(name) not in (None, "")}
            sources.append(ImageSource(path=path, id=item_id, label=label, attributes=attributes))
    return sources


def iter_chunks(sources: list[ImageSource], size: int) -> Iterator[list[ImageSource]]:
    for start in range(0, len(sources), size):
        yield sources[start : start + size]
