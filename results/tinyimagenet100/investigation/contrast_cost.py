"""Per-step cost of CRD's two N-dependent parts on this machine: the class-aware negative sampler and one direction's
scores against the memory bank (forward and backward), at batch 64, K = 16384 negatives, 128-d embeddings, for the
3,200 training images of the pre-sweep estimate and the 50,000 of the real sweep.

Run it on a quiet machine: `python results/tinyimagenet100/investigation/contrast_cost.py`.
"""

from __future__ import annotations

import time

import torch

from kdbench.method_parts import ClassNegativeSampler


def ms_per_call(f, n: int = 20) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1000


def measure(n: int, b: int = 64, k: int = 16384, d: int = 128) -> tuple[int, float, float]:
    """(negatives per anchor, sampler ms, one direction's scores ms) for a bank of n rows."""
    torch.manual_seed(0)
    sampler = ClassNegativeSampler(torch.arange(n) % 100, k)
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(n)[:b]
    memory = torch.randn(n, d)
    v = torch.randn(b, d, requires_grad=True)
    idx = sampler(index, gen)

    def scores():
        sim = (v @ memory.clone().t()).gather(1, idx)
        torch.exp(sim / 0.07).sum().backward()

    return sampler.k, ms_per_call(lambda: sampler(index, gen)), ms_per_call(scores)


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
