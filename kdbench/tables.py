"""The table model: runs collected from the per-run JSON, one Table per (dataset, protocol) group, and the
statistics behind it (mean ± sample std over seeds, ranks, published numbers, paired differences with a seeded
bootstrap interval). Rendering lives in ``kdbench.render``, the Markdown report in ``kdbench.report``.

One table per (dataset, protocol) group: rows are the teacher, the vanilla student (method ``ce``) and the
distillation methods; columns are teacher:student pairs. A cell is the mean ± sample std of one metric over the
seeds that finished; runs that failed or do not apply show as "failed" / "n/a", never as a number. Extras:
the rank of every row per pair and its average rank, published numbers beside ours (``reference``), and paired
differences over seeds against a baseline method with a seeded bootstrap interval (``vs``).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdbench.catalog import PAPER_NAMES
from kdbench.catalog import method_order as default_order
from kdbench.errors import KdbenchError
from kdbench.export import curve_problem, duplicate_line
from kdbench.results import ResultStore, card_run_id, load_run
from kdbench.variants import base_method, method_absent_values, pair_defaults, row_name, setting_diff, setting_label

# Metrics with a teacher row (the teacher card records them).
METRICS = ("top1_last", "top1_best", "top5_last", "top5_best")
HIGHER_IS_BETTER = {"top1_last", "top1_best", "top5_last", "top5_best", "agreement", "cka", "teacher_top1"}
LOWER_IS_BETTER = {"ece", "kl_t1", "kl_t4", "corr_diff_mean", "corr_diff_max"}
DIGITS = {"cka": 3, "kl_t1": 3, "kl_t4": 3, "corr_diff_mean": 4, "corr_diff_max": 3, "best_epoch": 1}

# Published numbers: the name given to --reference -> the prefix of the CSV's `source` column.
REFERENCES = {
    "crd2020": "CRD (Tian et al. ICLR 2020)",
    "rrd2024": "RRD (Giakoumoglou",
    "dkd2022": "DKD (Zhao",
    "dist2022": "DIST (Huang",
    "ls2024": "LS (Sun",
    "simkd2022": "SimKD (Chen",
    # ImageNet: mdistiller's README table (its own KD re-run, and DKD) on tv_resnet34:tv_resnet18 and
    # tv_resnet50:mobilenetv1
    "mdistiller-imagenet": "mdistiller README ImageNet",
}
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TEACHER, STUDENT = "Teacher", "Student"
_META_COLUMNS = {
    "group",
    "data",
    "student",
    "teacher",
    "method",
    "base_method",
    "setting",
    "seed",
    "status",
    "reason",
    "run_id",
    "file",
    "settings_kind",
    "config",
}
# Marks after a cell's number: which kind of method setting its runs used, and (with --reference) whether that is the
# setting the published number came from.
SETTING_MARKS = {
    "pair": ("†", "the authors' per-pair setting (kdbench/reference/pair_settings.toml)"),
    "set": ("‡", "a setting changed by bench.toml [methods] or --set"),
    "differs": ("≠", "the run's setting is not the one the published number came from"),
    "unknown": ("?", "the published number's setting could not be confirmed from the authors' files (SOURCES.md)"),
}


# ---------------------------------------------------------------------------------------------- collecting


@dataclass
class Collected:
    runs: pd.DataFrame
    teachers: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> the run's "curve"
    paths: dict[str, Path] = field(default_factory=dict)  # run_id -> its JSON file (for the diagnostics)
    root: Path | None = None
    teacher_runs: set[str] = field(default_factory=set)  # run ids of the vanilla runs that trained a used teacher
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> its keys away from the default


def _group(spec: dict[str, Any]) -> str:
    data = spec["data"]
    size = f"@{data['image_size']}" if data.get("image_size") else ""
    return f"{data['name']}{size} / {spec['protocol']['name']}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect(store: ResultStore) -> Collected:
    """Every run of a results folder as rows (one per run); malformed files are listed in `problems`, not fatal."""
    rows, teachers, problems = [], {}, []
    configs: dict[str, Any] = {}
    teacher_runs: set[str] = set()
    curves: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for path, run, error in store.iter_runs():
        if run is None:
            problems.append(error or str(path))
            continue
        if run["run_id"] in paths:  # a copied file: counted once, never averaged in
            problems.append(duplicate_line(run["run_id"], paths[run["run_id"]], path))
            continue
        if (bad_curve := curve_problem(run.get("curve"))) is not None:
            problems.append(f"{path}: {bad_curve} (left out of --long and the report's curves)")
        spec = run["spec"]
        teacher = spec.get("teacher")
        row = {
            "group": _group(spec),
            "data": spec["data"]["name"],
            "student": spec["student"],
            "teacher": teacher["arch"] if teacher else None,
            "method": spec["method"],
            "base_method": spec["method"],
            "setting": "",
            "seed": spec["seed"],
            "status": run["status"],
            "reason": run.get("reason"),
            "run_id": run["run_id"],
            "file": path.name,
            # runs recorded before per-pair settings existed have no "settings": their kind is not known
            "settings_kind": (run.get("settings") or {}).get("kind") if isinstance(run.get("settings"), dict) else None,
            # a record that states no settings (an empty method_config) cannot be compared with a published one
            "config": json.dumps(spec["method_config"], sort_keys=True) if spec.get("method_config") else None,
        }
        row.update({k: v for k, v in run["metrics"].items() if _is_number(v) and k not in _META_COLUMNS})
        if run["status"] == "done":
            bad = [
                k
                for k, v in run["metrics"].items()
                if not _is_number(v) and isinstance(v, (int, float, str)) and k not in _META_COLUMNS
            ]
            if bad:
                problems.append(f"{path}: metrics {', '.join(bad)} not a finite number (left out of the tables)")
        rows.append(row)
        configs[run["run_id"]] = spec.get("method_config")
        if bad_curve is None and isinstance(run.get("curve"), dict):
            curves[run["run_id"]] = run["curve"]
        paths[run["run_id"]] = path
        card = run.get("teacher")
        if teacher and (trained_by := card_run_id(card)):
            teacher_runs.add(trained_by)
        if teacher and isinstance(card, dict) and _is_number(card.get("top1")):
            key = (row["group"], teacher["arch"], card.get("weights_sha256"))
            teachers[key] = {
                "group": row["group"],
                "teacher": teacher["arch"],
                "top1_last": card.get("top1"),
                "top1_best": card.get("top1_best", card.get("top1")),
                "top5_last": card.get("top5"),
                "top5_best": card.get("top5"),
            }
    teacher_runs |= store.teacher_run_ids()
    # Runs at a setting other than their method's default are rows of their own ("at (weight=250)").
    settings: dict[str, dict[str, Any]] = {}
    if rows:

        def key(r: dict[str, Any]) -> tuple[str, str]:
            return r["method"], f"{r['teacher'] or '-'}:{r['student']}"

        defaults = pair_defaults([key(r) for r in rows])
        absent = method_absent_values([r["method"] for r in rows])
        for r in rows:
            diff = setting_diff(configs.get(r["run_id"]) or {}, defaults[key(r)], absent[r["method"]])
            if diff:
                settings[r["run_id"]] = diff
                r["setting"] = setting_label(diff)
                r["method"] = row_name(r["method"], diff)
    runs = pd.DataFrame(rows)
    if not runs.empty:
        keys = ["group", "teacher", "student", "method", "seed"]
        dup = runs[runs["method"] != "ce"].groupby(keys, dropna=False).size()
        for key, count in dup[dup > 1].items():
            problems.append(
                f"{count} runs of {key[3]} on {key[1]}:{key[2]} seed {key[4]} ({key[0]}) differ in their "
                "settings: the table averages them together"
            )
    return Collected(
        runs, pd.DataFrame(list(teachers.values())), problems, curves, paths, store.root, teacher_runs, settings
    )


def available_metrics(col: Collected) -> list[str]:
    """Numeric metrics present in at least one run (what --metric accepts)."""
    if col.runs.empty:
        return list(METRICS)
    found = [c for c in col.runs.columns if c not in _META_COLUMNS and col.runs[c].notna().any()]
    return list(METRICS) + sorted(set(found) - set(METRICS))


def check_metric(col: Collected, metric: str) -> None:
    valid = available_metrics(col)
    if metric not in valid:
        raise KdbenchError(f"unknown metric {metric!r}; valid: {', '.join(valid)}")


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither (then nothing is ranked)."""
    return 1 if metric in HIGHER_IS_BETTER else -1 if metric in LOWER_IS_BETTER else 0


