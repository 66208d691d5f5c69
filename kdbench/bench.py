"""``kdbench bench``: training speed of kdbench's loop against a reference-style (RepDistiller) loop.

Three configurations are timed in one process, on the same model, method and loss code (``build_member`` and
``main_terms``), so only the data path and the loop structure differ:

- ``reference``: a torch ``DataLoader`` over a map-style ``Dataset`` of uint8 images that go through PIL and the
  torchvision transforms in worker processes, fp32, eager, one method at a time, the loss read back to the host
  every step (RepDistiller's meters do this): teacher forward + student forward + loss + step per batch.
- ``solo``: kdbench's ``GPULoader`` (the split kept on the device, crop/flip batched there), one method at a time.
- ``cohort``: the ``GPULoader`` stream with several methods side by side and one teacher forward per batch, as
  ``train_cohort`` steps them.

The data are synthetic CIFAR-shaped images (no download). Timings are of ``steps`` batches after ``warmup``
(optionally spread over interleaved rounds, for a machine whose load changes); "seconds per CIFAR-100 epoch" is an
extrapolation, 50,000 images / measured images per second.
The code is device-agnostic (no CUDA-only paths); on CUDA the timer synchronises the device.
"""

from __future__ import annotations

import gc
import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdbench.data import Dataset, GPULoader, data_checksum, load_dataset
from kdbench.errors import KdbenchError
from kdbench.method import Batch, Progress
from kdbench.models import create_model, freeze
from kdbench.results import ResultStore
from kdbench.system import device_name, resolve_device, usable_cores

BENCH_SCHEMA = 1
CIFAR100_EPOCH = 50_000  # training images per CIFAR-100 epoch: the scale of the extrapolation
NUM_CLASSES = 100
IMAGE_SIZE = 32
TIMING_CHUNKS = 5  # timed steps are split into this many separately timed chunks
SYNTHETIC_BASE = 5_000  # distinct synthetic images generated; a larger train_size tiles them (see bench_data)
CONFIGS = ("reference", "solo", "cohort")
# kdbench's loop in each execution variant: eager or compiled forward, fp32 or bf16 autocast. The reference loop
# runs once, in eager fp32 (as the reference code does).
VARIANTS = ("eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16")
DEFAULT_PAIR = "resnet32x4:resnet8x4"
DEFAULT_METHODS = ("kd", "crd", "rrd")
# Timed steps are steady-state main-stage steps: a method's schedule is read at the start of the main stage.
BENCH_PROGRESS = Progress(epoch=0, epochs=1, step=0, steps=1)

__all__ = [
    "CIFAR100_EPOCH",
    "CONFIGS",
    "VARIANTS",
    "DEFAULT_METHODS",
    "DEFAULT_PAIR",
    "ReferenceDataset",
    "bench_data",
    "bench_table",
    "default_workers",
    "device_name",
    "reference_loader",
    "reference_transform",
    "run_bench",
]

# Where `kdbench bench` writes its JSON by default: the bench/ folder of the default results folder.
DEFAULT_OUT = ResultStore("results").bench_dir


# ---------------------------------------------------------------------------------------------- environment


