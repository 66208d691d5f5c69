"""Tiny-ImageNet (200 classes, or a 100-class subset) from its folder or zip(s), decoded once and cached."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import pickle
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdbench.data.dataset import Dataset, build_dataset, default_cache_dir
from kdbench.errors import KdbenchError
from kdbench.files import atomic_torch_save
from kdbench.system import usable_cores

# ------------------------------------------------------------------------------------------ Tiny-ImageNet

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IMAGE_EXTS = (".jpeg", ".jpg", ".png")
_CACHE_VERSION = 1
_log = logging.getLogger(__name__)  # the CLI shows these messages on stderr
_CHUNK = 1000  # images per decoding task


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass
class _TinySource:
    """The files of one Tiny-ImageNet copy: ``rel path -> (zip path or None, member or file path)``."""

    root: Path  # the data_root it was found in (the cache goes next to it)
    where: str  # for messages and Dataset.source
    files: dict[str, tuple[str | None, str]]
    stamps: list[tuple[str, int, int]]  # (name, size, mtime_ns) of what was read: the cache key
    zips: dict[str, zipfile.ZipFile] = field(default_factory=dict)  # open archives (parsing one costs ~0.1 s)

    def read(self, rel: str) -> bytes:
        container, member = self.files[rel]
        return _read_member(container, member, self.zips)

    def close(self) -> None:
        for zf in self.zips.values():
            zf.close()
        self.zips.clear()


def _read_member(container: str | None, member: str, zips: dict[str, zipfile.ZipFile]) -> bytes:
    if container is None:
        return Path(member).read_bytes()
    zf = zips.get(container)
    if zf is None:
        zf = zips[container] = zipfile.ZipFile(container)
    return zf.read(member)


def _tiny_missing(root: Path) -> KdbenchError:
    return KdbenchError(
        f"Tiny-ImageNet not found in {root}: expected a folder holding wnids.txt, words.txt, train/ and val/ "
        "(e.g. tiny-imagenet-200/) or its zip archive(s) (tiny-imagenet-200.zip, or train-part*.zip + "
        "val-and-meta.zip); pass --data-root DIR holding them, or --download for tiny-imagenet-200.zip"
    )


def _find_tiny(root: Path) -> _TinySource:
    if root.is_file() and root.suffix.lower() == ".zip":
        return _tiny_from_zips(root.parent, [root])
    if not root.is_dir():
        raise _tiny_missing(root)
    folders = [root] if (root / "wnids.txt").is_file() else sorted(p.parent for p in root.glob("*/wnids.txt"))
    if len(folders) > 1:
        raise KdbenchError(
            f"several Tiny-ImageNet folders in {root} ({', '.join(p.name for p in folders)}): "
            "pass --data-root pointing at one of them"
        )
    if folders:
        return _tiny_from_folder(root, folders[0])
    zips = sorted(root.glob("*.zip"))
    if not zips:
        raise _tiny_missing(root)
    return _tiny_from_zips(root, zips)


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXTS)


def _tiny_from_folder(root: Path, folder: Path) -> _TinySource:
    files: dict[str, tuple[str | None, str]] = {}
    stamps: list[tuple[str, int, int]] = []

    def add(rel: str, path: str, st: os.stat_result) -> None:
        files[rel] = (None, path)
        stamps.append((rel, st.st_size, st.st_mtime_ns))

    for rel in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        p = folder / rel
        if p.is_file():
            add(rel, str(p), p.stat())
    for sub in [folder / "val" / "images", *sorted((folder / "train").glob("*/images"))]:
        prefix = sub.relative_to(folder).as_posix()
        with os.scandir(sub) as it:
            for entry in it:
                if entry.is_file() and _is_image(entry.name):
                    add(f"{prefix}/{entry.name}", entry.path, entry.stat())
    stamps.sort()
    return _TinySource(root, str(folder), files, stamps)


def _tiny_from_zips(root: Path, zips: list[Path]) -> _TinySource:
    listing: dict[Path, list[str]] = {}
    opened: dict[str, zipfile.ZipFile] = {}
    for z in zips:
        try:
            opened[str(z)] = zipfile.ZipFile(z)
        except (zipfile.BadZipFile, OSError) as exc:
            for zf in opened.values():
                zf.close()
            raise KdbenchError(f"{z} is not a readable zip archive ({exc}): delete or replace it") from None
        listing[z] = opened[str(z)].namelist()
    prefixes = sorted(
        {
            n[: -len("wnids.txt")]
            for names in listing.values()
            for n in names
            if n.endswith("wnids.txt") and (n == "wnids.txt" or n.endswith("/wnids.txt"))
        }
    )
    if len(prefixes) != 1:
        for zf in opened.values():
            zf.close()
    if not prefixes:
        raise KdbenchError(
            f"no wnids.txt in the zip archives in {root} ({', '.join(z.name for z in zips)}): "
            "they do not hold Tiny-ImageNet; pass --data-root DIR holding its zip(s) or folder"
        )
    if len(prefixes) > 1:
        raise KdbenchError(
            f"several Tiny-ImageNet copies in the zips in {root} "
            f"({', '.join(p.rstrip('/') or '.' for p in prefixes)}): keep one, or pass --data-root "
            "pointing at a folder holding only one"
        )
    prefix = prefixes[0]
    files: dict[str, tuple[str | None, str]] = {}
    stamps: list[tuple[str, int, int]] = []
    for z, names in listing.items():
        used = False
        for n in names:
            if n.startswith(prefix) and not n.endswith("/"):
                files.setdefault(n[len(prefix) :], (str(z), n))
                used = True
        if used:
            st = z.stat()
            stamps.append((z.name, st.st_size, st.st_mtime_ns))
    used_zips = {str(root / s[0]) for s in stamps}
    for name in [n for n in opened if n not in used_zips]:
        opened.pop(name).close()
    return _TinySource(root, f"{root} ({', '.join(s[0] for s in stamps)})", files, stamps, opened)


def _tiny_index(src: _TinySource) -> tuple[list[str], list[str], list[str], list[int], list[str], list[int]]:
    """wnids, class names, train files + labels, val files + labels, all from the metadata files."""
    if "wnids.txt" not in src.files:
        raise _tiny_missing(src.root)
    wnids = [w.strip() for w in src.read("wnids.txt").decode("utf-8").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise KdbenchError(f"wnids.txt in {src.where} is empty or repeats an id")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if "words.txt" in src.files:
        for line in src.read("words.txt").decode("utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid.strip() in index:
                words[wnid.strip()] = text.strip()
    names = [words.get(w) or w for w in wnids]

    by_class: dict[str, list[str]] = {w: [] for w in wnids}
    val_files: list[str] = []
    for rel in src.files:
        parts = rel.split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and _is_image(parts[3]):
            if parts[1] in by_class:
                by_class[parts[1]].append(rel)
        elif len(parts) == 3 and parts[:2] == ["val", "images"] and _is_image(parts[2]):
            val_files.append(rel)
    train_files: list[str] = []
    train_labels: list[int] = []
    for w in wnids:
        if not by_class[w]:
            raise KdbenchError(
                f"Tiny-ImageNet in {src.where}: no training images under train/{w}/images/ "
                "(is an archive or part of the folder missing?)"
            )
        train_files += sorted(by_class[w], key=_natural_key)
        train_labels += [index[w]] * len(by_class[w])

    if "val/val_annotations.txt" not in src.files:
        raise KdbenchError(f"Tiny-ImageNet in {src.where}: val/val_annotations.txt is missing")
    ann: dict[str, str] = {}
    for line in src.read("val/val_annotations.txt").decode("utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0].strip():
            ann[cols[0].strip()] = cols[1].strip()
    val_files.sort(key=_natural_key)
    present = {rel.rsplit("/", 1)[1] for rel in val_files}
    missing = [f for f in ann if f not in present]
    if missing:
        raise KdbenchError(
            f"Tiny-ImageNet in {src.where}: {len(missing)} validation image(s) listed in "
            f"val_annotations.txt are missing from val/images/ (e.g. {missing[0]})"
        )
    val_labels: list[int] = []
    for rel in val_files:
        fname = rel.rsplit("/", 1)[1]
        wnid = ann.get(fname)
        if wnid is None:
            raise KdbenchError(f"Tiny-ImageNet in {src.where}: val/images/{fname} has no line in val_annotations.txt")
        if wnid not in index:
            raise KdbenchError(
                f"Tiny-ImageNet in {src.where}: val/images/{fname} is labelled {wnid}, which is not in wnids.txt"
            )
        val_labels.append(index[wnid])
    if not val_files:
        raise KdbenchError(f"Tiny-ImageNet in {src.where}: no images under val/images/")
    return wnids, names, train_files, train_labels, val_files, val_labels


def _decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """One image file -> uint8 [size, size, 3]: converted to RGB, then PIL bilinear (antialiased) resize."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KdbenchError(f"cannot decode image {name}: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


