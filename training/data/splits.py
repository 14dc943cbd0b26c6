"""Samples and class-disjoint train / validation / test splits.

Deep metric learning benchmarks (CUB-200-2011, Cars196, Stanford Online
Products, In-Shop) split by class: no test class is seen in training. The
validation split here is carved from the training classes in the same way, so
checkpoints and hyperparameters are chosen on classes the model never trained
on, without touching the test classes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DatasetLayoutError(ValueError):
    """A data set folder or manifest does not have the expected layout; the message names the fix."""


@dataclass(frozen=True)
class Sample:
    """One image of a data set."""

    path: Path  # image file
    label: int  # index into DatasetSplits.class_names
    class_name: str  # the class as the data set names it, for example "001.Black_footed_Albatross"


@dataclass(frozen=True)
class DatasetSplits:
    """Class-disjoint splits of one data set.

    Labels index ``class_names``, which lists the training classes first, then
    the validation classes, then the test classes. So the labels of ``train``
    are ``0 .. num_train_classes - 1``, which proxy-based losses need.

    ``val`` is carved from the official training classes and is the split to
    evaluate on while training: pick checkpoints and hyperparameters on it.
    ``test`` must never be used for those choices; report it once, at the end.
    For In-Shop, ``query`` and ``gallery`` partition ``test``, and the protocol
    searches the queries against the gallery. For the other data sets they are
    empty, and every test image queries all other test images.
    """

    kind: str  # data set kind passed to load_dataset, for example "cub"
    root: Path
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    class_names: list[str]
    num_train_classes: int
    num_val_classes: int
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)

    @property
    def num_test_classes(self) -> int:
        return len(self.class_names) - self.num_train_classes - self.num_val_classes

    def summary(self) -> str:
        """Return a one-line description with class and image counts per split."""
        text = (
            f"{self.kind} at {self.root}: train {self.num_train_classes} classes / {len(self.train)} images, "
            f"val {self.num_val_classes} / {len(self.val)}, test {self.num_test_classes} / {len(self.test)}"
        )
        if self.query or self.gallery:
            text += f" (query {len(self.query)}, gallery {len(self.gallery)})"
        return text


def split_classes_in_half(class_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split sorted class names: the first ``ceil(n / 2)`` train, the rest test."""
    ordered = sorted(set(class_names))
    n_train = (len(ordered) + 1) // 2
    return ordered[:n_train], ordered[n_train:]


def choose_val_classes(train_classes: Sequence[str], val_fraction: float, seed: int) -> list[str]:
    """Draw ``round(val_fraction * n)`` of the training classes (at least one when the fraction is > 0).

    At least one class always stays in training. Raises DatasetLayoutError when
    ``val_fraction`` is outside [0, 1) or leaves no class to train on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetLayoutError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(train_classes)
    if val_fraction == 0.0 or not ordered:
        return []
    n_val = max(1, round(val_fraction * len(ordered)))
    if n_val >= len(ordered):
        raise DatasetLayoutError(
            f"val_fraction {val_fraction} of {len(ordered)} training classes leaves no class to train on; "
            "lower val_fraction or use a data set with more classes"
        )
    return sorted(random.Random(seed).sample(ordered, n_val))


def build_splits(
    kind: str,
    root: Path,
    train_items: Sequence[tuple[Path, str]],
    test_items: Sequence[tuple[Path, str]],
    *,
    val_fraction: float,
    seed: int,
    query_items: Sequence[tuple[Path, str]] = (),
    gallery_items: Sequence[tuple[Path, str]] = (),
) -> DatasetSplits:
    """Turn (path, class name) pairs of the official train and test sets into DatasetSplits.

    The validation classes are drawn from the training classes with ``seed``.
    When ``query_items`` or ``gallery_items`` are given, ``test_items`` must be
    empty and the test split is their concatenation. Raises DatasetLayoutError
    when a class is both a training and a test class, or a split is empty.
    """
    if (query_items or gallery_items) and test_items:
        raise DatasetLayoutError("pass either test_items or query_items and gallery_items, not both")
    test_items = list(test_items) or [*query_items, *gallery_items]

    train_classes = sorted({name for _, name in train_items})
    test_classes = sorted({name for _, name in test_items})
    if not train_classes:
        raise DatasetLayoutError(f"the {kind} data set at {root} has no training images")
    if not test_classes:
        raise DatasetLayoutError(f"the {kind} data set at {root} has no test images")
    shared = sorted(set(train_classes) & set(test_classes))
    if shared:
        raise DatasetLayoutError(
            f"{len(shared)} classes of the {kind} data set at {root} are both training and test classes "
            f"(for example {shared[0]!r}); the splits must be class-disjoint"
        )

    val_classes = choose_val_classes(train_classes, val_fraction, seed)
    val_set = set(val_classes)
    fit_classes = [name for name in train_classes if name not in val_set]
    class_names = [*fit_classes, *val_classes, *test_classes]
    label_of = {name: label for label, name in enumerate(class_names)}

    def to_samples(items: Iterable[tuple[Path, str]]) -> list[Sample]:
        return [Sample(Path(path), label_of[name], name) for path, name in items]

    return DatasetSplits(
        kind=kind,
        root=Path(root),
        train=to_samples(item for item in train_items if item[1] not in val_set),
        val=to_samples(item for item in train_items if item[1] in val_set),
        test=to_samples(test_items),
        class_names=class_names,
        num_train_classes=len(fit_classes),
        num_val_classes=len(val_classes),
        query=to_samples(query_items),
        gallery=to_samples(gallery_items),
    )
