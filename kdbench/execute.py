"""One call from planned runs to trained (or submitted) runs, whichever executor: what ``kdbench run`` does."""

from __future__ import annotations

import dataclasses
import os
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


def _rank_worker(
    root: str, device: str, specs: list[RunSpec], cohort: bool, download: bool, compile: bool | str, echo: bool, box
) -> None:
    """One rank of a distributed run (started by ``kdbench.distributed.launch``): joins the process group, trains
    the runs with every other rank, and rank 0 hands its report back through ``box``."""
    from kdbench import distributed
    from kdbench.sweep import worker_sweep

    dev = distributed.init_from_env(resolve_device(device))
    report = worker_sweep(root, dev, cohort, download, compile, echo).run(specs)
    if distributed.is_main() and box is not None:
        box.put(dataclasses.asdict(report))


def run_distributed(
    store: ResultStore,
    specs: list[RunSpec],
    nproc: int,
    device: str,
    *,
    cohort: bool = True,
    download: bool = False,
    compile: bool | str = False,
    echo: bool = False,
) -> SweepReport:
    """Train the runs with ``nproc`` processes per run on this machine (DDP, torchrun's environment): rank 0's
    report. On CUDA each rank takes one GPU (cuda:LOCAL_RANK); on the CPU the ranks share its cores."""
    import multiprocessing as mp

    from kdbench.distributed import launch

    dev = resolve_device(device)
    box = mp.get_context("spawn").SimpleQueue()
    launch(nproc, _rank_worker, str(store.root), dev.type, specs, cohort, download, compile, echo, box)
    return SweepReport(**box.get()) if not box.empty() else SweepReport()


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
    nproc: int = 1,
) -> Execution:
    """Train the unfinished runs of ``specs`` into ``store`` (local), or submit them as a job array (slurm).

    Every dataset the unfinished runs need is loaded first, and the results folder is checked to be writable,
    so bad input fails before anything is written. Finished runs are skipped and interrupted ones resume, so
    calling it again after any failure does exactly what is missing.

    ``nproc`` > 1: each run trains on that many processes (DDP; on SLURM, GPUs and tasks per node). Started by
    ``torchrun`` (WORLD_SIZE > 1 in the environment), this process is one rank of such a run.
    """
    if executor not in EXECUTORS:
        raise KdbenchError(f"unknown executor {executor!r}; executors: {', '.join(EXECUTORS)}")
    import torch

    from kdbench import distributed

    if nproc < 1:
        raise KdbenchError(f"--nproc-per-node must be at least 1, got {nproc}")
    # On SLURM the tasks choose their own device; here the data is only checked.
    dev = torch.device("cpu") if executor == "slurm" else resolve_device(device)
    if executor == "local" and nproc > 1 and dev.type == "cuda" and nproc > torch.cuda.device_count():
        raise KdbenchError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} GPUs are visible")
    processes = nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    from kdbench.method import refuse_coupled

    refuse_coupled([s.method for s in specs], processes)  # before any rank trains
    for batch_size in dict.fromkeys(s.protocol.batch_size for s in specs):
        distributed.check_batch(batch_size, processes)
    if executor == "local" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of a torchrun launch
        dev = distributed.init_from_env(dev)
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
    if nproc > 1:
        if distributed.active():
            raise KdbenchError("--nproc-per-node inside a torchrun launch: torchrun already started the processes")
        if workers not in (None, 1):
            raise KdbenchError("--nproc-per-node and --workers exclude each other (one run on several processes)")
        report = run_distributed(
            store, specs, nproc, str(dev), cohort=cohort, download=download, compile=compile, echo=echo is not None
        )
        return Execution(executor, report=report)
    if distributed.active():
        return Execution(executor, report=sweep.run(specs))
    devices = local_devices(str(dev), workers)
    if len(devices) == 1:
        return Execution(executor, report=sweep.run(specs))
    return Execution(
        executor,
        report=run_local(store, specs, devices, cohort=cohort, download=download, log=log, compile=compile, echo=echo),
    )