_WORKER_ZIPS: dict[str, zipfile.ZipFile] = {}  # a worker process keeps its archives open between chunks


def _decode_chunk(
    container: str | None, members: list[str], size: int, zips: dict[str, zipfile.ZipFile] | None = None
) -> np.ndarray:
    """Decode a list of files from one zip (or from the file system); runs in a worker process."""
    zips = _WORKER_ZIPS if zips is None else zips
    out = np.empty((len(members), size, size, 3), dtype=np.uint8)
    for i, m in enumerate(members):
        try:
            data = _read_member(container, m, zips)
        except (zipfile.BadZipFile, OSError) as exc:  # a bad CRC-32 lands here: every member read is checked
            raise KdbenchError(f"cannot read {f'{container}:{m}' if container else m}: {exc}") from None
        out[i] = _decode_image(data, size, f"{container}:{m}" if container else m)
    return out


def _default_workers() -> int:
    return max(1, min(usable_cores(), 16))


def _decode_all(
    src: _TinySource, rels: list[str], size: int, *, num_workers: int | None, progress: bool, desc: str
) -> np.ndarray:
    """Decode ``rels`` into one uint8 [N, size, size, 3] array, in a process pool when it pays off."""
    tasks: list[tuple[int, str | None, list[str]]] = []  # (start, container, members)
    start = 0
    while start < len(rels):
        container = src.files[rels[start]][0]
        stop = start
        members: list[str] = []
        while stop < len(rels) and len(members) < _CHUNK and src.files[rels[stop]][0] == container:
            members.append(src.files[rels[stop]][1])
            stop += 1
        tasks.append((start, container, members))
        start = stop
    out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    workers = min(workers, len(tasks))

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        bar.start()
        task_id = bar.add_task(desc, total=len(rels))

    def advance(n: int) -> None:
        if bar is not None:
            bar.advance(task_id, n)

    def serial() -> None:
        for s, container, members in tasks:
            out[s : s + len(members)] = _decode_chunk(container, members, size, src.zips)
            advance(len(members))

    try:
        if workers <= 1 or len(rels) < 4 * _CHUNK:
            serial()
        else:
            try:
                _decode_in_pool(tasks, size, workers, out, advance)
            except cf.process.BrokenProcessPool:  # a worker died (spawn without a __main__ guard, OOM): go on here
                if bar is not None:
                    bar.reset(task_id)
                serial()
    finally:
        if bar is not None:
            bar.stop()
    return out


