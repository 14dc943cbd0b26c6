"""Read data set layouts into class-disjoint splits: ``load_dataset(kind, root)``.

Kinds and their train / test protocol:

- ``emoji``: ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``, as
  written by ``scripts/fetch_emoji_dataset.py``.
- ``folder``: ``root/<class>/<image>``; the sorted classes are split in half,
  the first half trains. When ``root`` has ``train/`` and ``test/`` folders,
  those are the splits.
- ``csv``: a manifest file with columns ``path,label`` and an optional
  ``split`` column (``train`` or ``test``); without it the sorted classes are
  split in half. Paths are relative to the manifest's folder.
- ``cub``: CUB-200-2011 (``images.txt``, ``image_class_labels.txt``); classes
  1-100 train, 101-200 test.
- ``cars``: Cars196 (``cars_annos.mat``); classes 1-98 train, 99-196 test.
- ``sop``: Stanford Online Products (``Ebay_train.txt``, ``Ebay_test.txt``).
- ``inshop``: In-Shop Clothes Retrieval (``list_eval_partition.txt``);
  train, query and gallery.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data.splits import (
    DatasetLayoutError,
    DatasetSplits,
    build_splits,
    split_classes_in_half,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CUB_LAST_TRAIN_CLASS = 100  # official protocol: classes 1-100 train, 101-200 test
CARS_LAST_TRAIN_CLASS = 98  # official protocol: classes 1-98 train, 99-196 test

Items = list[tuple[Path, str]]


def require_file(path: Path, kind: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise DatasetLayoutError naming it and ``hint``."""
    if not path.is_file():
        raise DatasetLayoutError(f"{kind}: {path} not found; {hint}")
    return path


def check_first_image(items: Items, kind: str, root: Path) -> None:
    """Raise DatasetLayoutError when the first listed image is missing.

    Checking one file catches a wrong ``root`` without a stat call per image,
    which takes long on the 120,000 images of Stanford Online Products.
    """
    if items and not items[0][0].is_file():
        raise DatasetLayoutError(
            f"{kind}: image {items[0][0]} listed in the annotations was not found; "
            f"root ({root}) must be the folder that the annotation paths are relative to"
        )


def list_class_folders(folder: Path) -> Items:
    """List ``folder/<class>/<image>`` as (path, class) pairs, sorted, ignoring hidden files."""
    items: Items = []
    for class_dir in sorted(folder.iterdir()):
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                items.append((path, class_dir.name))
    return items


def read_folder(root: Path) -> tuple[Items, Items]:
    """Read a folder-per-class layout (see the module docstring)."""
    if not root.is_dir():
        raise DatasetLayoutError(f"folder: {root} is not a folder; pass the folder that contains one folder per class")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return list_class_folders(root / "train"), list_class_folders(root / "test")

    items = list_class_folders(root)
    if not items:
        raise DatasetLayoutError(f"folder: no images in class folders under {root}; expected {root}/<class>/<image>")
    train_classes, _ = split_classes_in_half(name for _, name in items)
    train_set = set(train_classes)
    return [item for item in items if item[1] in train_set], [item for item in items if item[1] not in train_set]


