"""Parts that several distillation methods are built from, in one place (a plugin may use them too).

- ``fp32``: the guard that runs a method's maths in fp32 under a bf16/fp16 autocast region.
- ``Embed``: the linear embedding + L2 normalisation of CRD, CRCD and RRD.
- ``init_memory`` / ``momentum_update``: the memory banks of CRD and CRCD (initialisation, momentum update).
- ``ClassNegativeSampler``: negatives drawn among the samples of other classes (CRD, CRCD).
- ``nce_loss``, ``set_normalisers``, ``reset_z_cache``: CRD's NCE objective and its normalising constants Z.
- ``method_rng``: the harness's generator of a method (never the global RNG).
- ``regressor_conv``: the conv that maps a student map onto a teacher map's channels and size, by the
  reference's rule (FitNet's regressor and AB's connector are built on it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.losses import widen
from kdbench.method import Method, MethodContext

EPS = 1e-7  # the NCE loss's guard in the denominators, as in the reference


@contextlib.contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Run the enclosed maths in fp32 even under a bf16/fp16 autocast region (exp(s/0.07) needs it)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class Embed(nn.Module):
    """A linear map to ``dim_out`` followed by L2 normalisation of each row."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(widen(x.flatten(1))), dim=1)


def init_memory(n: int, dim: int, normalise: bool) -> torch.Tensor:
    """An n x dim bank drawn uniformly in [-1/sqrt(dim/3), 1/sqrt(dim/3)] (rows of expected norm 1).

    ``normalise`` additionally scales every row to unit norm (CRCD's code does, CRD's does not).
    Uses the global RNG: the harness seeds it per run before building the method.
    """
    stdv = 1.0 / math.sqrt(dim / 3)
    bank = torch.rand(n, dim).mul_(2 * stdv).sub_(stdv)
    return F.normalize(bank, dim=1) if normalise else bank


@torch.no_grad()
def momentum_update(memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """memory[index] <- normalize(momentum * memory[index] + (1 - momentum) * v), in place.

    A sample index that occurs twice in one batch gets one of its two updates (as ``index_copy_`` in the
    reference); it cannot happen with a sampler that draws each epoch without replacement.
    """
    rows = memory.index_select(0, index).mul_(momentum).add_(v.detach().to(memory.dtype), alpha=1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's NCE objective (its Eq. 18) on normalised scores ``p`` [rows, 1 + K], positive in column 0.

    With m = K noise samples from a uniform noise distribution Pn = 1 / n_data:
    -(1/rows) * sum_rows [ log(p_pos / (p_pos + m Pn + eps)) + sum_neg log(m Pn / (p_neg + m Pn + eps)) ].
    """
    rows, cols = p.shape
    c = (cols - 1) / float(n_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + c + EPS))
    log_d0 = torch.log(c / (p[:, 1:] + c + EPS))
    return -(log_d1.sum() + log_d0.sum()) / rows


class ClassNegativeSampler(nn.Module):
    """Draws, for each anchor sample, ``k`` negatives among the training samples of OTHER classes.

    Vectorised: one uniform key per (anchor, training sample), a key above every other on the anchor's own
    class, and the k smallest keys per row; i.e. uniform sampling WITHOUT replacement from the other
    classes, as RepDistiller's ``CIFAR100InstanceSample(mode='exact')`` does whenever k is at most the
    number of negatives. ``k`` is capped at the smallest number of negatives any class has (N - largest
    class), so every row always has k distinct valid negatives. A training set of a single class (a
    synthetic smoke test) has no negative in that sense: the negatives are then any OTHER sample. The
    labels are a non-persistent buffer (rebuilt from the context, never checkpointed) so they follow the
    method to its device.
    """

    def __init__(self, train_labels: torch.Tensor, k: int):
        super().__init__()
        labels = torch.as_tensor(train_labels, dtype=torch.long).flatten().cpu()
        n = labels.numel()
        if n == 0:
            raise ValueError("contrastive sampling needs the training labels (ctx.train_labels is empty)")
        largest = int(torch.bincount(labels).max())
        self.class_aware = largest < n
        self.k = min(int(k), n - largest if self.class_aware else n - 1)
        if self.k < 1:
            raise ValueError("contrastive sampling needs at least two training samples")
        self.register_buffer("labels", labels, persistent=False)

    def forward(self, index: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """[B, 1 + k] training-set indices: ``index`` in column 0, then k negatives of other classes."""
        index = index.to(self.labels.device).long()
        keys = torch.rand((index.numel(), self.labels.numel()), generator=rng, device=rng.device)
        keys = keys.to(self.labels.device)
        if self.class_aware:
            own = self.labels.index_select(0, index)
            keys.masked_fill_(self.labels.unsqueeze(0) == own.unsqueeze(1), 2.0)
        else:
            keys.scatter_(1, index.unsqueeze(1), 2.0)
        neg = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        return torch.cat([index.unsqueeze(1), neg], dim=1)


def contrast_sampler(ctx: MethodContext, k: int) -> tuple[int, ClassNegativeSampler]:
    """(N, sampler of k negatives) for a contrastive method, after checking ctx's labels are the N training labels."""
    n = int(ctx.num_train)
    got = int(torch.as_tensor(ctx.train_labels).numel())
    if got != n:
        raise ValueError(f"ctx.train_labels has {got} labels, num_train={n}")
    return n, ClassNegativeSampler(ctx.train_labels, k)


@torch.no_grad()
def set_normalisers(z: torch.Tensor, exps: list[torch.Tensor], n_data: int) -> None:
    """Fix each unset (negative) entry of ``z`` to mean(exps[i]) * n_data, CRD's Monte-Carlo estimate of Z.

    Computed on the device without reading ``z`` back to the host (no synchronisation in the step)."""
    from kdbench.distributed import all_mean

    k = len(exps)
    # Under DDP each rank holds its share of the batch: the mean of the ranks' means is the global batch's mean.
    est = all_mean(torch.stack([e.mean() for e in exps])).to(z.dtype) * n_data
    z[:k] = torch.where(z[:k] < 0, est, z[:k])


def reset_z_cache(module: nn.Module, incompatible_keys: object) -> None:
    module._z_ready = False


def method_rng(method: Method, device: torch.device) -> torch.Generator:
    """The harness's generator; a fixed-seed private one if none was attached (never the global RNG)."""
    if method.rng is None:
        method.rng = torch.Generator(device=device).manual_seed(0)
    return method.rng


def regressor_conv(s_channels: int, s_size: int, t_channels: int, t_size: int, bias: bool) -> nn.Module:
    """The conv that maps a (s_channels, s_size, s_size) map onto (t_channels, t_size, t_size).

    RepDistiller's regressor rule (``models/util.py``): a 3x3 stride-2 conv when the student map is twice the
    teacher's, a 4x4 stride-2 transposed conv when it is half, else a valid conv of kernel 1 + s - t (1x1 when
    equal). The reference fails for a student map smaller than the teacher's by any other ratio; there a
    stride-1 transposed conv of kernel 1 + t - s grows the map by exactly t - s.
    """
    if s_size == 2 * t_size:
        return nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1, bias=bias)
    if 2 * s_size == t_size:
        return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1, bias=bias)
    if s_size >= t_size:
        return nn.Conv2d(s_channels, t_channels, kernel_size=1 + s_size - t_size, bias=bias)
    return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=1 + t_size - s_size, bias=bias)