def _decode_in_pool(
    tasks: list[tuple[int, str | None, list[str]]],
    size: int,
    workers: int,
    out: np.ndarray,
    advance: Callable[[int], Any],
) -> None:
    # fork where there is one: the workers touch only zipfile, PIL and numpy (no torch, no threads), and, unlike
    # spawn / forkserver, fork does not re-run the user's __main__ script.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            futures = {pool.submit(_decode_chunk, c, m, size): (s, len(m)) for s, c, m in tasks}
            try:
                for fut in cf.as_completed(futures):
                    s, n = futures[fut]
                    out[s : s + n] = fut.result()
                    advance(n)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _cache_key(src: _TinySource, image_size: int) -> str:
    payload = {
        "format": "kdbench-tinyimagenet",
        "version": _CACHE_VERSION,
        "image_size": image_size,
        "files": src.stamps,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # unreadable: decode again
        return None
    if not isinstance(blob, dict) or blob.get("key") != key or blob.get("version") != _CACHE_VERSION:
        return None
    return blob


def _writable(d: Path) -> bool:
    """Whether caches may be written into ``d`` (created if missing).

    A folder with no write bit at all counts as read-only even for root, who could write there anyway.
    """
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def _write_cache(dirs: Sequence[Path], stem: str, blob: dict[str, Any]) -> Path | None:
    """Write atomically (kdbench.files: fsync, then rename) into the first writable folder; remove stale caches
    of the same data there."""
    for d in dirs:
        path = d / f"{stem}-{blob['key'][:16]}.pt"
        if not _writable(d):
            continue
        try:
            atomic_torch_save(path, blob)
        except OSError:
            continue
        for old in d.glob(f"{stem}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
        return path
    return None


def _load_tinyimagenet(
    data_root: Path,
    *,
    image_size: int | None,
    download: bool,
    cache_dir: Path | None,
    progress: bool = False,
    num_workers: int | None = None,
    cache: bool = True,
) -> Dataset:
    size = 32 if image_size is None else int(image_size)
    if size <= 0:
        raise KdbenchError(f"image_size must be positive, got {image_size}")
    try:
        src = _find_tiny(data_root)
    except KdbenchError:
        if not download:
            raise
        _download_tiny(data_root)
        src = _find_tiny(data_root)
    try:
        return _tiny_dataset(src, size, cache_dir=cache_dir, progress=progress, num_workers=num_workers, cache=cache)
    finally:
        src.close()


def _tiny_dataset(
    src: _TinySource, size: int, *, cache_dir: Path | None, progress: bool, num_workers: int | None, cache: bool
) -> Dataset:
    wnids, names, train_rels, train_labels, val_rels, val_labels = _tiny_index(src)
    key = _cache_key(src, size)
    stem = f"tinyimagenet{len(wnids)}-{size}px"
    # An explicit cache_dir is where caches go; by default they go next to the data, or to ~/.cache/kdbench
    # when that folder is read-only. A valid cache is read from either place.
    dirs = [cache_dir, src.root] if cache_dir is not None else [src.root, default_cache_dir()]
    dirs = list(dict.fromkeys(d.resolve() for d in dirs))
    if cache:
        for d in dirs:
            blob = _read_cache(d / f"{stem}-{key[:16]}.pt", key)
            if blob is not None:
                return build_dataset(
                    "tinyimagenet",
                    blob["train_images"],
                    blob["train_labels"],
                    blob["test_images"],
                    blob["test_labels"],
                    blob["classes"],
                    mean=blob["mean"],
                    std=blob["std"],
                    checksum=blob["checksum"],
                    class_ids=blob["class_ids"],
                    source=src.where,
                )

    t0 = time.perf_counter()
    where = " or ".join(str(d) for d in (dirs if cache_dir is None else dirs[:1]))
    _log.info(
        f"decoding {len(train_rels) + len(val_rels):,} Tiny-ImageNet images ({len(wnids)} classes) from "
        f"{src.where}, resized to {size}x{size}"
        + (f": first use only (about a minute on 2 cores), then cached in {where}" if cache else "")
    )
    pixels = _decode_all(
        src,
        train_rels + val_rels,
        size,
        num_workers=num_workers,
        progress=progress,
        desc=f"decoding Tiny-ImageNet ({len(wnids)} classes, {size}px)",
    )
    n = len(train_rels)
    train_x = torch.from_numpy(pixels[:n]).permute(0, 3, 1, 2).contiguous()
    test_x = torch.from_numpy(pixels[n:]).permute(0, 3, 1, 2).contiguous()
    del pixels
    ds = build_dataset(
        "tinyimagenet",
        train_x,
        torch.tensor(train_labels, dtype=torch.int64),
        test_x,
        torch.tensor(val_labels, dtype=torch.int64),
        names,
        class_ids=wnids,
        source=src.where,
    )
    if cache:
        written = _write_cache(
            dirs if cache_dir is None else dirs[:1],
            stem,
            {
                "version": _CACHE_VERSION,
                "key": key,
                "train_images": ds.train_images,
                "train_labels": ds.train_labels,
                "test_images": ds.test_images,
                "test_labels": ds.test_labels,
                "classes": ds.classes,
                "class_ids": ds.class_ids,
                "mean": list(ds.mean),
                "std": list(ds.std),
                "checksum": ds.checksum,
            },
        )
        _log.info(
            f"decoded in {time.perf_counter() - t0:.0f} s; "
            + (f"cached as {written}" if written else "no writable cache folder: the next run decodes again")
        )
    return ds


def _download_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_url

    try:
        root.mkdir(parents=True, exist_ok=True)
        # No published md5: every member is still checked against its CRC-32 when it is read from the zip.
        download_url(TINY_IMAGENET_URL, str(root), filename="tiny-imagenet-200.zip")
    except (OSError, RuntimeError, ValueError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise KdbenchError(
            f"could not download Tiny-ImageNet from {TINY_IMAGENET_URL} into {root} ({msg}); fetch "
            "tiny-imagenet-200.zip elsewhere and pass --data-root DIR holding it"
        ) from None
