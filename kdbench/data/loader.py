"""The device-resident loader: batched crop/flip and normalisation on the training device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.seeds import epoch_seed

# ---------------------------------------------------------------------------------------------- loader


@dataclass
class Batch:
    """One training or test batch: normalised images, labels, and the sample indices in the split.

    ``global_rows``: on several processes, the rows of the whole global batch this rank holds a share of (an
    epoch's last batch may be partial and split unequally; ``kdbench.distributed.share_weight``); None on one."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    global_rows: int | None = None


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor | None, pad: int
) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding=pad)`` then ``RandomHorizontalFlip`` at given offsets, in one gather.

    ``images`` [B, C, H, W] (any dtype); ``top`` / ``left`` [B] offsets in 0..2*pad into the zero-padded image;
    ``flip`` [B] bool (or None). Output pixel (i, j) is padded[top + i, left + j], or padded[top + i,
    left + W-1-j] when flipped: the crop of the zero-padded image, mirrored after cropping, as torchvision does.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    rows = top.to(dev, torch.int64)[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], (w - 1) - cols, cols)
    cols = cols + left.to(dev, torch.int64)[:, None]  # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class GPULoader:
    """The whole uint8 split kept on ``device``; batched crop/flip and normalisation done there.

    Train: a fresh permutation, crop offsets and flips per epoch, drawn from a CPU ``torch.Generator`` seeded
    from (seed, epoch) and then moved to the device, so CPU and GPU runs see the same batches and resuming at
    epoch e needs no state. Test (``train=False``): in order, unaugmented, the last partial batch kept.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        pad: int = 4,
        flip: bool = True,
    ):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images_uint8.shape[0]:
            raise ValueError(f"labels must be [N] with N={images_uint8.shape[0]}, got {tuple(labels.shape)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise KdbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pad < 0:
            raise KdbenchError(f"pad must be >= 0, got {pad}")
        channels = images_uint8.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = bool(train)
        self.seed = int(seed)
        self.drop_last = bool(drop_last) and self.train
        self.pad = int(pad)
        self.flip = bool(flip)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if self.train:
            from kdbench import distributed

            distributed.check_batch(batch_size, distributed.world_size(), self.num_samples, self.drop_last)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 normalised, with exactly the operations of ToTensor (/255) then Normalize."""
        return images_uint8.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def plan(self, e: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's sample order, crop offsets (top, left) and flips, on the CPU; None where not augmented."""
        n = self.num_samples
        if not self.train:
            return torch.arange(n), None, None, None
        g = torch.Generator(device="cpu")
        g.manual_seed(epoch_seed(self.seed, e))
        order = torch.randperm(n, generator=g)
        top = left = flips = None
        if self.pad > 0:
            top = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            left = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        if self.flip:
            flips = torch.rand(n, generator=g) < 0.5
        return order, top, left, flips

    def epoch(self, e: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``e``: a pure function of (seed, e) for training, the same every time for test."""
        order, top, left, flips = (t.to(self.device) if t is not None else None for t in self.plan(e))
        n, bs = self.num_samples, self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        # In a distributed run each rank takes rows rank, rank + W, ... of every global batch (kdbench.distributed).
        from kdbench import distributed

        r, w = (distributed.rank(), distributed.world_size()) if self.train else (0, 1)
        for s in range(0, stop, bs):
            rows = min(s + bs, stop) - s if w > 1 else None
            pos = slice(s + r, min(s + bs, stop), w)
            idx = order[pos]
            x = self.images[idx]
            if top is not None or flips is not None:
                k = idx.shape[0]
                zeros = torch.zeros(k, dtype=torch.int64, device=self.device)
                x = crop_flip(
                    x,
                    top[pos] if top is not None else zeros,
                    left[pos] if left is not None else zeros,
                    flips[pos] if flips is not None else None,
                    self.pad,
                )
            yield Batch(self.normalize(x), self.labels[idx], idx, rows)

    def __iter__(self) -> Iterator[Batch]:
        if self.train:
            raise TypeError("iterate a training GPULoader with loader.epoch(e), so each epoch gets its own shuffle")
        return self.epoch(0)

    def __repr__(self) -> str:
        return (
            f"GPULoader(n={self.num_samples}, batch_size={self.batch_size}, train={self.train}, "
            f"device={self.device}, pad={self.pad}, drop_last={self.drop_last})"
        )