def read_emoji(root: Path) -> tuple[Items, Items]:
    """Read the emoji benchmark written by ``scripts/fetch_emoji_dataset.py``."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetLayoutError(
            f"emoji: {root}/train and {root}/test not found; build the data set with "
            f"python scripts/fetch_emoji_dataset.py --out {root}"
        )
    if not (root / "READY").is_file():
        logger.warning("emoji: %s has no READY file, so its build may be incomplete", root)
    return list_class_folders(root / "train"), list_class_folders(root / "test")


def read_csv_manifest(path: Path) -> tuple[Items, Items]:
    """Read a ``path,label[,split]`` manifest (see the module docstring)."""
    if path.is_dir():
        raise DatasetLayoutError(f"csv: {path} is a folder; pass the manifest file itself, for example {path}/catalog.csv")
    require_file(path, "csv", "pass a CSV file with columns path,label and optionally split")
    base = path.parent
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [column for column in ("path", "label") if column not in columns]
        if missing:
            raise DatasetLayoutError(
                f"csv: {path} has no {' or '.join(missing)} column (columns: {', '.join(columns) or 'none'}); "
                "the header must name path and label"
            )
        has_split = "split" in columns
        rows = list(reader)

    items_by_split: dict[str, Items] = {"train": [], "test": [], "": []}
    for line_number, row in enumerate(rows, start=2):
        image_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not image_path or not label:
            raise DatasetLayoutError(f"csv: {path} line {line_number} has an empty path or label")
        split = (row.get("split") or "").strip().lower() if has_split else ""
        if split not in items_by_split:
            raise DatasetLayoutError(
                f"csv: {path} line {line_number} has split {row.get('split')!r}; use train or test"
            )
        items_by_split[split].append((base / image_path, label))

    if has_split:
        if items_by_split[""]:
            raise DatasetLayoutError(f"csv: {path} has rows with an empty split; give every row train or test")
        return items_by_split["train"], items_by_split["test"]
    items = items_by_split[""]
    train_classes, _ = split_classes_in_half(name for _, name in items)
    train_set = set(train_classes)
    return [item for item in items if item[1] in train_set], [item for item in items if item[1] not in train_set]


def read_cub(root: Path) -> tuple[Items, Items]:
    """Read CUB-200-2011: classes 1-100 train, 101-200 test.

    Accepts the ``CUB_200_2011`` folder or its parent. Class names come from
    ``classes.txt`` when present (``001.Black_footed_Albatross``), else the class id.
    """
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    hint = "root must be the CUB_200_2011 folder that contains images.txt and images/"
    image_lines = require_file(root / "images.txt", "cub", hint).read_text().split("\n")
    label_lines = require_file(root / "image_class_labels.txt", "cub", hint).read_text().split("\n")

    class_names: dict[int, str] = {}
    if (root / "classes.txt").is_file():
        for line in (root / "classes.txt").read_text().splitlines():
            if line.strip():
                class_id, name = line.split(maxsplit=1)
                class_names[int(class_id)] = name.strip()

    paths = dict(line.split(maxsplit=1) for line in image_lines if line.strip())
    train: Items = []
    test: Items = []
    for line in label_lines:
        if not line.strip():
            continue
        image_id, class_text = line.split()
        if image_id not in paths:
            raise DatasetLayoutError(f"cub: image id {image_id} of image_class_labels.txt is not in images.txt")
        class_id = int(class_text)
        item = (root / "images" / paths[image_id].strip(), class_names.get(class_id, str(class_id)))
        (train if class_id <= CUB_LAST_TRAIN_CLASS else test).append(item)
    return train, test


def read_cars(root: Path) -> tuple[Items, Items]:
    """Read Cars196 from ``cars_annos.mat``: classes 1-98 train, 99-196 test.

    Image paths (``relative_im_path``, for example ``car_ims/000001.jpg``) are
    relative to ``root``. Class names come from the file's ``class_names``.
    """
    from scipy.io import loadmat  # scipy comes with scikit-learn, a training dependency

    path = require_file(root / "cars_annos.mat", "cars", "root must be the folder with cars_annos.mat and car_ims/")
    try:
        mat = loadmat(path, squeeze_me=True)
    except (ValueError, OSError, TypeError) as error:
        raise DatasetLayoutError(f"cars: failed to read {path}: {error}") from error
    if "annotations" not in mat:
        raise DatasetLayoutError(f"cars: {path} has no annotations variable; is it cars_annos.mat from Cars196?")
    annotations = np.atleast_1d(mat["annotations"])
    names = [str(name) for name in np.atleast_1d(mat.get("class_names", []))]

    train: Items = []
    test: Items = []
    for record in annotations:
        class_id = int(record["class"])
        name = names[class_id - 1] if 0 < class_id <= len(names) else str(class_id)
        item = (root / str(record["relative_im_path"]), name)
        (train if class_id <= CARS_LAST_TRAIN_CLASS else test).append(item)
    return train, test


def read_ebay_list(path: Path) -> Items:
    """Read one Stanford Online Products list: ``image_id class_id super_class_id path``."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].split()[:2] != ["image_id", "class_id"]:
        raise DatasetLayoutError(f"sop: {path} does not start with the header 'image_id class_id super_class_id path'")
    items: Items = []
    for line in lines[1:]:
        if line.strip():
            _, class_id, _, relative = line.split()
            items.append((path.parent / relative, class_id))
    return items


