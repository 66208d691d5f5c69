"""Datasets: CIFAR-100 (small files in the exact pickle format), Tiny-ImageNet (the shared zips, a fake folder
and zips), the synthetic set, the registry, checksums and statistics."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kdbench.data.cifar100 as cifar_mod
import kdbench.data.tinyimagenet as tiny_mod
from kdbench.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    GPULoader,
    channel_stats,
    data_checksum,
    list_datasets,
    load_dataset,
)
from kdbench.errors import KdbenchError
from tests.conftest import shared_data

SHARED_TINY = shared_data("tiny-imagenet-100")


@pytest.fixture(autouse=True)
def _private_default_dirs(tmp_path, monkeypatch):
    """Never touch ~/.cache: the default data root and cache folder point into the test's tmp dir."""
    monkeypatch.setenv("KDBENCH_DATA_ROOT", str(tmp_path / "default-data"))
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "default-cache"))


# ------------------------------------------------------------------------------------------------ CIFAR-100


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the published CIFAR-100 pickles (made by Python 2) do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: dict) -> bytes:
    """A protocol-2 pickle with py2 str keys/strings and numpy 1.x's module path, like the real files."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")


def cifar_split(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
        b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def write_cifar(folder: Path, n_train: int = 60, n_test: int = 20) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": cifar_split(n_train, 0),
        "test": cifar_split(n_test, 1),
        "meta": {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    }
    for name, obj in parts.items():
        (folder / name).write_bytes(py2_pickle(obj))
    return parts


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A small cifar-100-python/ in the real pickle format; the md5 table patched to its files."""
    root = tmp_path / "data"
    parts = write_cifar(root / "cifar-100-python")
    md5s = {p: md5(root / "cifar-100-python" / p) for p in ("train", "test", "meta")}
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", md5s)
    return root, parts


def test_cifar_md5_table_is_torchvisions():
    from torchvision.datasets import CIFAR100

    published = dict(CIFAR100.train_list + CIFAR100.test_list)
    published[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]
    assert published == cifar_mod.CIFAR100_MD5
    assert CIFAR100.tgz_md5 == cifar_mod.CIFAR100_ARCHIVE_MD5 and CIFAR100.filename == cifar_mod.CIFAR100_ARCHIVE
    assert CIFAR100.base_folder == cifar_mod.CIFAR100_FOLDER and CIFAR100.url == cifar_mod.CIFAR100_URL


