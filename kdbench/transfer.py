"""The transfer table: how well the students' frozen features carry over to other data (linear probes, CRD
Table 4), beside the same runs' accuracy on their own data.

One table per (source data, probe data, probe protocol, probe seed): a row per teacher:student pair and method (a
method at another setting is a row of its own, as in ``kdbench table``); a teacher's own training run is the
``Teacher`` row of every pair it teaches. Columns: the seeds probed, top-1 on the source data of exactly those runs,
the probe's top-1, and the probe's top-1 minus the vanilla student's of the same seed (paired over the seeds both
have). Read from ``probes/*.json`` and the run JSON alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdbench.catalog import method_order
from kdbench.results import ResultStore
from kdbench.tables import STUDENT, TEACHER, Collected

PROBE_LIMIT_BYTES = 16 * 1024 * 1024  # a probe record is a few kB; anything far larger is not one


@dataclass
class Stat:
    values: dict[int, float] = field(default_factory=dict)  # seed -> value

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))

    @property
    def std(self) -> float:
        return float(np.std(list(self.values.values()), ddof=1)) if self.n > 1 else 0.0

    def fmt(self) -> str:
        if not self.n:
            return ""
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


@dataclass
class TransferRow:
    pair: str
    row: str  # Teacher, Student or a method's row name
    source: Stat
    target: Stat
    gain: Stat  # target - the vanilla student's target, per seed both have


@dataclass
class TransferTable:
    title: str
    rows: list[TransferRow]
    skipped: list[str] = field(default_factory=list)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect_probes(store: ResultStore) -> tuple[list[dict[str, Any]], list[str]]:
    """The probe records of a results folder, and a reason for every file that is not one."""
    out, skipped = [], []
    folder = store.probes_dir
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            if not path.is_file() or path.is_symlink():
                raise ValueError("not a regular file")
            if path.stat().st_size > PROBE_LIMIT_BYTES:
                raise ValueError(f"larger than {PROBE_LIMIT_BYTES // 2**20} MiB")
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict) or rec.get("kind") != "linear_probe":
                raise ValueError("not a linear-probe record")
            if not _is_number(rec.get("top1_last")) or not isinstance(rec.get("run_id"), str):
                raise ValueError("no finite top1_last or no run_id")
            if not isinstance(rec.get("dataset"), dict) or not isinstance(rec.get("protocol"), dict):
                raise ValueError("no dataset or protocol record")
        except (OSError, ValueError, RecursionError) as exc:
            skipped.append(f"{path}: {exc}")
            continue
        rec["_file"] = path.name
        out.append(rec)
    return out, skipped


def _title(rec: dict[str, Any], source: str) -> str:
    d, p = rec["dataset"], rec["protocol"]
    size = f" @{d.get('image_size')}px" if d.get("image_size") else ""
    return (
        f"{source} -> {d.get('name')} ({d.get('num_classes')} classes, {d.get('train_size')} train / "
        f"{d.get('test_size')} test images{size}, data {str(d.get('checksum', ''))[:8]}), probe {p.get('name')} "
        f"({p.get('epochs')} epochs), probe seed {rec.get('probe_seed', 0)}"
    )


def build_transfer(col: Collected, probes: list[dict[str, Any]], metric: str = "top1_last") -> list[TransferTable]:
    """The transfer tables of a results folder (see the module docstring).

    Students' probes are grouped by probe (data, protocol, seed) and by the students' own group (data and training
    protocol), so runs of different protocols are never merged. A teacher's own training run (its own, longer
    protocol) is the Teacher row of every table of the same probe and source data whose pairs it teaches; a probed
    teacher with no such table gets a table of its own."""
    runs = col.runs.set_index("run_id", drop=False) if not col.runs.empty else pd.DataFrame()
    groups: dict[str, list[tuple[dict[str, Any], pd.Series]]] = {}
    teacher_probes: list[tuple[dict[str, Any], pd.Series]] = []
    skipped: list[str] = []
    for rec in probes:
        if rec["run_id"] not in runs.index:
            skipped.append(f"{rec['_file']}: its run {rec['run_id']} is not in runs/")
            continue
        run = runs.loc[rec["run_id"]]
        if isinstance(run, pd.DataFrame):  # the same run id in two files (tables name both): take the first
            run = run.iloc[0]
        if run["run_id"] in col.teacher_runs:
            teacher_probes.append((rec, run))
        else:
            groups.setdefault(_title(rec, str(run["group"])), []).append((rec, run))
    out: list[TransferTable] = []
    used_teachers: set[str] = set()
    for title, items in groups.items():
        cells: dict[tuple[str, str], tuple[Stat, Stat]] = {}
        pairs: list[str] = []
        problems: list[str] = []
        for rec, run in items:
            t_arch = run["teacher"] if isinstance(run["teacher"], str) else "-"
            pair = f"{t_arch}:{run['student']}"
            row = STUDENT if run["method"] == "ce" else str(run["method"])
            if pair not in pairs and row != STUDENT:
                pairs.append(pair)
            _add(cells.setdefault((pair, row), (Stat(), Stat())), rec, run, metric, problems)
        # a vanilla student (no teacher) belongs to every pair of its student
        for (pair, row), st in list(cells.items()):
            if row == STUDENT and pair.startswith("-:"):
                del cells[(pair, row)]
                student = pair[2:]
                targets = [p for p in pairs if p.split(":")[1] == student] or [pair]
                for p in targets:
                    cells[(p, STUDENT)] = st
                    if p not in pairs:
                        pairs.append(p)
        source_data = str(items[0][1]["group"]).split(" / ")[0]
        teachers: dict[str, tuple[Stat, Stat]] = {}
        for rec, run in teacher_probes:
            same = _title(rec, "") == _title(items[0][0], "") and str(run["group"]).split(" / ")[0] == source_data
            if same and any(p.split(":")[0] == run["student"] for p in pairs):
                _add(teachers.setdefault(str(run["student"]), (Stat(), Stat())), rec, run, metric, problems)
                used_teachers.add(rec["_file"])
        rows: list[TransferRow] = []
        for pair in pairs:
            t_arch = pair.split(":")[0]
            if t_arch in teachers:
                s, t = teachers[t_arch]
                rows.append(TransferRow(pair, TEACHER, s, t, Stat()))
            base = cells.get((pair, STUDENT))
            names = method_order([r for p, r in cells if p == pair and r != STUDENT])
            for row in ([STUDENT] if base else []) + names:
                s, t = cells[(pair, row)]
                gain = Stat()
                if base is not None:
                    gain.values = {k: v - base[1].values[k] for k, v in t.values.items() if k in base[1].values}
                rows.append(TransferRow(pair, row, s, t, gain))
        out.append(TransferTable(title, rows, problems))
    # probed teachers that teach no probed student: a table of their own
    alone: dict[str, list[tuple[dict[str, Any], pd.Series]]] = {}
    for rec, run in teacher_probes:
        if rec["_file"] not in used_teachers:
            alone.setdefault(_title(rec, str(run["group"])), []).append((rec, run))
    for title, items in alone.items():
        teachers = {}
        problems = []
        for rec, run in items:
            _add(teachers.setdefault(str(run["student"]), (Stat(), Stat())), rec, run, metric, problems)
        rows = [TransferRow(f"{arch}:-", TEACHER, s, t, Stat()) for arch, (s, t) in teachers.items()]
        out.append(TransferTable(title, rows, problems))
    if out and skipped:
        out[0].skipped[:0] = skipped
    return out


def _add(cell: tuple[Stat, Stat], rec: dict[str, Any], run: pd.Series, metric: str, problems: list[str]) -> None:
    """One probed run into a (source, target) cell; a second run of the same seed in one cell is named, not
    averaged in silently (the first stays)."""
    seed = int(run["seed"])
    source, target = cell
    if seed in target.values:
        problems.append(f"{rec['_file']}: a second probe of {run['method']} seed {seed} in one cell: left out")
        return
    if metric in run and _is_number(run[metric]):
        source.values[seed] = float(run[metric])
    target.values[seed] = float(rec["top1_last"])


def render_transfer_md(tables: list[TransferTable], metric: str = "top1_last") -> str:
    """The transfer tables in Markdown."""
    parts = []
    for table in tables:
        lines = [
            f"### Transfer: {table.title}",
            "",
            f"| pair | method | seeds | {metric} on its own data (these runs) | probe top-1 "
            "| probe - vanilla student |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in table.rows:
            name = "Teacher" if r.row == TEACHER else "Student (ce)" if r.row == STUDENT else r.row
            seeds = ", ".join(str(k) for k in sorted(r.target.values))
            gain = (
                ""
                if r.row == TEACHER or not r.gain.n
                else f"{r.gain.mean:+.2f}" + (f" (n={r.gain.n})" if r.gain.n != r.target.n else "")
            )
            lines.append(f"| {r.pair} | {name} | {seeds} | {r.source.fmt()} | {r.target.fmt()} | {gain} |")
        lines += [
            "",
            "mean ± sample std over the seeds probed; the linear probe's top-1 at its last epoch on the probe data's "
            "test split (frozen backbone in eval mode, pooled features); probe - vanilla student: paired by seed.",
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
