"""Paper-style tables from the per-run JSON alone (Markdown, LaTeX, CSV) and the Markdown report around them.

One table per (dataset, protocol) group: rows are the teacher, the vanilla student (method ``ce``) and the
distillation methods; columns are teacher:student pairs. A cell is the mean ± sample std of one metric over the
seeds that finished; runs that failed or do not apply show as "failed" / "n/a", never as a number. Extras:
the rank of every row per pair and its average rank, published numbers beside ours (``reference``), and paired
differences over seeds against a baseline method with a seeded bootstrap interval (``vs``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdbench.errors import KdbenchError
from kdbench.results import ResultStore, load_run

# Metrics with a teacher row (the teacher card records them).
METRICS = ("top1_last", "top1_best", "top5_last", "top5_best")
HIGHER_IS_BETTER = {"top1_last", "top1_best", "top5_last", "top5_best", "agreement", "cka", "teacher_top1"}
LOWER_IS_BETTER = {"ece", "kl_t1", "kl_t4", "corr_diff_mean", "corr_diff_max"}
DIGITS = {"cka": 3, "kl_t1": 3, "kl_t4": 3, "corr_diff_mean": 4, "corr_diff_max": 3, "best_epoch": 1}

# Published numbers: the name given to --reference -> the prefix of the CSV's `source` column.
REFERENCES = {"crd2020": "CRD (Tian et al. ICLR 2020)", "rrd2024": "RRD (Giakoumoglou", "dkd2022": "DKD (Zhao",
              "dist2022": "DIST (Huang", "ls2024": "LS (Sun", "simkd2022": "SimKD (Chen"}
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
# Our method names -> the names in the published tables.
PAPER_NAMES = {
    "ce": "Student", "kd": "KD", "fitnet": "FitNet", "at": "AT", "sp": "SP", "cc": "CC", "vid": "VID", "rkd": "RKD",
    "pkt": "PKT", "ab": "AB", "ft": "FT", "fsp": "FSP", "nst": "NST", "crd": "CRD", "crd+kd": "CRD+KD",
    "crcd": "CRCD", "rrd": "RRD", "rrd+kd": "RRD+KD", "dkd": "DKD", "dist": "DIST", "kd-ls": "KD+LS",
    "dkd-ls": "DKD+LS", "simkd": "SimKD", "reviewkd": "ReviewKD", "ofd": "OFD",
}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TEACHER, STUDENT = "Teacher", "Student"
_META_COLUMNS = {"group", "data", "student", "teacher", "method", "seed", "status", "reason", "run_id", "file"}


# ---------------------------------------------------------------------------------------------- collecting


@dataclass
class Collected:
    runs: pd.DataFrame
    teachers: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> the run's "curve"
    paths: dict[str, Path] = field(default_factory=dict)  # run_id -> its JSON file (for the diagnostics)
    root: Path | None = None


def _group(spec: dict[str, Any]) -> str:
    data = spec["data"]
    size = f"@{data['image_size']}" if data.get("image_size") else ""
    return f"{data['name']}{size} / {spec['protocol']['name']}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect(store: ResultStore) -> Collected:
    """Every run of a results folder as rows (one per run); malformed files are listed in `problems`, not fatal."""
    rows, teachers, problems = [], {}, []
    curves: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for path, run, error in store.iter_runs():
        if run is None:
            problems.append(error or str(path))
            continue
        spec = run["spec"]
        teacher = spec.get("teacher")
        row = {
            "group": _group(spec), "data": spec["data"]["name"], "student": spec["student"],
            "teacher": teacher["arch"] if teacher else None, "method": spec["method"], "seed": spec["seed"],
            "status": run["status"], "reason": run.get("reason"), "run_id": run["run_id"], "file": path.name,
        }
        row.update({k: v for k, v in run["metrics"].items() if _is_number(v) and k not in _META_COLUMNS})
        rows.append(row)
        if isinstance(run.get("curve"), dict):
            curves[run["run_id"]] = run["curve"]
        paths[run["run_id"]] = path
        card = run.get("teacher")
        if teacher and isinstance(card, dict) and card.get("top1") is not None:
            key = (row["group"], teacher["arch"], card.get("weights_sha256"))
            teachers[key] = {"group": row["group"], "teacher": teacher["arch"], "top1_last": card.get("top1"),
                             "top1_best": card.get("top1_best", card.get("top1")), "top5_last": card.get("top5"),
                             "top5_best": card.get("top5")}
    runs = pd.DataFrame(rows)
    if not runs.empty:
        keys = ["group", "teacher", "student", "method", "seed"]
        dup = runs[runs["method"] != "ce"].groupby(keys, dropna=False).size()
        for key, count in dup[dup > 1].items():
            problems.append(f"{count} runs of {key[3]} on {key[1]}:{key[2]} seed {key[4]} ({key[0]}) differ in their "
                            "settings: the table averages them together")
    return Collected(runs, pd.DataFrame(list(teachers.values())), problems, curves, paths, store.root)


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
    with open(REFERENCE_DIR / "cifar100_top1.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            if any(rec["source"].startswith(REFERENCES[n]) for n in wanted):
                out[(rec["teacher"], rec["student"], rec["method"])] = float(rec["top1"]) if rec["top1"] else None
    return out, wanted


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
    with open(REFERENCE_DIR / "cifar100_top1.csv", newline="") as fh:
        return list(dict.fromkeys(f"{r['teacher']}:{r['student']}" for r in csv.DictReader(fh)))


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


def bootstrap_ci(diffs: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
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


def build_tables(col: Collected, metric: str = "top1_last", method_order: list[str] | None = None,
                 reference: str | list[str] | None = None, vs: str | None = None) -> dict[str, Table]:
    """One Table per (dataset, protocol) group of the results."""
    from kdbench.sweep import method_order as default_order

    runs = col.runs
    out: dict[str, Table] = {}
    if runs.empty:
        return out
    check_metric(col, metric)
    ref, ref_names = load_reference(reference)
    if ref_names and not metric.startswith("top1"):
        raise KdbenchError(f"--reference compares published top-1 accuracy; it needs --metric top1_last or "
                           f"top1_best, not {metric!r}")
    paper_rank = {p: i for i, p in enumerate(_paper_order())}
    present = set(runs["method"])
    if vs is not None:
        base_method = "ce" if vs.lower() in ("ce", "student") else vs
        if base_method not in present:
            raise KdbenchError(f"--vs {vs!r}: no runs of that method; methods present: "
                               f"{', '.join(default_order(sorted(present)))}")
    for group, g in runs.groupby("group", sort=False):
        seen = list(dict.fromkeys(f"{t}:{s}" for t, s in zip(g["teacher"], g["student"]) if isinstance(t, str)))
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
                sub = g[(g["method"] == m) & (g["teacher"] == t) & (g["student"] == s)]
                if not sub.empty:
                    cells[(m, pair)] = _cell(sub, metric)
        rows = [r for r in [TEACHER, STUDENT, *methods]
                if any((c := cells.get((r, p))) is not None and c.status != "missing" for p in pairs)]
        cells = {k: c for k, c in cells.items() if k[0] in rows}
        table = Table(group, metric, pairs, rows, cells)
        _add_ranks(table)
        if ref_names:
            data = g["data"].iloc[0]
            if data == "cifar100":
                table.reference = {}
                table.reference_names = ref_names
                proto = str(group).rsplit(" / ", 1)[-1]
                if proto != "paper":
                    table.notes.append(f"the published numbers come from the 240-epoch paper protocol; these runs "
                                       f"used the {proto!r} protocol")
                for row in rows:
                    name = row if row == TEACHER else PAPER_NAMES.get("ce" if row == STUDENT else row)
                    for pair in pairs:
                        t, s = pair.split(":")
                        if name is not None and (t, s, name) in ref:
                            table.reference[(row, pair)] = ref[(t, s, name)]
            else:
                table.notes.append(f"published numbers ({', '.join(ref_names)}) are CIFAR-100 results: "
                                   f"not shown for {data}")
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


# ---------------------------------------------------------------------------------------------- rendering


def _latex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append({"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$"}.get(ch, ch))
    return "".join(out)


def _published(table: Table, row: str, pair: str) -> str:
    ref = table.reference or {}
    if (row, pair) not in ref:
        return ""
    value = ref[(row, pair)]
    return "n/a" if value is None else _num(value, table.digits)


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _marks(table: Table, pair: str) -> tuple[float | None, float | None]:
    """The best and second-best distinct means of a pair (Teacher excluded)."""
    if table.direction == 0:
        return None, None
    means = sorted({round(c.mean, 9) for r in table.rows if r != TEACHER
                    and (c := table.cell(r, pair)) is not None and c.n}, reverse=table.direction > 0)
    return (means[0] if means else None), (means[1] if len(means) > 1 else None)


def _cell_text(table: Table, row: str, pair: str, fmt: str, marks: tuple[float | None, float | None]) -> str:
    c = table.cell(row, pair)
    if c is None:
        return ""
    if not c.n:
        return {"missing": "-"}.get(c.status, c.status)
    d = table.digits
    text = _num(c.mean, d) + (f" ± {_num(c.std, d)}" if c.n > 1 else "")
    if c.n != table.common_n() and row != TEACHER:
        text += f" (n={c.n})"
    if c.failed:
        text += f" ({c.failed} failed)"
    if fmt == "latex":
        text = _latex_escape(text)
    if row != TEACHER:
        key = round(c.mean, 9)
        if key == marks[0]:
            text = f"**{text}**" if fmt == "md" else f"\\textbf{{{text}}}"
        elif key == marks[1]:
            text = f"*{text}*" if fmt == "md" else f"\\underline{{{text}}}"
    return text


def _paired_text(table: Table, pr: Paired | None, fmt: str) -> str:
    if pr is None:
        return ""
    if pr.status != "done":
        return pr.status
    d = table.digits
    text = _signed(pr.mean, d) if pr.mean is not None else ""
    if pr.lo is not None and pr.hi is not None:
        text += f" [{_signed(pr.lo, d)}, {_signed(pr.hi, d)}]"
    if pr.n != table.paired_n():
        text += f" (n={pr.n})"
    significant = pr.lo is not None and pr.hi is not None and (pr.lo > 0 or pr.hi < 0)
    if fmt == "latex":
        text = _latex_escape(text)
        return f"\\textbf{{{text}}}" if significant else text
    return f"**{text}**" if significant else text


def _caption(table: Table, fmt: str) -> str:
    n = table.common_n()
    pm = "$\\pm$" if fmt == "latex" else "±"
    if n is None:
        seeds = "no finished runs"
    elif n == 1:
        seeds = "one seed per cell"
    else:
        seeds = f"mean {pm} sample std over {n} seeds"
    parts = [seeds]
    if any(c.n and c.n != n for (r, _), c in table.cells.items() if r != TEACHER):
        parts.append("(n=k): a cell with another seed count")
    if table.direction:
        bold, second = ("bold", "underlined") if fmt == "latex" else ("**bold**", "*italic*")
        better = "higher" if table.direction > 0 else "lower"
        parts.append(f"{bold}: best, {second}: second best per pair ({better} is better); avg rank: mean of the "
                     "per-pair ranks of the rows below the teacher")
    if table.reference is not None:
        delta = "$\\Delta$" if fmt == "latex" else "Δ"
        parts.append(f"paper: published last-epoch top-1 ({', '.join(table.reference_names)}); {delta} = ours - paper")
    return "; ".join(parts) + "."


def _paired_caption(table: Table, fmt: str) -> str:
    n = table.paired_n()
    seeds = f"the {n} seeds both have" if n and n > 1 else "the seeds both have"
    one = "; n=1: no interval" if any(p.n == 1 for p in table.paired.values()) else ""
    metric, vs, bold = table.metric, table.vs or "", "**bold**"
    if fmt == "latex":
        metric, vs, bold = _latex_escape(metric), _latex_row_name(vs), "bold"
    pct = "95\\%" if fmt == "latex" else "95%"
    few = "; with 3 seeds or fewer this interval is the range of the differences" if n is not None and n <= 3 else ""
    return (f"{metric}: mean paired difference (method - {vs}) over {seeds}, with a {pct} percentile "
            f"bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}){one}{few}; "
            f"{bold}: the interval excludes 0.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def render_md(table: Table, level: int = 3) -> str:
    ref = table.reference is not None
    ranked = bool(table.avg_rank)
    head = ["method"]
    for p in table.pairs:
        head += [p, "paper", "Δ"] if ref else [p]
    head += (["avg rank"] if ranked else []) + (["mean Δ"] if ref else [])
    lines = [f"{'#' * level} {table.group} — {table.metric}", "", "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    d = table.digits
    for row in table.rows:
        cells = [row]
        for p in table.pairs:
            cells.append(_cell_text(table, row, p, "md", _marks(table, p)))
            if ref:
                diff = table.diff(row, p)
                cells += [_published(table, row, p), _signed(diff, d) if diff is not None else ""]
        if ranked:
            cells.append(f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else "")
        if ref:
            md = table.mean_diff(row)
            cells.append(_signed(md, d) if md is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _caption(table, "md")]
    lines += [f"Note: {n}." for n in table.notes]
    if table.vs is not None and table.paired:
        lines += ["", f"{'#' * (level + 1)} {table.group} — {table.metric} vs {table.vs}", "",
                  "| method | " + " | ".join(table.pairs) + " |", "|---|" + "---:|" * len(table.pairs)]
        for row in table.rows:
            if not any((row, p) in table.paired for p in table.pairs):
                continue
            lines.append(f"| {row} | " + " | ".join(_paired_text(table, table.paired.get((row, p)), "md")
                                                    for p in table.pairs) + " |")
        lines += ["", _paired_caption(table, "md")]
    return "\n".join(lines)


def render_rank_md(table: Table) -> str:
    """The per-pair ranks as a Markdown table (the report shows it under the main table)."""
    if not table.ranks:
        return ""
    lines = ["| method | " + " | ".join(table.pairs) + " | avg rank |", "|---|" + "---:|" * (len(table.pairs) + 1)]
    for row in table.rows:
        if row == TEACHER:
            continue
        ranks = [f"{table.ranks[(row, p)]:g}" if (row, p) in table.ranks else "" for p in table.pairs]
        avg = f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else ""
        lines.append(f"| {row} | " + " | ".join(ranks) + f" | {avg} |")
    return "\n".join(lines)


def _latex_row_name(row: str) -> str:
    return row if row in (TEACHER, STUDENT) else _latex_escape(PAPER_NAMES.get(row, row))


def render_latex(table: Table) -> str:
    ref = table.reference is not None
    ranked = bool(table.avg_rank)
    span = 3 if ref else 1
    extra = int(ranked) + int(ref)
    ncols = 1 + span * len(table.pairs) + extra
    d = table.digits
    label = f"tab:kdbench-{_slug(table.group)}-{_slug(table.metric)}"
    caption = (f"{_latex_escape(table.metric)} on {_latex_escape(table.group)}: " + _caption(table, "latex"))
    lines = [f"% kdbench table: {table.group}, {table.metric}; needs \\usepackage{{booktabs}}",
             "\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{caption}}}", f"\\label{{{label}}}",
             "\\begin{tabular}{l" + "c" * (ncols - 1) + "}", "\\toprule"]
    tail_head = (["Avg.\\ rank"] if ranked else []) + (["Mean $\\Delta$"] if ref else [])
    for i, who in enumerate((TEACHER, STUDENT)):
        names = [_latex_escape(p.split(":")[i]) for p in table.pairs]
        cells = [f"\\multicolumn{{{span}}}{{c}}{{{n}}}" if ref else n for n in names]
        tail = tail_head if i == 1 else [""] * extra
        lines.append(" & ".join([who, *cells, *tail]) + " \\\\")
    if ref:
        rules = " ".join(f"\\cmidrule(lr){{{2 + span * k}-{1 + span * (k + 1)}}}" for k in range(len(table.pairs)))
        lines.append(rules)
        lines.append(" & ".join(["", *["Ours & Paper & $\\Delta$"] * len(table.pairs), *[""] * extra]) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        cells = [_latex_row_name(row)]
        for p in table.pairs:
            cells.append(_cell_text(table, row, p, "latex", _marks(table, p)))
            if ref:
                diff = table.diff(row, p)
                cells += [_published(table, row, p), f"${_signed(diff, d)}$" if diff is not None else ""]
        if ranked:
            cells.append(f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else "")
        if ref:
            md = table.mean_diff(row)
            cells.append(f"${_signed(md, d)}$" if md is not None else "")
        lines.append(" & ".join(cells) + " \\\\")
        if row == STUDENT:
            lines.append("\\midrule")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% note: {n}" for n in table.notes]
    lines.append("\\end{table}")
    if table.vs is not None and table.paired:
        vs_label = label + f"-vs-{_slug(table.vs)}"
        cap = _latex_escape(table.group) + ": " + _paired_caption(table, "latex")
        lines += ["", "\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{cap}}}", f"\\label{{{vs_label}}}",
                  "\\begin{tabular}{l" + "c" * len(table.pairs) + "}", "\\toprule"]
        for i, who in enumerate((TEACHER, STUDENT)):
            lines.append(" & ".join([who, *[_latex_escape(p.split(":")[i]) for p in table.pairs]]) + " \\\\")
        lines.append("\\midrule")
        for row in table.rows:
            if not any((row, p) in table.paired for p in table.pairs):
                continue
            lines.append(" & ".join([_latex_row_name(row), *[_paired_text(table, table.paired.get((row, p)), "latex")
                                                              for p in table.pairs]]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def _f(x: float | None, digits: int = 4) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def render_csv(tables: dict[str, Table]) -> str:
    """Long format: one line per (group, pair, row); reference and paired columns only when asked for."""
    ref = any(t.reference is not None for t in tables.values())
    vs = any(t.vs is not None for t in tables.values())
    head = ["group", "metric", "pair", "row", "mean", "std", "n", "failed", "status", "rank", "avg_rank"]
    head += ["paper", "diff"] if ref else []
    head += ["vs", "vs_n", "vs_mean", "vs_lo", "vs_hi"] if vs else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for table in tables.values():
        for pair in table.pairs:
            for row in table.rows:
                c = table.cell(row, pair)
                if c is None:
                    continue
                rank = table.ranks.get((row, pair))
                line = [table.group, table.metric, pair, row, _f(c.mean) if c.n else "", _f(c.std) if c.n else "",
                        c.n, c.failed, c.status, f"{rank:g}" if rank is not None else "",
                        _f(table.avg_rank.get(row))]
                if ref:
                    line += [_published(table, row, pair) if (table.reference or {}).get((row, pair)) is None
                             else _f(table.reference[(row, pair)]), _f(table.diff(row, pair))]
                if vs:
                    pr = table.paired.get((row, pair))
                    line += ["", "", "", "", ""] if pr is None else [table.vs, pr.n, _f(pr.mean), _f(pr.lo), _f(pr.hi)]
                w.writerow(line)
    return buf.getvalue()


def render(tables: dict[str, Table], fmt: str = "md", metric: str | None = None) -> str:
    """Markdown, LaTeX or CSV text of the tables (`metric` is kept for callers of the old signature)."""
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "md":
        return "\n\n".join(render_md(t) for t in tables.values()) + "\n"
    if fmt == "latex":
        return "\n\n".join(render_latex(t) for t in tables.values()) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------------------------------------- the report


def _probe_rows(root: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for path in sorted((root / "probes").glob("*.json")):
        try:
            obj = json.loads(path.read_text())
            if isinstance(obj, dict) and "top1_last" in obj:
                out.append(obj)
        except (OSError, ValueError):
            continue
    return out


def write_report(results: str | Path, out: str | Path, *, metric: str = "top1_last",
                 reference: str | list[str] | None = None, vs: str | None = None) -> Path:
    """report.md and its PNG figures in `out`, from the run JSONs of `results` alone."""
    from kdbench import __version__, plots

    store = ResultStore(results)
    if not store.runs_dir.is_dir():
        raise KdbenchError(f"no runs in {store.root} (expected {store.runs_dir}); run `kdbench run` first")
    col = collect(store)
    if col.runs.empty:
        raise KdbenchError(f"no readable runs in {store.runs_dir}")
    present = set(col.runs["method"])
    if vs is None and "kd" in present and len(present - {"ce", "kd"}) > 0:
        vs = "kd"
    tables = build_tables(col, metric, reference=reference, vs=vs)
    acc_metric = metric if metric.startswith("top") else "top1_last"
    acc_tables = tables if acc_metric == metric else build_tables(col, acc_metric)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    runs = col.runs
    counts = Counter(runs["status"])
    lines = ["# kdbench report", "",
             (f"Results folder `{store.root}`: {len(runs)} runs ({counts.get('done', 0)} done, "
              f"{counts.get('failed', 0)} failed, {counts.get('n/a', 0)} n/a), read from the run JSON alone by "
              f"kdbench {__version__}."), "",
             f"Tables show `{metric}`" + (f" beside the published numbers ({reference})" if reference else "")
             + (f", with paired differences against `{vs}`" if vs else "") + f"; figures show `{acc_metric}`. "
             "The correlation-difference maps compare a student's test-set logit correlations with its teacher's "
             "(CRD, Figure 3); a vanilla student is trained without a teacher and has none."]
    if col.problems:
        lines += ["", "Files skipped or worth a look:", ""] + [f"- {p}" for p in col.problems]
    figures: list[Path] = []
    styles = plots.styles_for(list(runs["method"].unique()))
    for group, table in tables.items():
        acc = acc_tables[group]
        slug = _slug(group)
        lines += ["", f"## {group}", "", render_md(table, level=3)]
        if table.ranks:
            lines += ["", f"### {group} — rank per pair ({table.metric})", "", render_rank_md(table)]
        gain = plots.gain_heatmap(acc, out_dir / f"gain-{slug}.png")
        scatter = plots.accuracy_vs_alignment(col, group, acc_metric, out_dir / f"alignment-{slug}.png", styles)
        for title, path in (("Gain over the vanilla student", gain), ("Accuracy vs alignment", scatter)):
            if path is not None:
                figures.append(path)
                lines += ["", f"### {title}", "", f"![{title}]({path.name})"]
        for pair in table.pairs:
            pslug = f"{slug}-{_slug(pair)}"
            tc = acc.cell(TEACHER, pair)
            made = [("Top-1 per method", plots.bar_chart(acc, pair, out_dir / f"top1-{pslug}.png", styles)),
                    ("Training curves", plots.training_curves(col, group, pair, out_dir / f"curves-{pslug}.png",
                                                              tc.mean if tc is not None and tc.n else None, styles)),
                    ("Loss terms", plots.loss_terms(col, group, pair, out_dir / f"losses-{pslug}.png", styles)),
                    ("Correlation difference", plots.corr_diff_heatmaps(col, group, pair,
                                                                        out_dir / f"corrdiff-{pslug}.png"))]
            made = [(t, p) for t, p in made if p is not None]
            if made:
                lines += ["", f"### {pair}"]
                for title, path in made:
                    figures.append(path)
                    lines += ["", f"![{title}: {pair}]({path.name})"]
    bad = runs[runs["status"] != "done"]
    if not bad.empty:
        lines += ["", "## Failed and n/a runs", "", "| group | pair | method | seed | status | reason |",
                  "|---|---|---|---:|---|---|"]
        for _, r in bad.iterrows():
            reason = str(r["reason"] or "").replace("|", "\\|")
            lines.append(f"| {r['group']} | {r['teacher'] or '-'}:{r['student']} | {r['method']} | {r['seed']} | "
                         f"{r['status']} | {reason} |")
    probes = _probe_rows(store.root)
    if probes:
        lines += ["", "## Transfer (linear probe on frozen students)", "",
                  "| pair | method | seed | dataset | protocol | top-1 last | top-1 best | paper |",
                  "|---|---|---:|---|---|---:|---:|---:|"]
        for p in probes:
            paper = p.get("published")
            lines.append(f"| {p.get('pair', '')} | {p.get('method', '')} | {p.get('seed', '')} | "
                         f"{p.get('dataset', {}).get('name', '')} | {p.get('protocol', {}).get('name', '')} | "
                         f"{p['top1_last']:.2f} | {p.get('top1_best', float('nan')):.2f} | "
                         f"{'' if paper is None else f'{paper:.1f}'} |")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


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
