"""The built-in methods, in the order of the CRD paper's tables, with the names those tables give them.

The one list that orders methods in tables, figures, listings and ``--methods all``; a method from a plugin
sorts after the built-ins, by name. Light on purpose (no torch): table building imports it.
"""

from __future__ import annotations

# name -> its name in the published tables (None: not in them).
BUILTIN_METHODS: dict[str, str | None] = {
    "ce": "Student",
    "kd": "KD",
    "fitnet": "FitNet",
    "at": "AT",
    "sp": "SP",
    "cc": "CC",
    "vid": "VID",
    "rkd": "RKD",
    "pkt": "PKT",
    "ab": "AB",
    "ft": "FT",
    "fsp": "FSP",
    "nst": "NST",
    "crd": "CRD",
    "crd+kd": "CRD+KD",
    "crcd": "CRCD",
    "rrd": "RRD",
    "rrd+kd": "RRD+KD",
    "rrd-2025": None,
    # the modern baselines (MODERN below)
    "dkd": "DKD",
    "dkd-ls": "DKD+LS",
    "kd-ls": "KD+LS",
    "dist": "DIST",
    "reviewkd": "ReviewKD",
    "simkd": "SimKD",
    "ofd": "OFD",
}
# The modern baselines (issue 16): registered like every method, but outside `--methods all`, which keeps meaning
# the mission's methods and their variants (plus installed plugins).
MODERN: list[str] = ["dkd", "dkd-ls", "kd-ls", "dist", "reviewkd", "simkd", "ofd"]
BUILTIN_ORDER: list[str] = list(BUILTIN_METHODS)
PAPER_NAMES: dict[str, str] = {name: paper for name, paper in BUILTIN_METHODS.items() if paper is not None}


def method_order(names: list[str]) -> list[str]:
    """``names`` in the built-ins' order, then any others by name."""
    rank = {n: i for i, n in enumerate(BUILTIN_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))