# ---------------------------------------------------------------------------------------------- reference


def load_reference(names: str | list[str] | None) -> tuple[dict[tuple[str, str, str], float | None], list[str]]:
    """Published top-1 numbers keyed by (teacher, student, paper method name), from the shipped CSV; None where the
    paper reports the method as not applicable (an empty cell of the CSV, e.g. FSP across channel counts)."""
    if not names:
        return {}, []
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    for n in wanted:
        if n not in REFERENCES:
            raise KdbenchError(f"unknown reference {n!r}; valid: {', '.join(REFERENCES)}")
    out: dict[tuple[str, str, str], float | None] = {}
    for rec in _reference_rows():
        if any(rec["source"].startswith(REFERENCES[n]) for n in wanted):
            out[(rec["teacher"], rec["student"], rec["method"])] = float(rec["top1"]) if rec["top1"] else None
    return out, wanted


# The shipped top-1 tables (SOURCES.md): CIFAR-100, then ImageNet (whose pairs, tv_resnet34:tv_resnet18 and
# tv_resnet50:mobilenetv1, never collide with a CIFAR pair).
REFERENCE_FILES = ("cifar100_top1.csv", "imagenet_top1.csv")
# The datasets with published numbers: their protocol in bench.toml, and how a note names it.
PUBLISHED_PROTOCOL = {"cifar100": ("paper", "240-epoch paper"), "imagenet": ("imagenet", "100-epoch ImageNet")}