def read_sop(root: Path) -> tuple[Items, Items]:
    """Read Stanford Online Products: ``Ebay_train.txt`` (11,318 classes) and ``Ebay_test.txt`` (11,316)."""
    hint = "root must be the Stanford_Online_Products folder"
    train = read_ebay_list(require_file(root / "Ebay_train.txt", "sop", hint))
    test = read_ebay_list(require_file(root / "Ebay_test.txt", "sop", hint))
    return train, test


def read_inshop(root: Path) -> tuple[Items, Items, Items]:
    """Read In-Shop Clothes Retrieval: (train, query, gallery) from ``list_eval_partition.txt``.

    The file has a count line, a header line ``image_name item_id
    evaluation_status`` and one line per image; paths are relative to ``root``.
    """
    path = require_file(
        root / "list_eval_partition.txt", "inshop", "root must be the folder with list_eval_partition.txt and img/"
    )
    lines = path.read_text().splitlines()
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetLayoutError(
            f"inshop: {path} line 2 must be the header 'image_name item_id evaluation_status'"
        )
    parts: dict[str, Items] = {"train": [], "query": [], "gallery": []}
    for line_number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        image_name, item_id, status = line.split()
        if status not in parts:
            raise DatasetLayoutError(
                f"inshop: {path} line {line_number} has evaluation_status {status!r}; expected train, query or gallery"
            )
        parts[status].append((root / image_name, item_id))
    return parts["train"], parts["query"], parts["gallery"]


READERS: dict[str, Callable[[Path], tuple[Items, Items]]] = {
    "emoji": read_emoji,
    "folder": read_folder,
    "csv": read_csv_manifest,
    "cub": read_cub,
    "cars": read_cars,
    "sop": read_sop,
}
DATASET_KINDS: tuple[str, ...] = (*READERS, "inshop")

# Source of each image (a vendor, a camera, a studio) from its path, for the kinds that record one.
# With sources, the confidence is fitted and measured with queries that search other sources' images.
SOURCE_OF: dict[str, Callable[[Path], str]] = {
    "emoji": lambda path: path.stem,  # <class>/<vendor>.png
}


def sample_sources(kind: str, paths: list[Path]) -> list[str] | None:
    """Return the source of each image of a data set `kind`, or None when the kind records none."""
    source_of = SOURCE_OF.get(kind)
    return None if source_of is None else [source_of(Path(path)) for path in paths]


def load_dataset(kind: str, root: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Read the data set ``kind`` at ``root`` into class-disjoint splits.

    ``val_fraction`` of the official training classes (drawn with ``seed``)
    become the validation split; see DatasetSplits for which split to use when.
    Raises DatasetLayoutError on an unknown kind or a layout that does not match.
    """
    root = Path(root)
    if kind == "inshop":
        train, query, gallery = read_inshop(root)
        check_first_image(train, kind, root)
        splits = build_splits(
            kind, root, train, (), val_fraction=val_fraction, seed=seed, query_items=query, gallery_items=gallery
        )
    elif kind in READERS:
        train, test = READERS[kind](root)
        check_first_image(train, kind, root)
        check_first_image(test, kind, root)
        splits = build_splits(kind, root, train, test, val_fraction=val_fraction, seed=seed)
    else:
        raise DatasetLayoutError(f"unknown data set kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    logger.info("%s", splits.summary())
    return splits
