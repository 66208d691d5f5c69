"""Datasets (cifar100, tinyimagenet, stl10, synthetic) as uint8 tensors, and the device-resident loader.

Every dataset is decoded once into uint8 ``[N, 3, H, W]`` tensors with int64 labels, its class names, the
per-channel normalisation statistics and a checksum of the decoded data (its stable identity in results).
``GPULoader`` keeps such a tensor on the training device and does the standard CIFAR augmentation there,
batched (random crop with zero padding + horizontal flip), so no worker processes or PIL sit in the loop.
Batches are a deterministic function of (seed, epoch): resuming at epoch e needs no loader state.

Layout: ``dataset`` (the record), one reader per file (``cifar100``, ``tinyimagenet``, ``stl10``, ``synthetic``),
``registry`` (names -> loaders, ``load_dataset``) and ``loader`` (``GPULoader``, ``Batch``).
"""

from __future__ import annotations

from kdbench.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from kdbench.data.dataset import Dataset, channel_stats, data_checksum, default_cache_dir, default_data_root
from kdbench.data.loader import Batch, GPULoader, crop_flip
from kdbench.data.registry import DATASETS, DatasetSpec, list_datasets, load_dataset
from kdbench.data.synthetic import make_synthetic
from kdbench.seeds import epoch_seed

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "Batch",
    "Dataset",
    "DatasetSpec",
    "GPULoader",
    "channel_stats",
    "crop_flip",
    "data_checksum",
    "default_cache_dir",
    "default_data_root",
    "epoch_seed",
    "list_datasets",
    "load_dataset",
    "make_synthetic",
]