def default_workers() -> int:
    """The reference loop's worker processes: one per usable core, at most 8."""
    return max(1, min(8, usable_cores()))


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise KdbenchError(f"device {dev} is not supported by kdbench bench: use cpu or cuda")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Memory:
    """Peak memory of one configuration, and its increment over what was held when the configuration was built.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: there is no allocator counter, so the
    closest proxy is the resident set size. Linux lets a process reset its own peak (VmHWM, by writing 5 to
    /proc/self/clear_refs), which gives a per-configuration figure (``getrusage``'s ru_maxrss then reports the same
    reset peak); where that fails, ru_maxrss is the process's lifetime peak (it includes building the data set),
    labelled as such. The reference loop's worker processes are not counted either way.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.hwm_reset = False
        self.base_mb: float | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base_mb = _proc_status_mb("VmRSS:")

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            out: dict[str, Any] = {"peak_memory_mb": peak, "memory_kind": "cuda max_memory_allocated"}
        else:
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            hwm = _proc_status_mb("VmHWM:") if self.hwm_reset else None
            out = {"ru_maxrss_mb": ru}
            if hwm is not None:
                peak = hwm
                out["memory_kind"] = (
                    "cpu proxy: peak resident set size of the main process from this "
                    "configuration's start (VmHWM reset through /proc/self/clear_refs; worker "
                    "processes not included)"
                )
            else:
                peak = ru
                out["memory_kind"] = (
                    "cpu proxy: resource.getrusage ru_maxrss, the main process's lifetime peak "
                    "resident set size (never reset; not per configuration)"
                )
            out["peak_memory_mb"] = peak
        out["base_memory_mb"] = self.base_mb
        out["peak_increment_mb"] = peak - self.base_mb if self.base_mb is not None else None
        return out


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------------------------- data


def bench_data(train_size: int, seed: int = 0) -> Dataset:
    """Synthetic CIFAR-100-shaped data: 100 classes of uint8 3x32x32 images, ``train_size`` training samples.

    At most ``SYNTHETIC_BASE`` distinct images are generated (the generator works in float64, several GB at 50,000)
    and tiled up to ``train_size``: speed does not depend on the pixels, but CRD's negative sampler and memory
    banks scale with the training-set size, so the default (50,000) matches CIFAR-100.
    """
    base_n = min(train_size, SYNTHETIC_BASE)
    base = load_dataset(
        "synthetic", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, train_size=base_n, test_size=NUM_CLASSES, seed=seed
    )
    if train_size == base_n:
        return base
    reps = -(-train_size // base_n)
    images = base.train_images.repeat(reps, 1, 1, 1)[:train_size].contiguous()
    labels = base.train_labels.repeat(reps)[:train_size].contiguous()
    return Dataset(
        base.name,
        images,
        labels,
        base.test_images,
        base.test_labels,
        list(base.classes),
        base.mean,
        base.std,
        data_checksum(images, labels, base.test_images, base.test_labels),
        source=f"{base.source} tiled to {train_size} training images",
    )


def reference_transform(
    mean: Sequence[float], std: Sequence[float], train: bool = True, image_size: int = IMAGE_SIZE, pad: int = 4
):
    """The reference code's torchvision pipeline: RandomCrop(padding) + flip for training, then ToTensor, Normalize."""
    from torchvision import transforms as T

    steps = [T.RandomCrop(image_size, padding=pad), T.RandomHorizontalFlip()] if train else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(list(mean), list(std))])


