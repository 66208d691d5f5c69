"""ImageNet in its folder layout, decoded and augmented in DataLoader worker processes.

The one dataset that is not held in memory: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the layout of
torchvision's ``ImageFolder``; the official flat validation folder must first be sorted into class folders, e.g.
with the well-known ``valprep.sh``). Training images get RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) to
``image_size`` (224) and a horizontal flip; evaluation images a resize of the shorter side to ``resize_size``
(256, default image_size * 256 / 224) and a center crop of ``image_size``, both normalised with the ImageNet
mean and std, as torchvision's reference recipe. Workers return uint8 crops; normalisation happens on the
training device (a quarter of the bytes through shared memory and over PCIe).

Batches are the same ``Batch`` (images, labels, sample indices) as the device-resident loader's. The order of an
epoch is the permutation torch's ``DistributedSampler`` draws (seed + epoch; without its padding, ``_Shuffled``),
and each sample's crop and flip are drawn from its own generator seeded from (seed, epoch, index): whichever
worker or rank decodes a sample, it gets the same pixels, so N ranks see exactly the global batches one process
sees (``kdbench.distributed``'s convention).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from kdbench import distributed
from kdbench.data.loader import Batch
from kdbench.errors import KdbenchError
from kdbench.seeds import epoch_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(
    height: int, width: int, g: torch.Generator, scale: tuple[float, float] = SCALE, ratio=RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a uniform ``scale`` fraction of the area, with a log-uniform
    aspect ratio in ``ratio``: up to ten draws, then the whole image cut to the nearest allowed aspect ratio and
    centred (the Inception recipe, as torchvision's RandomResizedCrop), drawn from ``g`` alone."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FolderSplit(torch.utils.data.Dataset):
    """One split's (path, label) list; ``__getitem__`` decodes and augments one image to uint8 [3, S, S]."""

    def __init__(self, samples: list[tuple[str, int]], *, train: bool, size: int, resize: int, seed: int = 0):
        self.samples = samples
        self.train = train
        self.size = size
        self.resize = resize
        self.seed = seed
        self.epoch = 0  # set before each epoch's DataLoader starts its workers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        import torchvision.transforms.functional as TF
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.train:
            g = torch.Generator().manual_seed((epoch_seed(self.seed, self.epoch) + 1_000_003 * i) % (1 << 63))
            top, left, h, w = random_resized_crop_box(img.height, img.width, g)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if float(torch.rand(1, generator=g)) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = TF.center_crop(TF.resize(img, self.resize, antialias=True), [self.size, self.size])
        return TF.pil_to_tensor(img), label, i


