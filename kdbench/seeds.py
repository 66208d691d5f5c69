"""Every seed kdbench derives: 63 bits of the sha256 of a text key, stable across processes, machines and
versions of Python and torch (no ``hash()``, whose value changes between processes)."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_from(key: str) -> int:
    """A 63-bit seed from a text key: the one derivation behind every seed below."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derive_seed(*parts: Any) -> int:
    """A seed from any tuple of parts (e.g. a run's seed, its method and a purpose such as "init")."""
    return seed_from(repr(parts))


def epoch_seed(seed: int, epoch: int) -> int:
    """The training loader's seed for (seed, epoch): its shuffle, crops and flips of that epoch."""
    return seed_from(f"kdbench.loader:{int(seed)}:{int(epoch)}")
