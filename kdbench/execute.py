"""One call from planned runs to trained (or submitted) runs, whichever executor: what ``kdbench run`` does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdbench.config import RunSpec, SlurmSettings
from kdbench.errors import KdbenchError
from kdbench.results import ResultStore
from kdbench.sweep import Sweep, SweepReport, run_local
from kdbench.system import resolve_device

EXECUTORS = ("local", "slurm")


@dataclass
class Execution:
    """What ``execute`` did: the local sweep's report, or the SLURM jobs it submitted."""

    executor: str
    report: SweepReport | None = None
    jobs: list[Any] = field(default_factory=list)


def local_devices(device: str, workers: int | None = None) -> list[str]:
    """One device per local worker: every visible GPU for ``cuda`` (or ``workers`` of them), else ``workers``
    (default 1) workers on the one device named."""
    import torch

    dev = resolve_device(device)
    every_gpu = dev.type == "cuda" and dev.index is None
    if workers is None:
        workers = torch.cuda.device_count() if every_gpu else 1
    if workers < 1:
        raise KdbenchError(f"workers must be at least 1, got {workers}")
    return [f"cuda:{i}" for i in range(workers)] if every_gpu else [str(dev)] * workers


def execute(
    store: ResultStore,
    specs: list[RunSpec],
    *,
    executor: str = "local",
    device: str = "auto",
    workers: int | None = None,
    cohort: bool = True,
    download: bool = False,
    slurm: SlurmSettings | None = None,
    progress: Any = None,
    log: Callable[[str], None] = lambda s: None,
    compile: bool | str = False,
    echo: Callable[[str], None] | None = None,
) -> Execution:
    """Train the unfinished runs of ``specs`` into ``store`` (local), or submit them as a job array (slurm).

    Every dataset the unfinished runs need is loaded first, and the results folder is checked to be writable,
    so bad input fails before anything is written. Finished runs are skipped and interrupted ones resume, so
    calling it again after any failure does exactly what is missing.
    """
    if executor not in EXECUTORS:
        raise KdbenchError(f"unknown executor {executor!r}; executors: {', '.join(EXECUTORS)}")
    import torch

    # On SLURM the tasks choose their own device; here the data is only checked.
    dev = torch.device("cpu") if executor == "slurm" else resolve_device(device)
    sweep = Sweep(store, dev, cohort=cohort, download=download, progress=progress, log=log, compile=compile, echo=echo)
    sweep.preload(specs)  # a missing or broken dataset fails here, before anything is written
    store.ensure_writable()
    if executor == "slurm":
        from kdbench.slurm import submit

        return Execution(executor, jobs=submit(store, specs, slurm or SlurmSettings(), cohort=cohort, compile=compile))
    if compile in (True, "inductor") and dev.type == "cpu":
        (echo or log)(
            "warning: --compile on a CPU: inductor's C++ kernels gave gradients of deep models (resnet56, resnet110, "
            "resnet50, wrn_40_2, shufflenetv1) 0.3-3% away from eager's (resnet56: 4.4% from the exact ones, eager "
            "2e-5; torch 2.14.1, gcc 12; see the README), so results trained this way are not comparable"
        )
    devices = local_devices(str(dev), workers)
    if len(devices) == 1:
        return Execution(executor, report=sweep.run(specs))
    return Execution(
        executor,
        report=run_local(store, specs, devices, cohort=cohort, download=download, log=log, compile=compile, echo=echo),
    )
