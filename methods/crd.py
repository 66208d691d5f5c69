"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), with and without KD.

Also home of the pieces the other memory-bank methods share (``Embed``, ``ClassNegativeSampler``,
``nce_loss``, ``init_memory``, ``momentum_update``, ``fp32``): CRCD imports them from here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import Batch, Method, MethodConfig, MethodContext
from kdbench.models.base import ModelOutput

EPS = 1e-7  # the NCE loss's guard in the denominators, as in the reference


# ---------------------------------------------------------------------------------------------- shared parts


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
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


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


@torch.no_grad()
def set_normalisers(z: torch.Tensor, exps: list[torch.Tensor], n_data: int) -> None:
    """Fix each unset (negative) entry of ``z`` to mean(exps[i]) * n_data, CRD's Monte-Carlo estimate of Z."""
    for i, e in enumerate(exps):
        if float(z[i]) < 0:
            z[i] = e.mean() * n_data


def reset_z_cache(module: nn.Module, incompatible_keys: object) -> None:
    module._z_ready = False


def method_rng(method: Method, device: torch.device) -> torch.Generator:
    """The harness's generator; a fixed-seed private one if none was attached (never the global RNG)."""
    if method.rng is None:
        method.rng = torch.Generator(device=device).manual_seed(0)
    return method.rng


# ---------------------------------------------------------------------------------------------- CRD


@dataclass
class CRDConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    weight: float = 0.8
    feat_dim: int = 128  # embedding size (reference --feat_dim)
    nce_k: int = 16384  # negatives per anchor (reference --nce_k), capped at what exists
    nce_t: float = 0.07  # temperature of exp(sim / T) (reference --nce_t)
    nce_m: float = 0.5  # momentum of the memory banks (reference --nce_m)

    RANGES = {**MethodConfig.RANGES, "feat_dim": ">=1", "nce_k": ">=1", "nce_t": ">0", "nce_m": "[0,1)"}


@dataclass
class CRDKDConfig(CRDConfig):
    kd_weight: float = 1.0


class CRD(Method):
    """CRD: a contrastive (NCE) objective between student and teacher embeddings of the pooled features.

    Taps: ``pooled`` of both networks, ``index`` (sample indices, for the memory banks).
    Reference defaults (RepDistiller): gamma 1, alpha 0, beta 0.8 (``crd+kd``: alpha 1); feat_dim 128,
    nce_k 16384, nce_t 0.07, nce_m 0.5.

    - Embeddings: a linear map pooled -> feat_dim then L2 normalisation, on BOTH sides; the teacher's
      embedding is trainable (the teacher itself stays frozen).
    - Memories: ``memory_s`` / ``memory_t`` (N x feat_dim buffers), initialised uniformly in
      [-1/sqrt(d/3), 1/sqrt(d/3)] without row normalisation, as in the reference. After the loss is computed,
      the rows of the batch become normalize(m * row + (1 - m) * embedding) (no gradient).
    - Contrast set: for each sample, the positive is its own index (the reference's ``mode='exact'``), and
      ``nce_k`` negatives are drawn uniformly without replacement among samples of OTHER classes (per-class
      lists built from ``ctx.train_labels``), with ``self.rng`` (never the global RNG); nce_k is capped at N
      minus the largest class size (a single-class training set, e.g. a synthetic smoke test, falls back to
      any other sample).
    - Scores: P = exp(<v, memory row> / T) / Z. Each direction has its own constant Z, set ONCE on the first
      batch to mean(exp(s/T)) * N and kept in the buffer ``nce_z`` (-1 = not yet set), so a
      checkpoint restores it.
    - Loss: the reference's NCE loss (``nce_loss``, noise Pn = 1/N, K noise samples) for the student
      embedding against the teacher memory plus the teacher embedding against the student memory, times beta.

    Choices where the reference is silent or where we differ on purpose:
    - Scores are computed as one [B, N] product with the whole bank and then gathered at the sampled
      indices instead of gathering a [B, 1 + K, d] copy of the bank (same numbers; B x N floats instead of
      B x (1 + K) x d, about 40x less on CIFAR-100).
    - The banks are only updated in training mode (``self.training``): a loss evaluated in eval mode leaves
      them untouched (Z is set by the first call, whatever the mode, as in the reference).
    - The maths run in fp32 with autocast disabled (exp(1/0.07) ~ 1.6e6 is unsafe in bf16).
    """

    name = "crd"
    paper = "Tian, Krishnan & Isola. Contrastive Representation Distillation. ICLR 2020"
    url = "https://arxiv.org/abs/1910.10699"
    Config = CRDConfig
    needs = frozenset({"pooled", "index"})

    def __init__(self, cfg: CRDConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if ctx.teacher is None:
            raise ValueError("CRD needs a teacher")
        n = int(ctx.num_train)
        if int(torch.as_tensor(ctx.train_labels).numel()) != n:
            raise ValueError(f"ctx.train_labels has {torch.as_tensor(ctx.train_labels).numel()} labels, num_train={n}")
        self.n_data = n
        self.embed_s = Embed(ctx.student.pooled_dim, cfg.feat_dim)
        self.embed_t = Embed(ctx.teacher.pooled_dim, cfg.feat_dim)
        self.sampler = ClassNegativeSampler(ctx.train_labels, cfg.nce_k)
        self.register_buffer("memory_s", init_memory(n, cfg.feat_dim, normalise=False))
        self.register_buffer("memory_t", init_memory(n, cfg.feat_dim, normalise=False))
        # Z of (student anchor vs teacher memory, teacher anchor vs student memory); -1: set on first batch.
        self.register_buffer("nce_z", torch.full((2,), -1.0))
        # A host-side cache of "Z is set", so that steady-state steps do not synchronise with the device to
        # read nce_z; load_state_dict resets it (the loaded Z may be set or not).
        self._z_ready = False
        self.register_load_state_dict_post_hook(reset_z_cache)

    def sample_contrast(self, index: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K] indices into the memories: the sample itself, then K negatives of other classes."""
        return self.sampler(index, method_rng(self, self.memory_s.device))

    def _exp_scores(self, v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """exp(<v_b, memory[idx_bk]> / T), [B, 1 + K], from one [B, N] product gathered at ``idx``.

        The bank is cloned: the product saves it for the backward pass and the momentum update that follows
        writes it in place.
        """
        sim = (v @ memory.detach().clone().t()).gather(1, idx)
        return torch.exp(sim / self.cfg.nce_t)

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        device = student.pooled.device
        with fp32(device):
            v_s = self.embed_s(student.pooled.float())
            v_t = self.embed_t(teacher.pooled.float().detach())
            index = batch.index.to(device).long()
            idx = self.sample_contrast(index)
            e_s = self._exp_scores(v_s, self.memory_t, idx)  # student anchor, teacher memory
            e_t = self._exp_scores(v_t, self.memory_s, idx)  # teacher anchor, student memory
            if not self._z_ready:
                set_normalisers(self.nce_z, [e_s, e_t], self.n_data)
                self._z_ready = True
            loss = nce_loss(e_s / self.nce_z[0], self.n_data) + nce_loss(e_t / self.nce_z[1], self.n_data)
            if self.training:
                momentum_update(self.memory_s, index, v_s, self.cfg.nce_m)
                momentum_update(self.memory_t, index, v_t, self.cfg.nce_m)
        return {"crd": self.cfg.weight * loss}


class CRDKD(CRD):
    """CRD + KD: CRD (beta 0.8) with Hinton's KD term added by the harness (alpha 1, T 4), as in the CRD paper."""

    name = "crd+kd"
    Config = CRDKDConfig