class ReferenceDataset(torch.utils.data.Dataset):
    """Map-style data set as the reference keeps CIFAR: uint8 HWC arrays, one PIL image built per sample.

    Returns (image, label, index), like the reference's instance-sample CIFAR-100 that CRD needs.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], torch.Tensor]):
        self.images = np.ascontiguousarray(images_uint8.permute(0, 2, 3, 1).numpy())
        self.labels = [int(y) for y in labels.tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i], i


def reference_loader(
    data: Dataset, batch_size: int, workers: int, *, train: bool = True, seed: int = 0
) -> torch.utils.data.DataLoader:
    """The reference's loader: shuffled (train) batches assembled by ``workers`` processes, not pinned."""
    ds = ReferenceDataset(
        data.train_images if train else data.test_images,
        data.train_labels if train else data.test_labels,
        reference_transform(data.mean, data.std, train, data.image_size),
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _reference_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[Batch]:
    while True:  # a new epoch (and, with workers, new worker processes) whenever one runs out, as in training
        for images, labels, index in loader:
            yield Batch(images.to(device), labels.to(device), index.to(device))


def _gpu_batches(loader: GPULoader) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


# ---------------------------------------------------------------------------------------------- runs


def _csv(value: str | Sequence[str], what: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise KdbenchError(f"{what}: nothing given")
    return out


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise KdbenchError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _cohort_sizes(value: str | Sequence[int] | None, n_methods: int) -> list[int]:
    if value is None:
        return [n_methods]
    items = value.split(",") if isinstance(value, str) else list(value)
    sizes: list[int] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            k = int(item)
        except (TypeError, ValueError):
            raise KdbenchError(f"--cohort-sizes {value!r}: expected integers such as 1,2,3") from None
        if not 1 <= k <= n_methods:
            raise KdbenchError(f"cohort size {k} is outside 1..{n_methods} (the number of methods given)")
        sizes.append(k)
    if not sizes:
        raise KdbenchError("--cohort-sizes: nothing given")
    return sorted(set(sizes))


def _specs(pair: str, methods: list[str], batch_size: int):
    """RunSpecs of the methods on the pair (the packaged 'paper' protocol at this batch size); names are checked."""
    from kdbench.config import PACKAGED_CONFIG, load_bench
    from kdbench.sweep import Request, expand

    if pair.count(":") != 1 or not all(pair.split(":")):
        raise KdbenchError(f"--pair {pair!r}: expected teacher:student, e.g. resnet32x4:resnet8x4")
    bench = load_bench(PACKAGED_CONFIG)
    req = Request(
        methods, [pair], seeds=[0], protocol="paper", sets=[f"protocol.batch_size={batch_size}"], dataset="synthetic"
    )
    return expand(bench, req)


def _teacher(arch: str, device: torch.device, seed: int) -> nn.Module:
    """A randomly initialised teacher: its weights do not change its speed, and none has to be trained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=NUM_CLASSES)
    return freeze(model, device)


def _split(n: int, parts: int) -> list[int]:
    """n as ``parts`` near-equal positive integers (parts <= n)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class _Run:
    """One configuration: built on its first round, timed over every round, released after the last.

    Each round opens a fresh data stream (the reference loop: a new DataLoader iterator, so its workers start again
    and nothing is prefetched while other configurations run), runs ``warmup`` untimed steps, then the round's timed
    steps in chunks, synchronising the device only at chunk ends (asynchronous execution is not serialised).
    """

    def __init__(self, config: str, methods: list[str], ctx: dict[str, Any], variant: str = "eager-fp32"):
        self.config, self.methods, self.ctx = config, methods, ctx
        self.variant = variant
        self.compiled = variant.startswith("compile")
        self.precision = variant.split("-")[1]
        self.members: list | None = None
        self.built = False
        self.chunk_steps: list[int] = []
        self.chunk_seconds: list[float] = []
        self.memory: dict[str, Any] = {}
        self.finite = True

    def build(self) -> None:
        import dataclasses

        from kdbench.train import build_member, prepare_model

        c = self.ctx
        self.uses_teacher = [c["specs"][n].teacher is not None for n in self.methods]
        self.teacher = c["teacher"]
        if self.compiled:  # a compiled copy of the teacher: the eager configurations keep the original
            import copy

            self.teacher = prepare_model(copy.deepcopy(c["teacher"]), compile=c["compile_backend"])
        self.members = [
            build_member(
                dataclasses.replace(c["specs"][n], precision=self.precision),
                c["data"],
                self.teacher if t else None,
                c["device"],
                compile=c["compile_backend"] if self.compiled else False,
            )
            for n, t in zip(self.methods, self.uses_teacher)
        ]
        for m in self.members:
            m.student.train()
            m.method.train()

    def open_stream(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close_stream(self, stream: Iterator[Batch]) -> None:
        pass

    def step(self, batch: Batch) -> None:
        raise NotImplementedError

    def round(self, warmup: int, chunks: list[int], memory: _Memory) -> None:
        dev = self.ctx["device"]
        first = not self.built
        if first:
            memory.start()
            self.build()
            self.built = True
        stream = self.open_stream()
        try:
            for _ in range(warmup):
                self.step(next(stream))
            _sync(dev)
            for size in chunks:
                t0 = time.perf_counter()
                for _ in range(size):
                    self.step(next(stream))
                _sync(dev)
                self.chunk_seconds.append(time.perf_counter() - t0)
                self.chunk_steps.append(size)
        finally:
            self.close_stream(stream)
        if first:
            self.memory = memory.read()

    def release(self) -> None:
        self.members = None
        self.teacher = None

    def row(self, batch_size: int) -> dict[str, Any]:
        steps, seconds = sum(self.chunk_steps), sum(self.chunk_seconds)
        rates = sorted(n * batch_size / sec for n, sec in zip(self.chunk_steps, self.chunk_seconds))
        mid = len(rates) // 2
        median = rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2
        extra = {"workers": self.ctx["workers"]} if self.config == "reference" else {}
        return _entry(
            self.config,
            self.methods,
            variant=self.variant,
            images_per_s=median,
            batch_size=batch_size,
            timed_steps=steps,
            seconds=seconds,
            images_per_s_mean=steps * batch_size / seconds,
            chunk_steps=self.chunk_steps,
            chunk_seconds=self.chunk_seconds,
            chunk_images_per_s={"min": rates[0], "median": median, "max": rates[-1]},
            loss_finite=self.finite,
            **extra,
            **self.memory,
        )


class _ReferenceRun(_Run):
    """One method at a time on a DataLoader stream; the loss is read back every step, as the reference's meters do."""

    def open_stream(self) -> Iterator[Batch]:
        return _reference_batches(self.ctx["reference_loader"], self.ctx["device"])

    def close_stream(self, stream: Iterator[Batch]) -> None:
        stream.close()  # ends the DataLoader iterator: its worker processes exit here

    def step(self, batch: Batch) -> None:
        from kdbench.train import main_terms, teacher_outputs

        (m,), (uses,) = self.members, self.uses_teacher
        t_out = teacher_outputs(self.ctx["teacher"], batch.images, m.preact) if uses else None
        s_out = m.student(batch.images, preact=m.preact)
        loss = sum(main_terms(m, s_out, t_out, batch, BENCH_PROGRESS).values())
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        self.finite &= math.isfinite(loss.item())  # a host synchronisation every step


class _KdbenchRun(_Run):
    """kdbench's stepping (``train_cohort``): the on-device loader, one teacher forward per batch for every member."""

    def build(self) -> None:
        super().build()
        c = self.ctx
        data = c["data"]
        loader = GPULoader(
            data.train_images,
            data.train_labels,
            batch_size=c["batch_size"],
            train=True,
            mean=data.mean,
            std=data.std,
            seed=c["seed"],
            drop_last=True,
            device=c["device"],
        )
        self.stream = _gpu_batches(loader)  # kept across rounds: nothing runs between steps
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in self.members]

    def open_stream(self) -> Iterator[Batch]:
        return self.stream

    def step(self, batch: Batch) -> None:
        from kdbench.train import autocast, main_terms, optimizer_step, teacher_outputs

        dev = self.ctx["device"]
        preact = any(m.preact for m in self.members)
        with autocast(dev, self.precision):
            t_out = teacher_outputs(self.teacher, batch.images, preact) if any(self.uses_teacher) else None
        for m, sums, uses in zip(self.members, self.sums, self.uses_teacher):
            with autocast(dev, self.precision):
                s_out = m.student(batch.images, preact=m.preact)
                terms = main_terms(m, s_out, t_out if uses else None, batch, BENCH_PROGRESS)
            optimizer_step(m.optimizer, terms, sums)

    def release(self) -> None:
        self.finite = all(math.isfinite(float(s["total"])) for s in self.sums)
        self.stream.close()
        self.stream, self.sums = None, []
        super().release()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _entry(
    config: str,
    methods: list[str],
    *,
    images_per_s: float | None = None,
    batch_size: int,
    method_run_rate: float | None = None,
    variant: str = "eager-fp32",
    **extra: Any,
) -> dict[str, Any]:
    """One row. ``images_per_s``: images drawn from the data stream per second (the median of the chunks' rates);
    ``method_run_images_per_s``: images x methods trained per second; ``epoch_seconds``: one CIFAR-100 epoch of
    every listed method. A row with no ``images_per_s`` is derived (one at a time) from ``method_run_rate``."""
    n = len(methods)
    measured = images_per_s is not None
    if measured:
        method_run_rate = n * images_per_s
    return {
        "config": config,
        "variant": variant,
        "methods": methods,
        "n_methods": n,
        "measured": measured,
        "ms_per_step": 1000 * batch_size / images_per_s if measured else None,
        "images_per_s": images_per_s,
        "method_run_images_per_s": method_run_rate,
        "epoch_seconds": CIFAR100_EPOCH * n / method_run_rate,
        **extra,
    }


def _one_at_a_time(
    config: str, rows: dict[str, dict[str, Any]], methods: list[str], batch_size: int, variant: str = "eager-fp32"
) -> dict[str, Any]:
    """The cost of training the methods one after another: their seconds per epoch add up."""
    epoch_s = sum(rows[m]["epoch_seconds"] for m in methods)
    rate = CIFAR100_EPOCH * len(methods) / epoch_s
    return _entry(
        config,
        methods,
        batch_size=batch_size,
        method_run_rate=rate,
        timed_steps=None,
        seconds=None,
        variant=variant,
        note="sum of the one-at-a-time rows above (derived, not timed together)",
    )


def run_bench(
    pair: str = DEFAULT_PAIR,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    *,
    batch_size: int = 64,
    steps: int = 50,
    warmup: int = 10,
    rounds: int = 1,
    train_size: int = CIFAR100_EPOCH,
    device: str | torch.device = "auto",
    workers: int | None = None,
    cohort_sizes: str | Sequence[int] | None = None,
    out: str | Path | None = DEFAULT_OUT,
    configs: Sequence[str] = CONFIGS,
    seed: int = 0,
    variants: str | Sequence[str] = ("eager-fp32",),
    compile_backend: bool | str = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the reference-style loop, kdbench solo and kdbench cohorts; return (and write, unless ``out`` is None)
    the JSON record. Bad input raises KdbenchError before anything is built.

    ``rounds`` > 1 splits each configuration's timed steps over that many rounds, every configuration running once
    per round (in reverse order on odd rounds), so that a change in the machine's load during the measurement is
    shared by all configurations instead of falling on whichever ran at the time. All configurations then stay
    built at once: read ``peak_increment_mb`` rather than ``peak_memory_mb``.
    """
    say = log or (lambda s: None)
    names = list(dict.fromkeys(_csv(methods, "--methods")))
    steps = _positive_int("--steps", steps)
    warmup = _positive_int("--warmup", warmup, 0)
    rounds = _positive_int("--rounds", rounds)
    if rounds > steps:
        raise KdbenchError(f"--rounds {rounds} is more than --steps {steps}: every round needs a timed step")
    batch_size = _positive_int("--batch-size", batch_size)
    train_size = _positive_int("--train-size", train_size)
    if train_size < batch_size:
        raise KdbenchError(f"--train-size {train_size} is smaller than one batch ({batch_size})")
    workers = default_workers() if workers is None else _positive_int("--workers", workers, 0)
    configs = list(dict.fromkeys(configs))
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise KdbenchError(f"unknown configuration(s) {unknown or configs}; valid: {', '.join(CONFIGS)}")
    sizes = _cohort_sizes(cohort_sizes, len(names))
    variants = list(dict.fromkeys(_csv(variants, "--variants")))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise KdbenchError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    if warmup == 0 and any(v.startswith("compile") for v in variants):
        raise KdbenchError("--warmup 0 with a compiled variant would time the compilation: use --warmup 1 or more")
    dev = _resolve_device(device)
    specs = _specs(pair, names, batch_size)  # unknown methods and models fail here
    by_name = {s.method: s for s in specs}

    from kdbench.files import atomic_write_json
    from kdbench.system import environment
    from kdbench.train import not_applicable_reason

    if out is not None:  # a folder that cannot take the JSON fails now, not after the whole benchmark
        try:
            ResultStore(out).ensure_writable()
        except KdbenchError:
            raise KdbenchError(f"--out {out}: not a writable folder") from None
    load_before = _load_average()
    say(f"building {train_size} synthetic CIFAR-shaped training images")
    data = bench_data(train_size, seed)
    teacher = _teacher(pair.split(":")[0], dev, seed)
    skipped: dict[str, str] = {}
    for name in names:
        reason = not_applicable_reason(by_name[name], data, teacher)
        if reason is not None:
            skipped[name] = reason
    names = [n for n in names if n not in skipped]
    if not names:
        raise KdbenchError(f"no method applies to {pair}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    sizes = sorted({min(k, len(names)) for k in sizes})  # cohorts of the methods that apply

    ctx: dict[str, Any] = {
        "specs": by_name,
        "data": data,
        "teacher": teacher,
        "device": dev,
        "seed": seed,
        "batch_size": batch_size,
        "workers": workers,
        "compile_backend": compile_backend,
    }
    runs: list[_Run] = []
    if "reference" in configs:
        ctx["reference_loader"] = reference_loader(data, batch_size, workers, seed=seed)
        runs += [_ReferenceRun("reference", [n], ctx) for n in names]
    for variant in variants:
        if "solo" in configs:
            runs += [_KdbenchRun("solo", [n], ctx, variant) for n in names]
        if "cohort" in configs:
            runs += [_KdbenchRun("cohort", names[:k], ctx, variant) for k in sizes]

    memory = _Memory(dev)
    per_round = _split(steps, rounds)
    for r, round_steps in enumerate(per_round):
        order = runs if r % 2 == 0 else runs[::-1]
        for run in order:
            say(
                f"round {r + 1}/{rounds}: {run.config} {run.variant} {','.join(run.methods)}"
                + (f" ({workers} DataLoader workers)" if run.config == "reference" else "")
            )
            run.round(warmup, _split(round_steps, min(round_steps, max(1, -(-TIMING_CHUNKS // rounds)))), memory)
            if rounds == 1:  # measured alone: free it before the next configuration is built
                run.release()
                _release(dev)
    for run in runs:
        if run.members is not None:
            run.release()
    _release(dev)

    results: list[dict[str, Any]] = []
    ref_rows: dict[str, dict[str, Any]] = {}
    solo_rows: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in variants}

    def add(config: str, variant: str, rows: dict[str, dict[str, Any]]) -> None:
        for run in (r for r in runs if r.config == config and r.variant == variant):
            rows[run.methods[0]] = run.row(batch_size)
            results.append(rows[run.methods[0]])
        if len(rows) > 1:
            results.append(_one_at_a_time(config, rows, names, batch_size, variant))

    add("reference", "eager-fp32", ref_rows)
    for variant in variants:  # each variant's solo rows, then its cohorts
        add("solo", variant, solo_rows[variant])
        results += [run.row(batch_size) for run in runs if run.config == "cohort" and run.variant == variant]
    for row in results:
        row["speedup_vs_reference"] = _speedup(row, ref_rows)
        if row["config"] == "cohort":
            row["speedup_vs_solo"] = _speedup(row, solo_rows[row["variant"]])

    env = environment(dev)
    env.update(
        {
            "device_name": device_name(dev),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(),
            "load_average_before": load_before,  # 1, 5, 15 minutes: other work on the machine skews CPU timings
            "load_average_after": _load_average(),
        }
    )
    record: dict[str, Any] = {
        "kind": "kdbench.bench",
        "schema": BENCH_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "settings": {
            "pair": pair,
            "methods": names,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "train_size": train_size,
            "device": str(dev),
            "workers": workers,
            "cohort_sizes": sizes,
            "configs": configs,
            "seed": seed,
            "dataset": data.source,
            "data_checksum": data.checksum,
            "num_classes": NUM_CLASSES,
            "image_size": IMAGE_SIZE,
            "variants": variants,
            "compile_backend": "inductor" if compile_backend is True else compile_backend,
            "protocol": "paper (SGD momentum 0.9, weight decay 5e-4)",
            "teacher": "randomly initialised, frozen",
        },
        "skipped": skipped,
        "notes": {
            "extrapolation": (
                f"seconds per CIFAR-100 epoch = {CIFAR100_EPOCH:,} x methods / (images x methods per "
                f"second), extrapolated from {steps} timed steps of batch {batch_size} "
                + (f"in {rounds} rounds, each " if rounds > 1 else "")
                + f"after {warmup} warm-up "
                "steps; no epoch was run"
            ),
            "reference": (
                "torch DataLoader over uint8 images -> PIL -> RandomCrop(32, padding=4), "
                f"RandomHorizontalFlip, ToTensor, Normalize in {workers} worker processes; one method at "
                "a time; loss read back every step; fp32 eager"
            ),
            "solo": "kdbench GPULoader (split on the device, batched crop/flip), one method at a time",
            "variants": (
                "kdbench's rows in each variant: eager or torch.compile'd forward of the student and the "
                "teacher (compiled during the warm-up steps, not timed), fp32 or bf16 autocast of the "
                "networks' forward and the loss (the losses' fp32 guards apply); the reference row is eager "
                "fp32"
            ),
            "cohort": (
                "kdbench GPULoader, the first k methods side by side, one teacher forward per batch; "
                "method_run_images_per_s = k x images / second"
            ),
            "speedup": "reference seconds per epoch of the same methods (one at a time) / this row's",
            "init_stage": "only main-stage steps are timed (AB, FT and FSP init stages are not)",
            "timing": (
                f"timed steps are split into chunks ({TIMING_CHUNKS} in all with one round, at least one per "
                "round), the device synchronised only at chunk ends; images_per_s (and every figure derived "
                "from it) is the median of the chunks' rates, robust to bursts of load from other processes; "
                "images_per_s_mean is timed steps x batch / total time"
            ),
            "memory": (
                "peak_memory_mb: the peak while the configuration was built and timed (its first round); "
                "peak_increment_mb: that peak minus what was held before it was built (with rounds > 1 the "
                "other configurations stay built, so read the increment)"
            ),
        },
        "results": results,
    }
    if out is not None:
        record["path"] = str(_write(record, Path(out), dev, atomic_write_json))
    return record


def _speedup(row: dict[str, Any], base: dict[str, dict[str, Any]]) -> float | None:
    if not base or any(m not in base for m in row["methods"]):
        return None
    return sum(base[m]["epoch_seconds"] for m in row["methods"]) / row["epoch_seconds"]


def _write(record: dict[str, Any], out: Path, dev: torch.device, write: Callable[[Path, Any], None]) -> Path:
    name = record["environment"]["device_name"] if dev.type == "cuda" else ""
    tag = re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{dev.type}-{name}".strip("-")).strip("-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"bench-{tag}-{stamp}.json"
    i = 1
    while path.exists():
        path = out / f"bench-{tag}-{stamp}-{i}.json"
        i += 1
    record["path"] = str(path)
    try:
        write(path, record)
    except OSError as exc:
        raise KdbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------------------------- table


def bench_table(record: dict[str, Any]):
    """The rich table of a bench record (what ``kdbench bench`` prints)."""
    from rich.table import Table

    s = record["settings"]
    env = record["environment"]
    table = Table(
        title=f"{s['pair']} on {env['device_name']} ({s['device']}, {env['torch_threads']} threads), "
        f"batch {s['batch_size']}"
    )
    for col, just in (
        ("configuration", "left"),
        ("methods", "left"),
        ("ms/step", "right"),
        ("img/s", "right"),
        ("chunk range", "right"),
        ("method-run img/s", "right"),
        ("s/CIFAR-100 epoch*", "right"),
        ("vs reference", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    labels = {"reference": f"reference ({s['workers']} workers)", "solo": "kdbench solo", "cohort": "kdbench cohort"}

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in record["results"]:
        label = labels[row["config"]]
        if not row["measured"]:
            label += ", sum"
        elif row["config"] == "cohort":
            label += f" of {row['n_methods']}"
        if row["config"] != "reference" and len(s.get("variants", [])) > 1:
            label += f" [{row.get('variant', 'eager-fp32')}]"
        speed = row.get("speedup_vs_reference")
        chunks = row.get("chunk_images_per_s")
        spread = f"{chunks['min']:,.0f}-{chunks['max']:,.0f}" if chunks else "-"
        table.add_row(
            label,
            ",".join(row["methods"]),
            num(row["ms_per_step"], ".1f"),
            num(row["images_per_s"], ",.0f"),
            spread,
            num(row["method_run_images_per_s"], ",.0f"),
            num(row["epoch_seconds"], ",.1f"),
            "-" if speed is None else f"{speed:.2f}x",
        )
    table.caption = (
        "img/s = the median of the rates of the separately timed chunks (range: their lowest and "
        "highest; a wide range means the machine's load changed); method-run img/s = methods x img/s "
        "(a cohort trains every method on each image); sum = the one-at-a-time rows above added up; "
        "vs reference = the reference's seconds per epoch for the same methods / this row's.\n* "
        + record["notes"]["extrapolation"]
    )
    return table
