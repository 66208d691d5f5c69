"""Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.losses import match_spatial
from kdbench.method import ID_WHEN_SET, Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.models.base import ModelOutput

MODES = ("code", "paper")


@dataclass
class ATConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 1000.0
    attention_power: float = 2.0
    mode: str = field(default="code", metadata=ID_WHEN_SET)  # "code": RepDistiller's squared form; "paper"

    RANGES = {**MethodConfig.RANGES, "attention_power": ">0", "mode": MODES}


def attention_map(f: torch.Tensor, power: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the channel mean of f**power, L2-normalised over the pixels."""
    return F.normalize(f.pow(power).mean(dim=1).flatten(1), dim=1)


def attention_distance(a_s: torch.Tensor, a_t: torch.Tensor, mode: str) -> torch.Tensor:
    """One layer's term from two (B, H*W) attention maps.

    ``code``: mean over batch and pixels of (a_s - a_t)^2. ``paper``: 1/2 * mean over the batch of
    ||a_s - a_t||_2 / (H*W), the paper's beta/2 ||.||_p (p = 2) with its beta "divided by the number of elements
    in the attention map and the batch size", so that ``weight`` (beta) keeps the same meaning in both modes.
    """
    diff = a_s - a_t
    if mode == "paper":
        return 0.5 * diff.norm(p=2, dim=1).mean() / diff.shape[1]
    return diff.pow(2).mean()


class AT(Method):
    """L = gamma CE + beta * sum_l d(a(f_s^l), a(f_t^l)),  a(f) = normalize(mean_c f_c^p) over the H*W pixels.

    d: ``code`` (default) mean_{b,pixels} (a_s - a_t)^2; ``paper`` 1/2 mean_b ||a_s - a_t||_2 / (H W) (see
    ``attention_distance``). Taps: ``feats[1:]`` of both networks (block-group outputs after ReLU, the reference's
    ``feat[1:-1]``), paired by index. Defaults: gamma 1, alpha 0, beta 1000, p 2, mode "code".

    Departures: ``mode="code"`` is RepDistiller's form (the CRD table's numbers), which squares the difference
    instead of the paper's norm; ``mode="paper"`` is the paper's. A larger map is adaptively average-pooled to the
    smaller size first; extra trailing block groups of the longer network are ignored (the reference's ``zip``).
    Channel counts never need to match.
    """

    name = "at"
    paper = (
        "Zagoruyko & Komodakis. Paying More Attention to Attention: Improving the Performance of Convolutional "
        "Neural Networks via Attention Transfer. ICLR 2017"
    )
    Config = ATConfig
    needs = frozenset({"feats"})

    def __init__(self, cfg: ATConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.mode not in MODES:
            raise KdbenchError(f"methods.at.mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        p, mode = self.cfg.attention_power, self.cfg.mode
        first = student.feats[1]
        with torch.autocast(device_type=first.device.type, enabled=False):
            total = first.new_zeros((), dtype=torch.float32)
            for f_s, f_t in zip(student.feats[1:], teacher.feats[1:]):
                f_s, f_t = match_spatial(f_s.float(), f_t.float())
                total = total + attention_distance(attention_map(f_s, p), attention_map(f_t, p), mode)
        return {"at": self.cfg.weight * total}
