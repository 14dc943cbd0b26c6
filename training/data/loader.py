"""torch Dataset, m-per-class batch sampler and a seeded DataLoader helper."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from index.imaging import ImageDecodeError, decode_image
from training.data.splits import Sample

logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 4  # batches each worker prepares ahead


class ImageDataset(Dataset):
    """Images of ``samples``, decoded as the indexer and server decode them, then transformed.

    Each item is ``(transform(image), label)``: ``image`` is the RGB PIL image
    from ``index.imaging.decode_image`` (EXIF orientation applied, alpha
    composited on white, 16-bit and float scaled to 8 bits), and ``label`` is
    ``Sample.label``. With the transforms of ``training.data.transforms`` the
    image is a uint8 tensor ``(3, H, W)``.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        try:
            data = Path(sample.path).read_bytes()
        except OSError as error:
            raise OSError(f"failed to read image {sample.path}: {error}") from error
        try:
            image = decode_image(data).image
        except ImageDecodeError as error:
            raise ImageDecodeError(error.reason, f"{sample.path}: {error}") from error
        return self.transform(image), sample.label


class MPerClassSampler(Sampler[list[int]]):
    """Batch sampler: each batch contains ``batch_size / m`` distinct classes with ``m`` images each.

    A class with fewer than ``m`` images is sampled with replacement. An epoch
    has ``len(labels) // batch_size`` batches. Epoch ``e`` draws from a
    generator seeded with ``seed + e``; the epoch advances by one on every
    ``__iter__``, or is set with ``set_epoch``.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, m: int, seed: int = 0):
        if m < 1:
            raise ValueError(f"m (images per class in a batch) must be at least 1, got {m}")
        if batch_size < m or batch_size % m != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of m ({m})")
        grouped: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            grouped.setdefault(int(label), []).append(index)
        self.indices_by_class = {label: np.asarray(indices) for label, indices in grouped.items()}
        self.classes = np.asarray(sorted(self.indices_by_class))
        self.classes_per_batch = batch_size // m
        if self.classes_per_batch > len(self.classes):
            raise ValueError(
                f"batch_size / m = {self.classes_per_batch} classes per batch, but the data has only "
                f"{len(self.classes)} classes; lower batch_size or raise m"
            )
        self.batch_size = batch_size
        self.m = m
        self.seed = seed
        self.epoch = 0
        self.num_batches = len(labels) // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        for _ in range(self.num_batches):
            batch: list[int] = []
            for label in rng.choice(self.classes, size=self.classes_per_batch, replace=False):
                indices = self.indices_by_class[int(label)]
                replace = len(indices) < self.m
                batch.extend(int(index) for index in rng.choice(indices, size=self.m, replace=replace))
            yield batch


def init_worker(worker_id: int) -> None:
    """Give each worker one torch thread and seed numpy from torch's per-worker seed."""
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    workers: int = 2,
    seed: int = 0,
    *,
    m_per_class: int | None = None,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Build a DataLoader that repeats its order and augmentations for a given ``seed``.

    ``workers`` processes decode and augment in parallel, stay alive across
    epochs (``persistent_workers``) and each keep PREFETCH_BATCHES batches
    ready; 0 runs everything in the calling process. With ``m_per_class``, an
    MPerClassSampler forms the batches (``shuffle`` and ``drop_last`` then do
    not apply). ``drop_last`` defaults to ``shuffle``: training drops the last
    incomplete batch, evaluation keeps every image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    options: dict = {
        "num_workers": workers,
        "generator": generator,
        "pin_memory": pin_memory,
        "worker_init_fn": init_worker if workers > 0 else None,
    }
    if workers > 0:
        options["persistent_workers"] = True
        options["prefetch_factor"] = PREFETCH_BATCHES

    if m_per_class is not None:
        batch_sampler = MPerClassSampler(dataset.labels, batch_size, m_per_class, seed=seed)
        return DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle if drop_last is None else drop_last,
        **options,
    )
