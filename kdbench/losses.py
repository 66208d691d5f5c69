"""Loss terms the harness itself adds for every method (cross-entropy and Hinton's KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x.float()``, except that float64 stays float64.

    Losses run in at least fp32 (a bf16 forward's outputs are widened to fp32, exactly as ``.float()`` does);
    a float64 run, which the lock-step fidelity test (tests/test_lockstep.py) trains, must not be narrowed to fp32
    on the way. For every other dtype this is ``x.float()``, so fp32 and bf16 runs compute the same numbers.
    """
    return x if x.dtype == torch.float64 else x.float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (Hinton et al. 2015, CRD protocol)."""
    t = float(temperature)
    log_p_s = F.log_softmax(widen(student_logits) / t, dim=1)
    log_p_t = F.log_softmax(widen(teacher_logits) / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two maps (B, C, H, W) to the other's height and width, as the reference
    code does wherever a method pairs maps of different sizes (AT, NST, VID, FT, FSP)."""
    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    if a.shape[2:] != (h, w):
        a = F.adaptive_avg_pool2d(a, (h, w))
    if b.shape[2:] != (h, w):
        b = F.adaptive_avg_pool2d(b, (h, w))
    return a, b


def standardise(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each row of logits: (z - mean) / (eps + std), std with Bessel's correction (torch's default),
    as the logit-standardisation reference code (Sun et al. CVPR 2024) computes it."""
    z = widen(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))