def _reference_rows() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name in REFERENCE_FILES:
        with open(REFERENCE_DIR / name, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def load_transfer_reference() -> dict[tuple[str, str, str, str], float]:
    """Published linear-probe top-1 keyed by (teacher, student, paper method name, dataset)."""
    out: dict[tuple[str, str, str, str], float] = {}
    with open(REFERENCE_DIR / "transfer_linear_probe.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            for ds in ("stl10", "tinyimagenet"):
                if rec.get(ds):
                    out[(rec["teacher"], rec["student"], rec["method"], ds)] = float(rec[ds])
    return out


def _paper_order() -> list[str]:
    return list(dict.fromkeys(f"{r['teacher']}:{r['student']}" for r in _reference_rows()))


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Cell:
    """The runs of one (row, pair): values are (seed, value) of the finished ones."""

    status: str  # done | failed | n/a | missing (done, but without this metric)
    values: list[tuple[int, float]] = field(default_factory=list)
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean([v for _, v in self.values]))

    @property
    def std(self) -> float:
        return float(np.std([v for _, v in self.values], ddof=1)) if self.n > 1 else float("nan")

    def by_seed(self) -> dict[int, float]:
        return {s: v for s, v in self.values}


@dataclass
class Paired:
    """Mean difference (row - baseline) over the seeds both have, with a 95% bootstrap interval (None if n < 2)."""

    n: int
    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    status: str = "done"  # done | failed | n/a | no common seed


@dataclass
class Table:
    group: str
    metric: str
    pairs: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell]
    ranks: dict[tuple[str, str], float] = field(default_factory=dict)
    avg_rank: dict[str, float] = field(default_factory=dict)
    reference: dict[tuple[str, str], float | None] | None = None  # (row, pair) -> published number (None: N/A)
    reference_names: list[str] = field(default_factory=list)
    vs: str | None = None
    paired: dict[tuple[str, str], Paired] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # (row, pair) -> keys of SETTING_MARKS, in order: the kind of setting its runs used, then the reference checks
    setting_marks: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def digits(self) -> int:
        return DIGITS.get(self.metric, 2)

    @property
    def direction(self) -> int:
        return direction(self.metric)

    def cell(self, row: str, pair: str) -> Cell | None:
        return self.cells.get((row, pair))

    def diff(self, row: str, pair: str) -> float | None:
        c, ref = self.cell(row, pair), (self.reference or {}).get((row, pair))
        return c.mean - ref if c is not None and c.n and ref is not None else None

    def mean_diff(self, row: str) -> float | None:
        diffs = [d for p in self.pairs if (d := self.diff(row, p)) is not None]
        return float(np.mean(diffs)) if diffs else None

    def common_n(self) -> int | None:
        """The most common seed count of the non-teacher cells (the one the caption states)."""
        counts = Counter(c.n for (r, _), c in self.cells.items() if r != TEACHER and c.n)
        return counts.most_common(1)[0][0] if counts else None

    def paired_n(self) -> int | None:
        counts = Counter(p.n for p in self.paired.values() if p.status == "done")
        return counts.most_common(1)[0][0] if counts else None


def _cell(sub: pd.DataFrame, metric: str) -> Cell:
    done = sub[sub["status"] == "done"]
    failed = int((sub["status"] == "failed").sum())
    values: list[tuple[int, float]] = []
    if metric in done:
        values = [(int(s), float(v)) for s, v in zip(done["seed"], done[metric]) if _is_number(v)]
    if values:
        return Cell("done", values, failed)
    if (sub["status"] == "n/a").all():
        return Cell("n/a")
    if failed:
        return Cell("failed", failed=failed)
    return Cell("missing")


