"""Kendall's rank correlation between two rankings of the same methods, with its p-value.

Used to ask whether a benchmark reproduces a published ranking (e.g. our methods on one pair against CRD's Table 1
for the closest pair). tau-b handles ties; the two-sided p-value is exact (the permutation distribution of the
number of discordant pairs) when neither side has ties, and otherwise the normal approximation with the
tie-corrected variance (Kendall 1970, as scipy.stats.kendalltau does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class KendallResult:
    tau: float
    p_value: float
    n: int
    method: str  # "exact" or "normal"


@lru_cache(maxsize=64)
def _inversion_counts(n: int) -> tuple[int, ...]:
    """counts[k] = number of permutations of n items with exactly k inversions (the Mahonian numbers)."""
    counts = [1]
    for m in range(2, n + 1):
        new = [0] * (len(counts) + m - 1)
        for k, c in enumerate(counts):
            for j in range(m):  # the m-th item adds 0..m-1 inversions
                new[k + j] += c
        counts = new
    return tuple(counts)


def kendall_tau(x: list[float], y: list[float]) -> KendallResult:
    """tau-b of paired observations ``x[i]``, ``y[i]`` and its two-sided p-value under independence."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"kendall_tau needs paired values, got {n} and {len(y)}")
    if n < 2:
        raise ValueError("kendall_tau needs at least two pairs")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    if denom == 0:
        raise ValueError("kendall_tau is undefined when one side is constant")
    tau = (concordant - discordant) / denom
    if ties_x == 0 and ties_y == 0 and len(set(x)) == n and len(set(y)) == n:
        counts = _inversion_counts(n)
        total = math.factorial(n)
        lower = min(discordant, concordant)  # by symmetry, the tail on the observed side
        tail = sum(counts[: lower + 1]) / total
        return KendallResult(tau, min(1.0, 2.0 * tail), n, "exact")
    return KendallResult(tau, _normal_p(x, y, concordant - discordant), n, "normal")


def _tie_groups(values: list[float]) -> list[int]:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [t for t in counts.values() if t > 1]


def _normal_p(x: list[float], y: list[float], s: int) -> float:
    n = len(x)
    tx, ty = _tie_groups(x), _tie_groups(y)
    v0 = n * (n - 1) * (2 * n + 5)
    vt = sum(t * (t - 1) * (2 * t + 5) for t in tx)
    vu = sum(u * (u - 1) * (2 * u + 5) for u in ty)
    v1 = sum(t * (t - 1) for t in tx) * sum(u * (u - 1) for u in ty) / (2 * n * (n - 1))
    v2 = (
        (sum(t * (t - 1) * (t - 2) for t in tx) * sum(u * (u - 1) * (u - 2) for u in ty) / (9 * n * (n - 1) * (n - 2)))
        if n > 2
        else 0.0
    )
    var = (v0 - vt - vu) / 18 + v1 + v2
    if var <= 0:
        return 1.0
    z = abs(s) / math.sqrt(var)
    return math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class RankAgreement:
    """Our ranking of the rows of one pair against a published ranking (possibly of another pair)."""

    pair: str
    published_pair: str
    reference: str
    rows: tuple[str, ...]
    result: KendallResult


def rank_agreement(
    ours: dict[str, float], published: dict[str, float], *, pair: str, published_pair: str, reference: str
) -> RankAgreement:
    """Kendall tau between our mean metric per row and the published number per row, over the rows both have."""
    rows = tuple(r for r in ours if published.get(r) is not None)
    if len(rows) < 3:
        raise ValueError(f"{pair} vs {reference} {published_pair}: only {len(rows)} rows in common, need 3")
    return RankAgreement(
        pair, published_pair, reference, rows, kendall_tau([ours[r] for r in rows], [float(published[r]) for r in rows])
    )


def render_agreement_md(a: RankAgreement) -> str:
    r = a.result
    same = a.pair == a.published_pair
    against = (
        f"the published ranking of the same pair ({a.reference})"
        if same
        else f"the published ranking of {a.published_pair} ({a.reference})"
    )
    return (
        f"Rank agreement of {a.pair} with {against}: Kendall tau-b = {r.tau:.3f}, two-sided p = {r.p_value:.3g} "
        f"({r.method}), over the {r.n} rows both have: {', '.join(a.rows)}."
    )