def test_cifar100_reads_the_pickles(cifar):
    root, parts = cifar
    ds = load_dataset("cifar100", root)
    assert ds.name == "cifar100" and ds.num_classes == 100 and ds.image_size == 32
    assert ds.classes == [f"fine{i}" for i in range(100)]
    assert ds.train_images.shape == (60, 3, 32, 32) and ds.test_images.shape == (20, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == parts["train"][b"fine_labels"]
    assert ds.test_labels.tolist() == parts["test"][b"fine_labels"]
    # each row of 3072 bytes is the R plane, then G, then B, each 32x32 row-major
    row = parts["train"][b"data"][5]
    assert np.array_equal(ds.train_images[5].numpy(), row.reshape(3, 32, 32))
    assert ds.mean == CIFAR100_MEAN and ds.std == CIFAR100_STD
    assert ds.checksum == data_checksum(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    assert len(ds.checksum) == 64
    # data_root may also be the cifar-100-python folder itself
    assert load_dataset("cifar100", root / "cifar-100-python").checksum == ds.checksum


def test_cifar100_agrees_with_torchvision_reader(cifar, monkeypatch):
    from torchvision.datasets import CIFAR100

    root, _ = cifar
    monkeypatch.setattr(CIFAR100, "train_list", [["train", cifar_mod.CIFAR100_MD5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", cifar_mod.CIFAR100_MD5["test"]]])
    monkeypatch.setattr(
        CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": cifar_mod.CIFAR100_MD5["meta"]}
    )
    ds = load_dataset("cifar100", root)
    for train, images, labels in ((True, ds.train_images, ds.train_labels), (False, ds.test_images, ds.test_labels)):
        tv = CIFAR100(str(root), train=train)
        assert np.array_equal(tv.data, images.permute(0, 2, 3, 1).numpy())  # torchvision keeps HWC
        assert tv.targets == labels.tolist()
    assert tv.classes == ds.classes


def test_cifar100_reads_python3_pickles_too(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    meta = {"fine_label_names": [str(i) for i in range(100)]}
    src = {"train": cifar_split(8, 2), "test": cifar_split(4, 3), "meta": meta}
    for name, obj in src.items():
        plain = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
        (folder / name).write_bytes(pickle.dumps(plain))
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", {p: md5(folder / p) for p in src})
    ds = load_dataset("cifar100", tmp_path)
    assert ds.train_images.shape == (8, 3, 32, 32) and ds.classes[7] == "7"


def test_cifar100_missing_is_one_clear_error(tmp_path):
    with pytest.raises(KdbenchError) as err:
        load_dataset("cifar100", tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere") in msg and "cifar-100-python" in msg
    assert "--data-root" in msg and "--download" in msg


def test_cifar100_default_root_is_named(tmp_path):
    with pytest.raises(KdbenchError, match="default-data"):
        load_dataset("cifar100")


def test_cifar100_corrupt_file(cifar):
    root, _ = cifar
    path = root / "cifar-100-python" / "train"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KdbenchError) as err:
        load_dataset("cifar100", root)
    msg = str(err.value)
    assert "\n" not in msg and "corrupt" in msg and str(path) in msg and cifar_mod.CIFAR100_MD5["train"] in msg


def test_cifar100_truncated_folder(cifar):
    root, _ = cifar
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(KdbenchError, match="incomplete.*meta"):
        load_dataset("cifar100", root)


def test_cifar100_never_unpickles_code(tmp_path, monkeypatch):
    import os

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    write_cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": Evil()}, protocol=2))
    monkeypatch.setattr(
        cifar_mod, "CIFAR100_MD5", {p: md5(tmp_path / "cifar-100-python" / p) for p in ("train", "test", "meta")}
    )
    with pytest.raises(KdbenchError, match="refusing to load the global"):
        load_dataset("cifar100", tmp_path)


def test_cifar100_from_the_tar_gz(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    arch_dir = tmp_path / "archive"
    arch_dir.mkdir()
    archive = arch_dir / cifar_mod.CIFAR100_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(cifar_mod, "CIFAR100_ARCHIVE_MD5", md5(archive))
    ds = load_dataset("cifar100", arch_dir)
    assert ds.checksum == load_dataset("cifar100", root).checksum
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(KdbenchError, match="corrupt or incomplete"):
        load_dataset("cifar100", arch_dir)


def test_cifar100_download(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        write_cifar(Path(download_root) / "cifar-100-python", 10, 5)

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    root = tmp_path / "new"
    write_cifar(tmp_path / "probe", 10, 5)  # same content as the download writes: learn its md5s
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", {p: md5(tmp_path / "probe" / p) for p in ("train", "test", "meta")})
    ds = load_dataset("cifar100", root, download=True)
    assert calls == [(cifar_mod.CIFAR100_URL, cifar_mod.CIFAR100_ARCHIVE, cifar_mod.CIFAR100_ARCHIVE_MD5)]
    assert ds.num_train == 10 and ds.num_test == 5


def test_cifar100_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(KdbenchError) as err:
        load_dataset("cifar100", tmp_path, download=True)
    msg = str(err.value)
    assert "\n" not in msg and cifar_mod.CIFAR100_URL in msg and "--data-root" in msg


def test_cifar100_is_32px_only(cifar):
    with pytest.raises(KdbenchError, match="32x32"):
        load_dataset("cifar100", cifar[0], image_size=64)


# ------------------------------------------------------------------------------------ Tiny-ImageNet (shared)


def _pil_decode(data: bytes, size: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.array(im)


@pytest.fixture(scope="session")
def tiny100(tmp_path_factory):
    if not (SHARED_TINY / "val-and-meta.zip").is_file():
        pytest.skip("the shared Tiny-ImageNet-100 zips are not here")
    cache = tmp_path_factory.mktemp("tiny-cache")
    start = time.perf_counter()
    ds = load_dataset("tinyimagenet", SHARED_TINY, cache_dir=cache)
    return ds, cache, time.perf_counter() - start


@pytest.fixture(scope="session")
def tiny100_meta():
    with zipfile.ZipFile(SHARED_TINY / "val-and-meta.zip") as zf:
        wnids = zf.read("tiny-imagenet-100/wnids.txt").decode().split()
        words = dict(line.split("\t", 1) for line in zf.read("tiny-imagenet-100/words.txt").decode().splitlines())
        ann = [
            line.split("\t")[:2]
            for line in zf.read("tiny-imagenet-100/val/val_annotations.txt").decode().splitlines()
            if line.strip()
        ]
    return wnids, words, ann


@pytest.mark.slow
def test_tiny100_from_the_shared_zips(tiny100, tiny100_meta):
    ds, _, seconds = tiny100
    wnids, words, _ = tiny100_meta
    print(f"Tiny-ImageNet-100 decode (50k + 5k JPEGs -> 32px): {seconds:.1f} s")
    assert ds.name == "tinyimagenet" and ds.num_classes == 100 and ds.image_size == 32
    assert ds.class_ids == wnids
    assert ds.classes == [words[w].strip() for w in wnids]
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (5000, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.test_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_labels, minlength=100), torch.full((100,), 500))
    assert torch.equal(torch.bincount(ds.test_labels, minlength=100), torch.full((100,), 50))
    assert ds.checksum == data_checksum(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    mean, std = channel_stats(ds.train_images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    assert all(0.3 < m < 0.6 for m in ds.mean) and all(0.15 < s < 0.35 for s in ds.std)


@pytest.mark.slow
def test_tiny100_val_labels_and_grayscale(tiny100, tiny100_meta):
    ds, _, _ = tiny100
    wnids, _, ann = tiny100_meta
    index = {w: i for i, w in enumerate(wnids)}
    checked_gray = 0
    with zipfile.ZipFile(SHARED_TINY / "val-and-meta.zip") as zf:
        for fname, wnid in ann[::97]:  # a spread of validation images, decoded independently
            data = zf.read(f"tiny-imagenet-100/val/images/{fname}")
            ref = torch.from_numpy(_pil_decode(data, 32)).permute(2, 0, 1)
            rows = (ds.test_images == ref).flatten(1).all(1).nonzero().flatten()
            assert len(rows) == 1, fname
            assert int(ds.test_labels[rows[0]]) == index[wnid]
        for fname, _ in ann:  # grayscale JPEGs come out RGB with three equal planes
            data = zf.read(f"tiny-imagenet-100/val/images/{fname}")
            if Image.open(io.BytesIO(data)).mode != "L":
                continue
            ref = torch.from_numpy(_pil_decode(data, 32)).permute(2, 0, 1)
            row = (ds.test_images == ref).flatten(1).all(1).nonzero().flatten()[0]
            img = ds.test_images[row]
            assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
            checked_gray += 1
            if checked_gray == 3:
                break
    assert checked_gray == 3


@pytest.mark.slow
def test_tiny100_cache_is_reused(tiny100, monkeypatch):
    ds, cache, _ = tiny100
    assert len(list(cache.glob("tinyimagenet100-32px-*.pt"))) == 1
    assert not list(SHARED_TINY.glob("*.pt"))

    def no_decoding(*args, **kw):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(tiny_mod, "_decode_all", no_decoding)
    start = time.perf_counter()
    again = load_dataset("tinyimagenet", SHARED_TINY, cache_dir=cache)
    print(f"Tiny-ImageNet-100 from the cache: {time.perf_counter() - start:.2f} s")
    assert again.checksum == ds.checksum and again.classes == ds.classes and again.mean == ds.mean
    assert torch.equal(again.test_images, ds.test_images) and torch.equal(again.train_labels, ds.train_labels)


# -------------------------------------------------------------------------------------- Tiny-ImageNet (fake)

WNIDS = ["n02000002", "n01000001", "n03000003"]  # deliberately not sorted: class order is the file's order
WORDS = {"n01000001": "alpha, first", "n02000002": "beta", "n03000003": "gamma ray", "n09999999": "unused"}
N_TRAIN = 11  # per class, so natural order (0, 1, 2, ..., 10) differs from text order (0, 1, 10, 2, ...)


def _jpeg(seed: int, mode: str = "RGB", size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_fake_tiny(root: Path, name: str = "tiny-imagenet-200") -> Path:
    """A tiny copy of the official layout, with a grayscale and a CMYK JPEG among the files."""
    base = root / name
    (base / "val" / "images").mkdir(parents=True)
    (base / "test" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in WNIDS))
    (base / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in sorted(WORDS.items())))
    seed = 0
    for w in WNIDS:
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(N_TRAIN):
            seed += 1
            mode = "L" if (w, k) == (WNIDS[1], 3) else "RGB"
            (base / "train" / w / "images" / f"{w}_{k}.JPEG").write_bytes(_jpeg(seed, mode))
    lines = []
    for k in range(9):
        seed += 1
        mode = "CMYK" if k == 4 else "RGB"
        (base / "val" / "images" / f"val_{k}.JPEG").write_bytes(_jpeg(seed, mode))
        lines.append(f"val_{k}.JPEG\t{WNIDS[k % 3]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(reversed(lines)))
    (base / "test" / "images" / "test_0.JPEG").write_bytes(b"not a jpeg: the test split is never read")
    return base


def expected_fake(base: Path, size: int):
    imgs, labels = [], []
    for c, w in enumerate(WNIDS):
        for k in range(N_TRAIN):
            imgs.append(_pil_decode((base / "train" / w / "images" / f"{w}_{k}.JPEG").read_bytes(), size))
            labels.append(c)
    test = [_pil_decode((base / "val" / "images" / f"val_{k}.JPEG").read_bytes(), size) for k in range(9)]

    def as_t(a):
        return torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2)

    return as_t(imgs), torch.tensor(labels), as_t(test), torch.tensor([k % 3 for k in range(9)])


@pytest.fixture
def fake_tiny(tmp_path):
    root = tmp_path / "data"
    return root, make_fake_tiny(root)


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_folder_layout(fake_tiny, size):
    root, base = fake_tiny
    ds = load_dataset("tinyimagenet", root, image_size=None if size == 32 else size)
    train_x, train_y, test_x, test_y = expected_fake(base, size)
    assert ds.class_ids == WNIDS and ds.classes == [WORDS[w] for w in WNIDS]
    assert ds.image_size == size and ds.train_images.shape == (3 * N_TRAIN, 3, size, size)
    assert torch.equal(ds.train_images, train_x) and torch.equal(ds.train_labels, train_y)
    assert torch.equal(ds.test_images, test_x) and torch.equal(ds.test_labels, test_y)
    gray = ds.train_images[N_TRAIN + 3]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert ds.test_images.dtype == torch.uint8
    # pointing at the dataset folder itself works the same
    assert load_dataset("tinyimagenet", base, image_size=size, cache=False).checksum == ds.checksum


def test_tiny_zip_archives_read_directly(fake_tiny, tmp_path):
    root, base = fake_tiny
    folder_ds = load_dataset("tinyimagenet", root, cache=False)
    files = sorted(p for p in base.rglob("*") if p.is_file())
    official = tmp_path / "official"
    official.mkdir()
    with zipfile.ZipFile(official / "tiny-imagenet-200.zip", "w") as zf:
        for p in files:
            zf.write(p, p.relative_to(root).as_posix())
    split = tmp_path / "split"
    split.mkdir()
    with zipfile.ZipFile(split / "train-a.zip", "w") as za, zipfile.ZipFile(split / "meta.zip", "w") as zb:
        for p in files:
            rel = p.relative_to(root).as_posix()
            (za if "/train/" in rel else zb).write(p, rel)
    for where in (official, official / "tiny-imagenet-200.zip", split):
        ds = load_dataset("tinyimagenet", where, cache_dir=tmp_path / "c", cache=False)
        assert ds.checksum == folder_ds.checksum and ds.classes == folder_ds.classes


def test_tiny_cache_next_to_the_data_and_reused(fake_tiny, tmp_path, monkeypatch):
    root, base = fake_tiny
    calls = []
    real_decode = tiny_mod._decode_all
    monkeypatch.setattr(tiny_mod, "_decode_all", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    first = load_dataset("tinyimagenet", root)
    assert len(calls) == 1 and len(list(root.glob("tinyimagenet3-32px-*.pt"))) == 1
    second = load_dataset("tinyimagenet", root)
    assert len(calls) == 1 and second.checksum == first.checksum and second.mean == first.mean
    load_dataset("tinyimagenet", root, image_size=64)  # the size is part of the key
    assert len(calls) == 2
    # a changed source file (size / mtime) invalidates the cache
    (base / "val" / "images" / "val_2.JPEG").write_bytes(_jpeg(999))
    third = load_dataset("tinyimagenet", root)
    assert len(calls) == 3 and third.checksum != first.checksum
    assert len(list(root.glob("tinyimagenet3-32px-*.pt"))) == 1  # the stale cache is replaced


def test_tiny_cache_is_written_through_the_one_atomic_writer(fake_tiny, monkeypatch):
    """The cache goes through kdbench.files (a temporary file, fsynced, renamed): no second writer without fsync."""
    import os

    import kdbench.files

    root, _ = fake_tiny
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(kdbench.files.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    load_dataset("tinyimagenet", root)
    (cache,) = root.glob("tinyimagenet3-32px-*.pt")
    assert len(synced) == 1 and not list(root.glob(".*.tmp"))


@pytest.fixture
def read_only(tmp_path):
    """chmod a folder to r-x (kdbench treats that as read-only even when running as root); undone afterwards."""
    done = []

    def make(path: Path) -> Path:
        path.chmod(0o555)
        done.append(path)
        return path

    yield make
    for path in done:
        path.chmod(0o755)


def test_tiny_cache_falls_back_when_the_data_is_read_only(fake_tiny, tmp_path, monkeypatch, read_only):
    root, _ = fake_tiny
    read_only(root)
    first = load_dataset("tinyimagenet", root)
    assert not list(root.glob("*.pt"))
    assert len(list((tmp_path / "default-cache").glob("tinyimagenet3-32px-*.pt"))) == 1
    calls = []
    monkeypatch.setattr(tiny_mod, "_decode_all", lambda *a, **k: calls.append(1))
    assert load_dataset("tinyimagenet", root).checksum == first.checksum
    assert not calls


def test_tiny_progress_and_worker_pool(fake_tiny, monkeypatch):
    root, _ = fake_tiny
    monkeypatch.setattr(tiny_mod, "_CHUNK", 4)  # small chunks so the pool path runs on the tiny fake set
    pooled = load_dataset("tinyimagenet", root, num_workers=2, progress=True, cache=False)
    serial = load_dataset("tinyimagenet", root, num_workers=1, cache=False)
    assert pooled.checksum == serial.checksum


def test_tiny_download(fake_tiny, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    src_root, base = fake_tiny
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):
        calls.append((url, filename))
        with zipfile.ZipFile(Path(root) / filename, "w") as zf:
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(src_root).as_posix())

    monkeypatch.setattr(tvu, "download_url", fake_download)
    ds = load_dataset("tinyimagenet", tmp_path / "fresh", download=True)
    assert calls == [(tiny_mod.TINY_IMAGENET_URL, "tiny-imagenet-200.zip")]
    assert ds.checksum == load_dataset("tinyimagenet", src_root, cache=False).checksum
    load_dataset("tinyimagenet", tmp_path / "fresh", download=True)  # present now: no second download
    assert len(calls) == 1


def test_tiny_errors(fake_tiny, tmp_path):
    root, base = fake_tiny
    with pytest.raises(KdbenchError, match="--data-root") as err:
        load_dataset("tinyimagenet", tmp_path / "empty")
    assert "\n" not in str(err.value)
    ann = base / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text("".join(line for line in text.splitlines(True) if not line.startswith("val_7.")))
    with pytest.raises(KdbenchError, match="val_7.JPEG has no line"):
        load_dataset("tinyimagenet", root)
    ann.write_text(text.replace("val_7.JPEG\tn01000001", "val_7.JPEG\tn07777777"))
    with pytest.raises(KdbenchError, match="not in wnids.txt"):
        load_dataset("tinyimagenet", root)
    ann.write_text(text)
    (base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_2.JPEG").write_bytes(b"garbage")
    with pytest.raises(KdbenchError, match="cannot decode image"):
        load_dataset("tinyimagenet", root)
    make_fake_tiny(root, "tiny-imagenet-100")
    with pytest.raises(KdbenchError, match="several Tiny-ImageNet folders"):
        load_dataset("tinyimagenet", root)


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic", num_classes=7, image_size=20, train_size=70, test_size=21, seed=3)
    b = load_dataset("synthetic", num_classes=7, image_size=20, train_size=70, test_size=21, seed=3)
    c = load_dataset("synthetic", num_classes=7, image_size=20, train_size=70, test_size=21, seed=4)
    assert a.train_images.shape == (70, 3, 20, 20) and a.test_images.shape == (21, 3, 20, 20)
    assert a.train_images.dtype == torch.uint8 and a.train_labels.dtype == torch.int64
    assert a.num_classes == 7 and a.image_size == 20 and len(a.classes) == 7
    assert torch.equal(torch.bincount(a.train_labels), torch.full((7,), 10))
    for t in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    assert a.checksum == b.checksum != c.checksum
    assert not torch.equal(a.train_images, c.train_images)
    assert a.mean == pytest.approx(channel_stats(a.train_images)[0])


@pytest.fixture
def one_thread():
    """A tiny net trains faster on one thread, and much faster when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_synthetic_is_learnable(one_thread):
    ds = load_dataset("synthetic", num_classes=10, train_size=2000, test_size=500, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    train = ds.train_loader(32, seed=0, drop_last=True)
    steps, epoch = 0, 0
    while steps < 200:
        for batch in train.epoch(epoch):
            loss = nn.functional.cross_entropy(net(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 200:
                break
        epoch += 1
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(b.images).argmax(1) == b.labels).sum()) for b in ds.test_loader(250))
    acc = correct / ds.num_test
    assert acc > 0.5, acc  # chance is 0.1


# --------------------------------------------------------------------------------------- registry / helpers


def test_registry_and_errors():
    names = [n for n, _ in list_datasets()]
    assert names == list(DATASETS) and {"cifar100", "tinyimagenet", "synthetic"} <= set(names)
    assert all(desc and "\n" not in desc for _, desc in list_datasets())
    with pytest.raises(
        KdbenchError, match="unknown dataset 'cifar1000'.*cifar100, imagenet, stl10, synthetic, tinyimagenet"
    ):
        load_dataset("cifar1000")
    with pytest.raises(KdbenchError, match="no option.*colour"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(KdbenchError, match="num_classes"):
        load_dataset("synthetic", num_classes=0)


def test_checksum_and_stats_helpers():
    ds = load_dataset("synthetic", train_size=30, test_size=10)
    x = ds.train_images.clone()
    x[3, 1, 2, 2] ^= 1
    assert data_checksum(x, ds.train_labels, ds.test_images, ds.test_labels) != ds.checksum
    y = ds.train_labels.clone()
    y[0] = (y[0] + 1) % 10
    assert data_checksum(ds.train_images, y, ds.test_images, ds.test_labels) != ds.checksum
    f = ds.train_images.double() / 255
    mean, std = channel_stats(ds.train_images)
    assert mean == pytest.approx(f.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(f.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    loader = ds.train_loader(8)
    assert isinstance(loader, GPULoader) and len(loader) == 4
    assert "synthetic" in repr(ds) and "checksum" in repr(ds)
