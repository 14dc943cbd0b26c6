"""Data sets for training and evaluation: layouts, class-disjoint splits, loaders.

The torch parts (ImageDataset, transforms, make_loader) live in
``training.data.loader`` and ``training.data.transforms``. This package's top
level imports no torch, so the emoji build script runs without it.
"""

from training.data.layouts import DATASET_KINDS, load_dataset
from training.data.splits import DatasetLayoutError, DatasetSplits, Sample

__all__ = ["DATASET_KINDS", "DatasetLayoutError", "DatasetSplits", "Sample", "load_dataset"]
