"""Per-step cost of CRD's two N-dependent parts on this machine, timed on kdbench's own CRD: the class-aware negative
sampler and one direction's scores against the memory bank (forward and backward), at batch 64, K = 16384
negatives, 128-d embeddings, for the 3,200 training images of the pre-sweep estimate and the 50,000 of the sweep.

Run it on a quiet machine: `python results/tinyimagenet100/investigation/contrast_cost.py`.
"""

from __future__ import annotations

import time

import torch

from kdbench.method import MethodContext
from kdbench.methods.crd import CRD, CRDConfig
from kdbench.models.base import FeatureInfo


def ms_per_call(f, n: int = 20) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1000


def measure(n: int, b: int = 64, k: int = 16384, d: int = 128) -> tuple[int, float, float]:
    """(negatives per anchor, sampler ms, one direction's scores ms) of kdbench's CRD for a bank of n rows."""
    torch.manual_seed(0)
    info = FeatureInfo(channels=(16, 64), reduction=(1, 4), pooled_dim=64, num_classes=100)
    labels = torch.arange(n) % 100
    crd = CRD(CRDConfig(nce_k=k, feat_dim=d), MethodContext(info, info, 100, n, labels))
    crd.rng = torch.Generator().manual_seed(0)
    index = torch.randperm(n)[:b]
    v = torch.randn(b, d, requires_grad=True)
    idx = crd.sample_contrast(index)

    def scores():
        crd._exp_scores(v, crd.memory_t, idx).sum().backward()

    return crd.sampler.k, ms_per_call(lambda: crd.sample_contrast(index)), ms_per_call(scores)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 64, K 16384, d 128")
    for n in (3200, 50000):
        k, sample_ms, score_ms = measure(n)
        print(
            f"N {n:>6}: negatives per anchor {k:>5}; sampler {sample_ms:6.1f} ms, "
            f"scores of one direction (forward + backward) {score_ms:6.1f} ms per step"
        )


if __name__ == "__main__":
    main()