class _Strided(torch.utils.data.Sampler):
    """Evaluation order of one rank: samples rank, rank + W, ... (no padding, so no sample is counted twice)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(distributed.rank(), self.n, distributed.world_size()))

    def __len__(self) -> int:
        return len(range(distributed.rank(), self.n, distributed.world_size()))


class _Shuffled(torch.utils.data.Sampler):
    """Training order of one rank: the permutation torch's ``DistributedSampler`` draws (``randperm`` from a
    generator seeded with seed + epoch), cut to whole batches with ``drop_last``, and rank r's samples r, r + W, ...
    of it. Unlike ``DistributedSampler(drop_last=False)`` it never pads: when the epoch's samples do not divide
    by W, the last global batch is split unequally (16 rows over 3 ranks: 6, 5, 5; the loss terms are weighted by
    each rank's share, ``kdbench.train.shared_terms``) instead of repeating samples, so every sample is trained
    once per epoch, as on one process. On one process it is exactly DistributedSampler's order."""

    def __init__(self, n: int, seed: int, epoch: int, batch_size: int, drop_last: bool):
        self.n, self.seed, self.epoch = n, seed, epoch
        self.stop = (n // batch_size) * batch_size if drop_last else n

    def _order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()[: self.stop]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[distributed.rank() :: distributed.world_size()])

    def __len__(self) -> int:
        return len(range(distributed.rank(), self.stop, distributed.world_size()))


class FolderLoader:
    """Batches of a FolderSplit from DataLoader workers, normalised on ``device``.

    ``batch_size`` is the GLOBAL batch; each rank loads ``batch_size / world size`` images per step. Training:
    DistributedSampler order (``set_epoch``), the last partial batch kept unless ``drop_last``; evaluation: in
    order, each rank its strided share (``sharded``: ``kdbench.evaluate.predict`` gathers the ranks' rows)."""

    def __init__(
        self,
        split: FolderSplit,
        *,
        batch_size: int,
        train: bool,
        device: str | torch.device,
        workers: int,
        seed: int = 0,
        drop_last: bool = False,
    ):
        w = distributed.world_size()
        if train:
            distributed.check_batch(batch_size, w, len(split), bool(drop_last))
        self.split = split
        self.train = train
        self.device = torch.device(device)
        self.workers = workers
        self.seed = int(seed)
        self.batch_size = batch_size
        self.local_batch = batch_size // w if train else batch_size
        self.drop_last = bool(drop_last) and train
        self.sharded = not train and distributed.active()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _sampler(self, epoch: int) -> torch.utils.data.Sampler:
        if not self.train:
            return _Strided(len(self.split))
        return _Shuffled(len(self.split), self.seed, epoch, self.batch_size, self.drop_last)

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        """Steps per epoch, the same on every rank: global batches (the last one partial unless ``drop_last``)."""
        n, bs = len(self.split), self.batch_size
        if not self.train:
            return -(-len(self._sampler(0)) // bs)
        return n // bs if self.drop_last else -(-n // bs)

    def epoch(self, e: int = 0) -> Iterator[Batch]:
        self.split.epoch = e
        self.split.seed = self.seed
        loader = torch.utils.data.DataLoader(
            self.split,
            batch_size=self.local_batch,
            sampler=self._sampler(e),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,  # the sampler already cut the epoch to whole global batches with drop_last
            persistent_workers=False,
        )
        n, bs, w = len(self.split), self.batch_size, distributed.world_size()
        for step, (images, labels, index) in enumerate(loader):
            x = images.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
            rows = min(bs, n - step * bs) if self.train and w > 1 else None
            yield Batch(x, labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True), rows)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


class FolderDataset:
    """ImageNet-style folders as the training loop sees a dataset: labels in memory, images read per batch.

    It offers what the loop reads of ``kdbench.data.Dataset`` (name, classes, labels, image_size, checksum,
    ``train_loader``, ``test_loader``); there are no image tensors. The checksum is the sha256 of the two file
    lists (relative path, size in bytes, label): it names the data without reading 150 GB."""

    def __init__(
        self,
        name: str,
        train: list[tuple[str, int]],
        test: list[tuple[str, int]],
        classes: list[str],
        *,
        image_size: int,
        resize_size: int,
        workers: int,
        checksum: str,
        source: str,
    ):
        self.name = name
        self.train_split = FolderSplit(train, train=True, size=image_size, resize=resize_size)
        self.test_split = FolderSplit(test, train=False, size=image_size, resize=resize_size)
        self.classes = classes
        self.class_ids = list(classes)
        self.train_labels = torch.tensor([y for _, y in train], dtype=torch.long)
        self.test_labels = torch.tensor([y for _, y in test], dtype=torch.long)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.image_size = image_size
        self.resize_size = resize_size
        self.workers = workers
        self.checksum = checksum
        self.source = source

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    def train_loader(
        self,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        pad: int | None = None,
    ) -> FolderLoader:
        return FolderLoader(
            self.train_split,
            batch_size=batch_size,
            train=True,
            device=device,
            workers=self.workers,
            seed=seed,
            drop_last=drop_last,
        )

    def test_loader(self, batch_size: int, *, device: str | torch.device = "cpu") -> FolderLoader:
        return FolderLoader(self.test_split, batch_size=batch_size, train=False, device=device, workers=self.workers)

    def __repr__(self) -> str:
        return (
            f"FolderDataset({self.name!r}, classes={self.num_classes}, train={self.num_train}, "
            f"test={self.num_test}, size={self.image_size}, checksum={self.checksum[:12]})"
        )


def default_workers() -> int:
    """DataLoader workers per training process: this node's usable cores shared by its ranks (LOCAL_WORLD_SIZE, set
    by torchrun, ``kdbench run --nproc-per-node`` and submitit), at least 1 and at most 8 each."""
    from kdbench.system import usable_cores

    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, usable_cores() // local_ranks))


def _scan(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    out = []
    for label, wnid in enumerate(classes):
        for entry in sorted(os.scandir(folder / wnid), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(EXTENSIONS):
                out.append((entry.path, label))
    return out


def _load_imagenet(
    data_root: Path,
    *,
    image_size: int | None,
    download: bool,
    cache_dir: Path | None,
    resize_size: int | None = None,
    num_workers: int | None = None,
) -> FolderDataset:
    """The registry's loader: ``data_root`` holds ``train/`` and ``val/``, each with one folder per class.

    ``image_size``: the crop side (224); ``resize_size``: the evaluation resize (default image_size * 256 / 224,
    256 at 224); ``num_workers``: DataLoader worker processes per training process (default ``default_workers()``)."""
    if download:
        raise KdbenchError("ImageNet cannot be downloaded by kdbench: get it from image-net.org (train/ and val/)")
    size = 224 if image_size is None else int(image_size)
    resize = int(resize_size) if resize_size is not None else int(round(size * 256 / 224))
    if size < 1 or resize < size:
        raise KdbenchError(f"imagenet: need 1 <= image_size <= resize_size, got {size} and {resize}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise KdbenchError(f"imagenet: num_workers must be a non-negative integer, got {num_workers!r}")
    root = Path(data_root)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise KdbenchError(f"imagenet: {d} not found (expected {root}/train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    val_classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
    if not classes:
        raise KdbenchError(f"imagenet: {train_dir} has no class folders")
    if val_classes != classes:
        raise KdbenchError(
            f"imagenet: {val_dir} must hold the same class folders as {train_dir} "
            f"({len(val_classes)} vs {len(classes)}; sort the flat validation set into <wnid>/ folders first)"
        )
    train, test = _scan(train_dir, classes), _scan(val_dir, classes)
    if not train or not test:
        raise KdbenchError(f"imagenet: no images ({', '.join(EXTENSIONS)}) under {train_dir} or {val_dir}")
    h = hashlib.sha256()
    for split, samples in (("train", train), ("val", test)):
        base = train_dir if split == "train" else val_dir
        for path, label in samples:
            rel = os.path.relpath(path, base)
            h.update(f"{split}/{rel}:{os.path.getsize(path)}:{label};".encode())
    return FolderDataset(
        "imagenet",
        train,
        test,
        classes,
        image_size=size,
        resize_size=resize,
        workers=default_workers() if num_workers is None else num_workers,
        checksum=h.hexdigest(),
        source=str(root),
    )