def _teacher_cell(col: Collected, group: str, teacher: str, metric: str) -> Cell | None:
    t = col.teachers
    if t.empty or metric not in t:
        return None
    vals = t[(t["group"] == group) & (t["teacher"] == teacher)][metric].dropna().astype(float)
    return Cell("done", [(i, float(v)) for i, v in enumerate(vals)]) if len(vals) else None


def _rank(values: dict[str, float], sign: int) -> dict[str, float]:
    """1 = best; ties share the average of their ranks."""
    keyed = sorted(values, key=lambda r: -sign * values[r])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(keyed):
        j = i
        while j + 1 < len(keyed) and round(values[keyed[j + 1]], 9) == round(values[keyed[i]], 9):
            j += 1
        for k in range(i, j + 1):
            ranks[keyed[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def bootstrap_ci(
    diffs: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (seeded: the same input gives the same interval)."""
    x = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _paired(cell: Cell | None, base: Cell | None) -> Paired | None:
    if cell is None:
        return None
    if cell.status in ("failed", "n/a") and not cell.n:
        return Paired(0, status=cell.status)
    if base is None or not base.n or not cell.n:
        return None
    a, b = cell.by_seed(), base.by_seed()
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return Paired(0, status="no common seed")
    diffs = [a[s] - b[s] for s in seeds]
    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return Paired(1, mean)
    lo, hi = bootstrap_ci(diffs)
    return Paired(len(diffs), mean, lo, hi)


def build_tables(
    col: Collected,
    metric: str = "top1_last",
    method_order: list[str] | None = None,
    reference: str | list[str] | None = None,
    vs: str | None = None,
) -> dict[str, Table]:
    """One Table per (dataset, protocol) group of the results."""
    runs = col.runs
    out: dict[str, Table] = {}
    if runs.empty:
        return out
    check_metric(col, metric)
    ref, ref_names = load_reference(reference)
    if ref_names and not metric.startswith("top1"):
        raise KdbenchError(
            f"--reference compares published top-1 accuracy; it needs --metric top1_last or top1_best, not {metric!r}"
        )
    paper_rank = {p: i for i, p in enumerate(_paper_order())}
    present = set(runs["method"])
    if vs is not None:
        vs_method = "ce" if vs.lower() in ("ce", "student") else vs
        if vs_method not in present:
            raise KdbenchError(
                f"--vs {vs!r}: no runs of that method; methods present: {', '.join(default_order(sorted(present)))}"
            )
    for group, g in runs.groupby("group", sort=False):
        own = g["run_id"].isin(col.teacher_runs)
        if own.all():
            continue  # only the teachers' own training runs (their own protocol): they are the tables' Teacher row
        seen = list(dict.fromkeys(f"{t}:{s}" for t, s in zip(g["teacher"], g["student"]) if isinstance(t, str)))
        # Methods trained without a teacher (requires_teacher False, no KD term) belong to every pair of their
        # student, like the vanilla student; a student with no such pair gets a column "-:student".
        teacherless = g[g["teacher"].isna() & (g["method"] != "ce")]
        students = {p.split(":")[1] for p in seen}
        seen += list(dict.fromkeys(f"-:{s}" for s in teacherless["student"] if s not in students))
        if not seen:  # vanilla runs only: one column per student (a teacher's own training run is not one)
            seen = list(dict.fromkeys(f"-:{s}" for s in g[~own]["student"]))
        pairs = sorted(seen, key=lambda p: (paper_rank.get(p, len(paper_rank)), seen.index(p)))
        methods = [m for m in (method_order or default_order(list(g["method"].unique()))) if m != "ce"]
        cells: dict[tuple[str, str], Cell] = {}
        for pair in pairs:
            t, s = pair.split(":")
            tc = _teacher_cell(col, group, t, metric)
            if tc is not None:
                cells[(TEACHER, pair)] = tc
            ce = g[(g["method"] == "ce") & (g["student"] == s)]
            if not ce.empty:
                cells[(STUDENT, pair)] = _cell(ce, metric)
            for m in methods:
                sub = g[(g["method"] == m) & ((g["teacher"] == t) | g["teacher"].isna()) & (g["student"] == s)]
                if not sub.empty:
                    cells[(m, pair)] = _cell(sub, metric)
        rows = [
            r
            for r in [TEACHER, STUDENT, *methods]
            if any((c := cells.get((r, p))) is not None and c.status != "missing" for p in pairs)
        ]
        cells = {k: c for k, c in cells.items() if k[0] in rows}
        table = Table(group, metric, pairs, rows, cells)
        _add_ranks(table)
        _add_setting_kinds(table, g)
        if ref_names:
            data = g["data"].iloc[0]
            if data in PUBLISHED_PROTOCOL:
                table.reference = {}
                table.reference_names = ref_names
                proto = str(group).rsplit(" / ", 1)[-1]
                name, words = PUBLISHED_PROTOCOL[data]
                if proto != name:
                    table.notes.append(
                        f"the published numbers come from the {words} protocol; these runs used the {proto!r} protocol"
                    )
                for row in rows:
                    # a row of another setting ("dkd (beta=8)") is set beside its method's published number too,
                    # marked ≠ below: the comparison is shown, and said to be of another experiment
                    name = row if row == TEACHER else PAPER_NAMES.get("ce" if row == STUDENT else base_method(row))
                    for pair in pairs:
                        t, s = pair.split(":")
                        if name is not None and (t, s, name) in ref:
                            table.reference[(row, pair)] = ref[(t, s, name)]
                            if row not in (TEACHER, STUDENT):
                                _check_published_setting(table, g, row, pair)
            else:
                table.notes.append(
                    f"published numbers ({', '.join(ref_names)}) are CIFAR-100 and ImageNet results: "
                    f"not shown for {data}"
                )
        if vs is not None:
            base_row = STUDENT if vs.lower() in ("ce", "student") else vs
            table.vs = base_row
            for row in rows:
                if row in (TEACHER, base_row):
                    continue
                for pair in pairs:
                    pr = _paired(cells.get((row, pair)), cells.get((base_row, pair)))
                    if pr is not None:
                        table.paired[(row, pair)] = pr
        out[group] = table
    return out


def _cell_runs(g: pd.DataFrame, row: str, pair: str) -> pd.DataFrame:
    t, s = pair.split(":")
    return g[(g["method"] == row) & ((g["teacher"] == t) | g["teacher"].isna()) & (g["student"] == s)]


def _add_setting_kinds(table: Table, g: pd.DataFrame) -> None:
    """Mark the cells whose runs used the authors' per-pair setting (†) or a setting changed by bench.toml / --set
    (‡); a cell of the method's default setting has no mark."""
    for row, pair in table.cells:
        if row in (TEACHER, STUDENT):
            continue
        kinds = set(_cell_runs(g, row, pair)["settings_kind"].dropna())
        for kind in ("pair", "set"):
            if kind in kinds:
                table.setting_marks.setdefault((row, pair), []).append(kind)


def _check_published_setting(table: Table, g: pd.DataFrame, row: str, pair: str) -> None:
    """Mark a cell beside a published number when its runs' resolved settings are not the ones that number came
    from (≠: the method's default with the pair's published values, pair_settings.toml), or when that setting could
    not be confirmed (?)."""
    from kdbench.method import resolve
    from kdbench.pair_settings import published_config

    try:
        expected, ps = published_config(resolve(base_method(row)), pair)
    except KdbenchError:  # a plugin that is not installed here: nothing to compare with
        return
    marks = table.setting_marks.setdefault((row, pair), [])
    runs = _cell_runs(g, row, pair)
    done = runs[runs["status"] == "done"]
    if any(c != json.dumps(expected, sort_keys=True) for c in done["config"].dropna()):
        marks.append("differs")
    if ps is not None and not ps.confirmed:
        marks.append("unknown")
    if not marks:
        del table.setting_marks[(row, pair)]


def _add_ranks(table: Table) -> None:
    sign = table.direction
    if sign == 0:
        return
    for pair in table.pairs:
        means = {r: c.mean for r in table.rows if r != TEACHER and (c := table.cell(r, pair)) is not None and c.n}
        for r, rank in _rank(means, sign).items():
            table.ranks[(r, pair)] = rank
    for r in table.rows:
        got = [table.ranks[(r, p)] for p in table.pairs if (r, p) in table.ranks]
        if got:
            table.avg_rank[r] = float(np.mean(got))


def load_corr_diff(col: Collected, run_id: str) -> np.ndarray | None:
    """The stored |corr_T - corr_S| matrix of a run (read from its file: it is not kept in memory)."""
    path = col.paths.get(run_id)
    if path is None:
        return None
    try:
        mat = load_run(path).get("diagnostics", {}).get("corr_diff")
    except KdbenchError:
        return None
    return np.asarray(mat, dtype=np.float64) if mat else None
