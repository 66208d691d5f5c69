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


def _setting_key(setting: str) -> tuple:
    """``weight=125`` sorts before ``weight=1000``: each value compared as a number where it is one."""
    out: list[tuple] = []
    for part in setting.split(", "):
        key, _, value = part.partition("=")
        try:
            out.append((key, 0, float(value), ""))
        except ValueError:
            out.append((key, 1, 0.0, value))
    return tuple(out)


def method_order(names: list[str]) -> list[str]:
    """``names`` in the built-ins' order, then any others by name; a row of a method at another setting
    (``at (weight=250)``) follows the method's own row, ordered by its values."""
    rank = {n: i for i, n in enumerate(BUILTIN_ORDER)}

    def key(n: str) -> tuple:
        base, _, rest = n.partition(" (")
        return (rank.get(base, len(rank)), base, bool(rest), _setting_key(rest.rstrip(")")) if rest else ())

    return sorted(names, key=key)
