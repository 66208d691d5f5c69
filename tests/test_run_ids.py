"""Run ids are the identity of committed results: a change to the spec's shape must not change the id of a run
that already exists (results/tinyimagenet100 holds runs under these ids). A new setting enters the id only when
it is set away from its default."""

from __future__ import annotations

from pathlib import Path

from kdbench.config import load_bench
from kdbench.sweep import Request, expand, teacher_run

ROOT = Path(__file__).resolve().parents[1]

# Ids of the tinyimagenet100-cpu runs, seed 0, as first trained (commit "CPU protocol and tinyimagenet100-cpu ...").
PINNED = {
    "ce": "7c929f94ad0eb183",
    "kd": "ecc92338cd289d50",
    "fitnet": "d4dd47cfb28a9ec4",
    "at": "1464aac4e3f9c79e",
    "sp": "6ca47cfe8cd3930e",
    "cc": "52cb9f5bf6cc7c43",
    "vid": "5b7870269070ace7",
    "rkd": "bd3dccf5b4379252",
    "pkt": "ee049298df52737c",
    "ab": "6947a89f4c69a5fe",
    "ft": "e888a5c01ca682c8",
    "fsp": "fb102e026e96d3cc",
    "nst": "11d9d82d73b42abe",
    "crd": "c86e43d3bf5d4d89",
    "crd+kd": "2d413afd830a1401",
    "crcd": "f76be59be18810a6",
    "rrd": "f43e34de54968591",
    "rrd+kd": "17bb2b1d83d2f6c9",
    "rrd-2025": "15d52b2300d5b319",
}


def test_committed_run_ids_are_stable():
    specs = expand(load_bench(ROOT / "bench.toml"), Request(list(PINNED), ["tinyimagenet100-cpu"], seeds=[0]))
    assert {s.method: s.run_id for s in specs} == PINNED
    tspec = next(s.teacher for s in specs if s.teacher is not None)
    assert tspec.teacher_id == "7d930470a081c442"
    assert teacher_run(tspec).run_id == "594133fede4d771f"
