"""The evaluation harness shared by every method: accuracy, teacher-student alignment, calibration.

Every metric here is computed on the unaugmented test split with both networks in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data import Batch

ECE_BINS = 15


@torch.no_grad()
def predict(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, pooled features and labels over a whole split, model in eval mode (its mode is restored after).

    ``loader``: an evaluation loader (its ``epoch(0)`` is read) or any iterable of batches. A loader that is
    ``sharded`` over the ranks of a distributed run gives each rank its share; the rows are then gathered, so
    every rank returns the whole split in sample order, as one process computes it."""
    was_training = model.training
    model.eval()
    logits, pooled, labels, index = [], [], [], []
    batches: Iterable[Batch] = loader.epoch(0) if hasattr(loader, "epoch") else loader
    try:
        for batch in batches:
            out = model(batch.images)
            logits.append(out.logits.float())
            pooled.append(out.pooled.float())
            labels.append(batch.labels)
            index.append(batch.index)
    finally:
        model.train(was_training)
    result = torch.cat(logits), torch.cat(pooled), torch.cat(labels)
    if getattr(loader, "sharded", False):
        from kdbench.distributed import gather_split

        idx = torch.cat(index)
        result = tuple(gather_split(t, idx) for t in result)
    return result


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent (k capped at the class count)."""
    k_max = min(max(ks), logits.shape[1])
    hit = logits.topk(k_max, dim=1).indices.eq(labels[:, None])
    return {f"top{k}": 100.0 * hit[:, : min(k, k_max)].any(dim=1).float().mean().item() for k in ks}


def evaluate(model: nn.Module, test_loader: Any) -> dict[str, float]:
    """top-1 / top-5 (percent) of a model on the test loader (a GPULoader with train=False)."""
    logits, _, labels = predict(model, test_loader)
    return topk_accuracy(logits, labels)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1, device=logits.device)
    ece = torch.zeros((), device=logits.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return 100.0 * ece.item()


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)), averaged over samples (no T^2 factor: a divergence, not a loss)."""
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True).item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature matrices with the same rows (samples)."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    hsic = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(hsic / norm) if norm > 0 else float("nan")


def correlation_difference(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """|corr(teacher logits) - corr(student logits)|: class-by-class correlation matrices over the test set
    (the diagnostic of the CRD paper, Figure 3)."""

    def corr(z: torch.Tensor) -> torch.Tensor:
        c = torch.corrcoef(z.double().T)
        return torch.nan_to_num(c, nan=0.0)

    return (corr(teacher_logits) - corr(student_logits)).abs()


def alignment(
    student_logits: torch.Tensor,
    student_pooled: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_pooled: torch.Tensor,
) -> dict[str, Any]:
    """Teacher-student alignment metrics from test-set outputs."""
    diff = correlation_difference(teacher_logits, student_logits)
    return {
        "agreement": 100.0 * student_logits.argmax(1).eq(teacher_logits.argmax(1)).float().mean().item(),
        "kl_t1": kl_divergence(teacher_logits, student_logits, 1.0),
        "kl_t4": kl_divergence(teacher_logits, student_logits, 4.0),
        "cka": linear_cka(student_pooled, teacher_pooled),
        "corr_diff_mean": diff.mean().item(),
        "corr_diff_max": diff.max().item(),
        "_corr_diff": diff,
    }


def predict_test_split(model: nn.Module, data: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Logits, pooled features and labels of a model over the test split."""
    return predict(model, data.test_loader(256, device=device))


def final_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Any,
    device: torch.device,
    teacher_predictions: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, Any]:
    """Metrics stored in a finished run's JSON: calibration, and alignment with the teacher when there is one.

    ``teacher_predictions`` (from ``predict_test_split``) spares a cohort one teacher pass per member. The
    correlation-difference matrix is returned under "corr_diff" as nested lists (rounded to 4 decimals).
    """
    s_logits, s_pooled, labels = predict_test_split(student, data, device)
    out: dict[str, Any] = {"ece": expected_calibration_error(s_logits, labels)}
    if teacher is not None:
        t_logits, t_pooled, _ = teacher_predictions or predict_test_split(teacher, data, device)
        al = alignment(s_logits, s_pooled, t_logits, t_pooled)
        matrix = al.pop("_corr_diff")
        out.update(al)
        out["corr_diff"] = [[round(float(v), 4) for v in row] for row in matrix.cpu()]
        out["teacher_top1"] = topk_accuracy(t_logits, labels)["top1"]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
