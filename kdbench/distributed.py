"""One run on several processes with PyTorch's DistributedDataParallel (torchrun's environment variables).

Every rank runs the same code; this module holds the few things that differ:

- ``init_from_env`` joins the process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT): gloo on the CPU, nccl on CUDA. ``kdbench run --nproc-per-node N`` sets them itself (``launch``),
  ``torchrun`` sets them, and a SLURM task gets them from submitit's ``helpers.TorchDistributedEnvironment``.
- The batch convention: the protocol's ``batch_size`` is the GLOBAL batch (summed over ranks; the lr is the one of
  that global batch, as on one device). Rank r holds rows r, r + W, r + 2W... of each global batch (W the world
  size), as torch's ``DistributedSampler`` shards an epoch; ``gather_rows`` puts the ranks' rows back in that
  order, so a method that needs the whole batch (a memory-bank update, CRD's negatives) sees exactly what it sees
  on one device, and ``local_rows`` takes a rank's rows out of a global tensor.
- Under DDP the BatchNorms of the student and of the method's own modules (FitNet's regressor, ReviewKD's ABF,
  SimKD's projector...) are synchronised (``sync_batchnorm``): batch statistics over the global batch, so two ranks
  train the same numbers as one device with the same global batch (tests/test_distributed.py).
- The batch must split evenly over the ranks (``check_batch``). An epoch's last, partial batch (``drop_last``
  false) gives the ranks unequal shares (16 rows over 3 ranks: 6, 5, 5); DDP averages the ranks' gradients with
  equal weights, so each rank's loss terms are scaled by ``share_weight`` (W x its rows / the global batch's rows)
  and every step's gradient is the one-device gradient of the mean over the global batch.
- A method whose loss couples the samples of a batch (``Method.couples_batch``: SP's similarity matrix, RKD's
  distances, ...) computes on each rank a different loss than one device computes on the global batch; such
  methods are refused on more than one process (``kdbench.method.refuse_coupled``), before anything trains.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdbench.errors import KdbenchError


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes results, checkpoints and logs."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's value on every rank (any picklable value): decisions read from the results folder (finished? lock
    taken? checkpoint?) are made once, so the ranks can never take different paths."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a copy; no autograd)."""
    if not active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def share_weight(local: int, global_rows: int | None) -> float | None:
    """The factor for one rank's per-row-mean loss terms that makes DDP's equal-weight mean over the ranks the mean
    over the global batch: W * local / global (1 for equal shares; None when nothing needs scaling)."""
    if not active() or global_rows is None or world_size() * local == global_rows:
        return None
    return world_size() * local / global_rows


def check_batch(batch_size: int, processes: int, num_samples: int | None = None, drop_last: bool = False) -> None:
    """Refuse a global batch that does not split evenly over ``processes``, or an epoch whose last, partial batch
    has fewer rows than processes (a rank would hold none)."""
    if processes <= 1:
        return
    if batch_size % processes:
        raise KdbenchError(
            f"batch size {batch_size} does not split evenly over {processes} processes: choose a batch size that "
            f"is a multiple of {processes} (the protocol's batch_size in bench.toml) or another process count"
        )
    last = num_samples % batch_size if num_samples is not None and not drop_last else 0
    if 0 < last < processes:
        raise KdbenchError(
            f"the last batch of each epoch has {last} rows ({num_samples} samples, batch {batch_size}), fewer than "
            f"the {processes} processes: use drop_last = true in the protocol or another batch size"
        )


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global-batch tensor (rows rank, rank + W, ...)."""
    return t[rank() :: world_size()] if active() else t


@torch.no_grad()
def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's rows, in one device's order (no autograd; ranks may hold one row more
    or less than each other at an epoch's last, partial batch)."""
    if not active():
        return t
    w = dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(w)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = t.contiguous()
    if t.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    out = t.new_empty((sum(counts), *t.shape[1:]))
    for r, (part, n) in enumerate(zip(parts, counts)):
        out[r::w] = part[:n]
    return out


@torch.no_grad()
def gather_split(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of an evaluation split that each rank computed for its own samples, gathered and put in the order of
    ``index`` (the sample indices), so every rank gets the whole split as one device computes it."""
    if not active():
        return t
    w = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(w)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    longest = int(max(sizes))

    def pad(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        return torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x

    parts_t = [torch.empty_like(pad(t)) for _ in range(w)]
    parts_i = [torch.empty_like(pad(index)) for _ in range(w)]
    dist.all_gather(parts_t, pad(t))
    dist.all_gather(parts_i, pad(index.to(t.device)))
    rows = torch.cat([p[: int(n)] for p, n in zip(parts_t, sizes)])
    idx = torch.cat([p[: int(n)] for p, n in zip(parts_i, sizes)])
    return rows[idx.argsort()]


# ---------------------------------------------------------------------------------------------- synchronised BN


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients (each rank's output feeds that
    rank's loss; the global loss is their sum up to DDP's 1/W)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, for the gloo backend (torch's
    ``nn.SyncBatchNorm`` runs on GPUs only). Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``.

    Mean and variance are two all-reduces of per-channel sums (two passes, as accurate as one device's batch
    norm) that carry the gradient back to every rank's rows (``_AllReduceSum``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[-1]
        mean = total[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.square().sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """In place: every BatchNorm2d of ``model`` synchronised over the ranks (torch's SyncBatchNorm on CUDA, the
    gloo version above on the CPU). Returns the model (a new object only when the model itself is a BN)."""
    if not active():
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlooSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else device)
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


# ---------------------------------------------------------------------------------------------- process group


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group described by torchrun's variables; returns this rank's device (cuda:LOCAL_RANK on
    GPUs). Nothing happens without WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(local_rank: int, nproc: int, port: int, fn: Callable[..., Any], args: tuple, threads: int) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if threads:
        torch.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        shutdown()


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes with torchrun's environment (one node), the way ``torchrun
    --nproc-per-node N`` would; returns when all have finished, raises KdbenchError if any failed. Each rank
    keeps this process's intra-op thread count (numbers on the CPU depend on it)."""
    import torch.multiprocessing as mp

    if nproc < 1:
        raise KdbenchError(f"--nproc-per-node must be at least 1, got {nproc}")
    try:
        mp.start_processes(
            _rank_main,
            args=(nproc, free_port(), fn, args, torch.get_num_threads()),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise KdbenchError(f"a rank failed: {last}") from None
    except mp.ProcessExitedException as exc:
        raise KdbenchError(f"a rank exited: {exc}") from None


__all__ = [
    "GlooSyncBatchNorm",
    "active",
    "agree",
    "all_mean",
    "barrier",
    "check_batch",
    "gather_rows",
    "gather_split",
    "init_from_env",
    "is_main",
    "launch",
    "local_rows",
    "rank",
    "share_weight",
    "shutdown",
    "sync_batchnorm",
    "world_size",
]
