"""Images/s of kdbench's ImageNet loader on this machine's CPU, per process.

Generates 104 JPEGs of 500x375 pixels (ImageNet's typical size; smooth patterns plus noise, ~93 KiB each, close to
ImageNet's ~110 KiB average) in FOLDER if it does not exist, then times (1) one process decoding and augmenting
every image as a DataLoader worker does (training: RandomResizedCrop 224 + flip; evaluation: resize 256 + center crop
224) and (2) whole training epochs through the loader with 0, 1 and 2 worker processes (tiny epochs: worker start-up
weighs on them). Run: OMP_NUM_THREADS=1 python results/imagenet/loader_speed.py /tmp/jpegs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdbench.data import load_dataset


def make_jpegs(root: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for split, n in (("train", 96), ("val", 8)):
        for c in range(2):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n // 2):
                base = np.stack([np.sin(xx / (20 + 7 * i)), np.cos(yy / (15 + 3 * c)), np.sin((xx + yy) / 40)], -1)
                pixels = 128 + 90 * base + rng.normal(0, 18, base.shape)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def main(root: Path) -> None:
    if not root.exists():
        make_jpegs(root)
    torch.set_num_threads(1)
    sizes = [p.stat().st_size for p in root.rglob("*.JPEG")]
    print(f"{len(sizes)} JPEGs of 500x375, mean {np.mean(sizes) / 1024:.0f} KiB")
    data = load_dataset("imagenet", root, num_workers=0)
    for name, split in (("training", data.train_split), ("evaluation", data.test_split)):
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(len(split)):
                split[i]
            best = max(best, len(split) / (time.perf_counter() - t0))
        print(f"one process, {name} transform: {best:.0f} images/s (best of 3 passes over {len(split)})")
    for workers in (0, 1, 2):
        loader = load_dataset("imagenet", root, num_workers=workers).train_loader(32, seed=0)
        best = 0.0
        for epoch in range(3):
            t0 = time.perf_counter()
            n = sum(b.images.shape[0] for b in loader.epoch(epoch))
            best = max(best, n / (time.perf_counter() - t0))
        print(f"training epochs through the loader, num_workers={workers}: {best:.0f} images/s (best of 3)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
