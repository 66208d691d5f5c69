"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), with and without KD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench import distributed
from kdbench.losses import widen
from kdbench.method import Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.method_parts import (
    Embed,
    contrast_sampler,
    fp32,
    init_memory,
    method_rng,
    momentum_update,
    nce_loss,
    reset_z_cache,
    set_normalisers,
)
from kdbench.models.base import ModelOutput


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
    """L = gamma CE + alpha KD + beta (L_nce(exp(v_s . M_t / T) / Z_s) + L_nce(exp(v_t . M_s / T) / Z_t)).

    v = normalize(W pooled + b) per network (``Embed``), M the memory banks, L_nce CRD's NCE loss (``nce_loss``)
    over each sample's positive (its own row) and ``nce_k`` negatives of other classes.
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

    Departures (where the reference is silent or where we differ on purpose):
    - Scores are computed as one [B, N] product with the whole bank and then gathered at the sampled
      indices instead of gathering a [B, 1 + K, d] copy of the bank (same numbers; B x N floats instead of
      B x (1 + K) x d, about 40x less on CIFAR-100).
    - The banks are only updated in training mode (``self.training``): a loss evaluated in eval mode leaves
      them untouched (Z is set by the first call, whatever the mode, as in the reference).
    - The maths run in fp32 with autocast disabled (exp(1/0.07) ~ 1.6e6 is unsafe in bf16).
    - Several processes (DDP): every rank draws the negatives of the whole global batch (the same draws as one
      device) and keeps its rows; Z is set from the global batch's mean; the banks are updated with the
      embeddings and indices of the whole global batch, gathered from every rank (``kdbench.distributed``), so
      the banks stay equal on every rank and equal to one device's.
    """

    name = "crd"
    paper = "Tian, Krishnan & Isola. Contrastive Representation Distillation. ICLR 2020"
    Config = CRDConfig
    needs = frozenset({"pooled", "index"})

    def __init__(self, cfg: CRDConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        n, self.sampler = contrast_sampler(ctx, cfg.nce_k)
        self.n_data = n
        self.embed_s = Embed(ctx.student.pooled_dim, cfg.feat_dim)
        self.embed_t = Embed(ctx.teacher.pooled_dim, cfg.feat_dim)
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

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        device = student.pooled.device
        with fp32(device):
            v_s = self.embed_s(widen(student.pooled))
            v_t = self.embed_t(widen(teacher.pooled).detach())
            index = distributed.gather_rows(batch.index.to(device).long())  # the global batch's indices
            idx = distributed.local_rows(self.sample_contrast(index))
            e_s = self._exp_scores(v_s, self.memory_t, idx)  # student anchor, teacher memory
            e_t = self._exp_scores(v_t, self.memory_s, idx)  # teacher anchor, student memory
            if not self._z_ready:
                set_normalisers(self.nce_z, [e_s, e_t], self.n_data)
                self._z_ready = True
            loss = nce_loss(e_s / self.nce_z[0], self.n_data) + nce_loss(e_t / self.nce_z[1], self.n_data)
            if self.training:
                momentum_update(self.memory_s, index, distributed.gather_rows(v_s.detach()), self.cfg.nce_m)
                momentum_update(self.memory_t, index, distributed.gather_rows(v_t.detach()), self.cfg.nce_m)
        return {"crd": self.cfg.weight * loss}


class CRDKD(CRD):
    """CRD + KD: CRD (beta 0.8) with Hinton's KD term added by the harness (alpha 1, T 4), as in the CRD paper."""

    name = "crd+kd"
    Config = CRDKDConfig
