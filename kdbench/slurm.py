"""`--executor slurm`: one job-array task per cohort, submitted through submitit (``pip install 'kdbench[slurm]'``).

A task that is preempted or reaches its time limit is requeued by submitit (``Checkpointable``) and resumes from
the per-run checkpoints in the results folder; runs already finished are skipped, so a requeue, or a rerun of the
same command after any failure, trains exactly what is missing.
"""

from __future__ import annotations

from typing import Any

from kdbench.config import RunSpec, SlurmSettings, group_cohorts  # noqa: F401 (SlurmSettings: re-exported)
from kdbench.errors import KdbenchError
from kdbench.results import ResultStore


def _submitit():
    try:
        import submitit
    except ImportError:
        raise KdbenchError("--executor slurm needs submitit: pip install 'kdbench[slurm]'") from None
    return submitit


class CohortTask:
    """One array task: trains its runs (a cohort) into the results folder; requeued on preemption / timeout
    (submitit calls ``checkpoint`` on any callable that has one)."""

    def __init__(
        self,
        root: str,
        specs: list[RunSpec],
        cohort: bool = True,
        compile: bool | str = False,
        distributed: bool = False,
    ):
        self.root = root
        self.specs = specs
        self.cohort = cohort
        self.compile = compile
        self.distributed = distributed  # one process per GPU over the task's nodes, one DDP run

    def __call__(self) -> dict[str, list[str]]:
        import torch

        from kdbench import distributed
        from kdbench.sweep import Sweep

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.distributed:  # SLURM's task variables -> torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)
            _submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            device = distributed.init_from_env(device)
        try:
            report = Sweep(ResultStore(self.root), device, cohort=self.cohort, compile=self.compile).run(self.specs)
        finally:
            distributed.shutdown()
        return {
            "trained": report.trained,
            "skipped": report.skipped,
            "failed": report.failed,
            "not_applicable": report.not_applicable,
            "busy": report.busy,
        }

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption or timeout: resubmit the same task; it resumes from the run checkpoints."""
        return _submitit().helpers.DelayedSubmission(
            CohortTask(self.root, self.specs, self.cohort, self.compile, self.distributed)
        )


def make_executor(store: ResultStore, settings: SlurmSettings):
    submitit = _submitit()
    ex = submitit.AutoExecutor(folder=str(store.slurm_dir), cluster=settings.cluster)
    params: dict[str, Any] = {
        "name": "kdbench",
        "timeout_min": settings.time_min,
        "cpus_per_task": settings.cpus_per_task,
    }
    if settings.cluster == "slurm":
        params.update(
            slurm_array_parallelism=settings.array_parallelism,
            gpus_per_node=settings.gpus_per_task,
            slurm_signal_delay_s=120,
        )
        if settings.partition:
            params["slurm_partition"] = settings.partition
        if settings.mem_gb:
            params["mem_gb"] = settings.mem_gb
        if settings.distributed:
            params.update(nodes=settings.nodes, tasks_per_node=settings.tasks_per_node)
    ex.update_parameters(**params)
    return ex


def cohorts(store: ResultStore, specs: list[RunSpec], cohort: bool = True) -> list[list[RunSpec]]:
    """The pending runs grouped as the array's tasks (one cohort each, or one run each with cohort=False)."""
    return group_cohorts([s for s in specs if store.finished(s.label) is None], cohort)


def submit(
    store: ResultStore, specs: list[RunSpec], settings: SlurmSettings, cohort: bool = True, compile: bool | str = False
) -> list[Any]:
    """Submit one array task per pending cohort; returns submitit jobs (empty when everything is done)."""
    tasks = cohorts(store, specs, cohort)
    if not tasks:
        return []
    ex = make_executor(store, settings)
    with ex.batch():
        jobs = [ex.submit(CohortTask(str(store.root), group, cohort, compile, settings.distributed)) for group in tasks]
    return jobs


def sbatch_script(store: ResultStore, settings: SlurmSettings, n_tasks: int) -> str:
    """The batch script submitit would generate for an array of n_tasks (shown by --dry-run; tested without SLURM)."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command=f"python -u -m submitit.core._submit '{store.slurm_dir}'",
        folder=str(store.slurm_dir),
        job_name="kdbench",
        partition=settings.partition,
        time=settings.time_min,
        cpus_per_task=settings.cpus_per_task,
        gpus_per_node=settings.gpus_per_task,
        nodes=settings.nodes,
        ntasks_per_node=settings.tasks_per_node,
        mem=f"{settings.mem_gb}GB" if settings.mem_gb else None,
        array_parallelism=settings.array_parallelism,
        map_count=n_tasks,
        signal_delay_s=120,
    )
