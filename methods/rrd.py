"""Relational Representation Distillation (Giakoumoglou & Stathaki, 2024): the paper setting, +KD, and the
February-2025 reference setting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.method import Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.method_parts import Embed, fp32
from kdbench.models.base import ModelOutput

QUEUE_UPDATES = ("before", "after")


@dataclass
class RRDConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    weight: float = 1.0
    feat_dim: int = 128  # embedding size (reference --feat_dim)
    queue_size: int = 16384  # FIFO queue of teacher embeddings (reference --nce_k)
    tau_s: float = 0.04  # student temperature (reference --nce_t_s, June-Nov 2024)
    tau_t: float = 0.10  # teacher temperature (reference --nce_t_t, June-Nov 2024)
    queue_update: str = "after"  # enqueue the batch's teacher embeddings "before" or "after" the loss
    train_teacher_embed: bool = False  # see the class docstring

    RANGES = {
        **MethodConfig.RANGES,
        "feat_dim": ">=1",
        "queue_size": ">=1",
        "tau_s": ">0",
        "tau_t": ">0",
        "queue_update": ("before", "after"),
    }

    def check(self, where: str = "methods") -> None:
        super().check(where)
        if self.train_teacher_embed and self.queue_update != "before":
            raise KdbenchError(f'{where}.train_teacher_embed needs queue_update = "before"')


@dataclass
class RRDKDConfig(RRDConfig):
    kd_weight: float = 1.0


@dataclass
class RRD2025Config(RRDConfig):
    tau_s: float = 0.1
    tau_t: float = 0.02
    queue_update: str = "before"


def _forget_filled(module: torch.nn.Module, incompatible_keys: object) -> None:
    module._filled = None


class RRD(Method):
    """L = gamma CE + alpha KD + beta * mean_b [-sum_j softmax(z_t Q^T / tau_t)_j log softmax(z_s Q^T / tau_s)_j].

    Taps: ``pooled`` of both networks. z_s = normalize(W_s pooled_s + b_s), z_t = normalize(W_t pooled_t + b_t)
    (feat_dim 128); Q = the FIFO queue of past teacher embeddings (``queue``, queue_size x feat_dim, with the
    buffers ``queue_ptr`` = next row to write and ``queue_filled`` = rows written so far, capped at the size).
    Loss = beta * mean_b [ -sum_j p_t[b, j] log p_s[b, j] ] with p_t = softmax(z_t Q^T / tau_t) (detached: a
    target) and p_s = softmax(z_s Q^T / tau_s).

    Variants (reference code giakoumoglou/distillers):
    - ``rrd`` (default, the paper's setting: code of June-November 2024, arXiv v1-v4 results; the abstract's
      "sharper student"): tau_s 0.04, tau_t 0.10, the batch is enqueued AFTER the loss. gamma 1, alpha 0,
      beta 1. ``rrd+kd``: the same with alpha 1 (KD, T 4).
    - ``rrd-2025`` (code from February 2025 on): tau_s 0.1, tau_t 0.02 (teacher sharper), the batch is
      enqueued BEFORE the loss (so every sample sees its own teacher key).

    Departures. Teacher projection (``train_teacher_embed``, default False in every variant). In the February-2025 code
    the teacher projection gets no gradient and stays at its random initialisation; reading the 2024 code,
    the same holds there too (its teacher logits are detached before the softmax and the queue is read
    detached), so with the paper's objective no gradient can reach W_t. Default: W_t is a fixed random
    projection (``requires_grad`` False: not optimised, not weight-decayed), as both reference versions
    effectively train. ``train_teacher_embed = True`` (only with ``queue_update = "before"``) is our
    extension: the queue rows just written with the current batch stay in the graph of the STUDENT term,
    so W_t learns from d loss / d key; the target p_t stays detached (a gradient through the target would
    just sharpen it).

    Queue start: instead of the reference's random initial queue (randn normalised along the feature
    dimension, i.e. each row of norm ~sqrt(feat_dim / queue_size)), the unfilled rows are masked out: the
    softmaxes run over the ``queue_filled`` real teacher keys only. The very first "after" step therefore
    has no key and returns a zero loss (still connected to the graph). The queue takes any batch size:
    writes wrap around the end, a batch larger than the queue keeps its newest rows, and the last partial
    batch is used (the reference asserted queue_size % batch_size == 0 and dropped it). The queue is only
    written in training mode. The maths run in fp32 with autocast disabled.

    Several processes (DDP): the teacher keys of the whole global batch are gathered from every rank, in one
    device's order, and enqueued on every rank (as MoCo-style queues do on several GPUs), so the queues stay
    equal and equal to one device's; each rank's loss is the mean over its own rows. ``train_teacher_embed``
    is refused there (its live queue rows would be another rank's keys).
    """

    name = "rrd"
    paper = "Giakoumoglou & Stathaki. Relational Representation Distillation. arXiv:2407.12073, 2024"
    Config = RRDConfig
    needs = frozenset({"pooled"})

    def __init__(self, cfg: RRDConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.queue_update not in QUEUE_UPDATES:
            raise ValueError(f"queue_update must be one of {QUEUE_UPDATES}, got {cfg.queue_update!r}")
        if cfg.train_teacher_embed and cfg.queue_update != "before":
            raise ValueError("train_teacher_embed needs queue_update='before' (the only way a key is in the graph)")
        if cfg.queue_size < 1:
            raise ValueError("queue_size must be positive")
        self.embed_s = Embed(ctx.student.pooled_dim, cfg.feat_dim)
        self.embed_t = Embed(ctx.teacher.pooled_dim, cfg.feat_dim)
        self.embed_t.requires_grad_(bool(cfg.train_teacher_embed))
        self.register_buffer("queue", torch.zeros(cfg.queue_size, cfg.feat_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # Host-side mirror of queue_filled so that a step does not synchronise with the device to read it;
        # None = unknown (after load_state_dict), read once from the buffer.
        self._filled: int | None = 0
        self.register_load_state_dict_post_hook(_forget_filled)

    def filled(self) -> int:
        """How many rows of the queue hold real teacher keys."""
        if self._filled is None:
            self._filled = int(self.queue_filled)
        return self._filled

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> torch.Tensor:
        """Write ``keys`` [B, d] at the pointer (FIFO, wrapping around); returns the rows written, in order.

        Exactly as if the rows were written one by one: a batch larger than the queue leaves its newest
        ``queue_size`` rows, and the pointer advances by B.
        """
        size = self.queue.shape[0]
        before = self.filled()
        total = keys.shape[0]
        keys = keys.detach().to(self.queue.dtype)[-size:]
        n = keys.shape[0]
        rows = (self.queue_ptr + (total - n) + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys)
        self.queue_ptr.copy_((self.queue_ptr + total) % size)
        self.queue_filled.clamp_(max=size - n).add_(n)
        self._filled = min(size, before + total)
        return rows

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        device = student.pooled.device
        with fp32(device):
            z_s = self.embed_s(student.pooled.float())
            z_t = self.embed_t(teacher.pooled.float().detach())
            update = self.training
            keys = self.queue
            if self.cfg.train_teacher_embed and distributed.active():
                raise ValueError("rrd: train_teacher_embed is not supported on several processes")
            if update and self.cfg.queue_update == "before":
                rows = self.enqueue(distributed.gather_rows(z_t))
                if self.cfg.train_teacher_embed:
                    keys = keys.index_put((rows,), z_t[-keys.shape[0] :])  # out of place: these rows stay live
            filled = self.filled()
            # Rows are written from 0 upwards, so the filled ones come first. A copy: the matmul saves the keys
            # for the backward pass, and the queue is written in place ("after": below; "before": next step).
            keys = keys[:filled].clone()
            if filled == 0:
                loss = z_s.new_zeros(()) + z_s.sum() * 0.0  # no key yet: zero, still in the graph
            else:
                logits_s = z_s @ keys.t() / self.cfg.tau_s
                p_t = F.softmax((z_t @ keys.t()).detach() / self.cfg.tau_t, dim=1)
                loss = -(p_t * F.log_softmax(logits_s, dim=1)).sum(dim=1).mean()
            if update and self.cfg.queue_update == "after":
                self.enqueue(distributed.gather_rows(z_t))
        return {"rrd": self.cfg.weight * loss}


class RRDKD(RRD):
    """RRD + KD: RRD (beta 1, the paper setting) with Hinton's KD term added by the harness (alpha 1, T 4)."""

    name = "rrd+kd"
    Config = RRDKDConfig


class RRD2025(RRD):
    """RRD with the February-2025 reference setting: tau_s 0.1, tau_t 0.02, the batch enqueued BEFORE the loss."""

    name = "rrd-2025"
    Config = RRD2025Config
