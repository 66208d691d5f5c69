"""Tables from the per-run JSON alone: methods x pairs, mean +- std over seeds, teacher and vanilla-student rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kdbench.results import ResultStore

METRICS = ("top1_last", "top1_best", "top5_last", "top5_best")


@dataclass
class Collected:
    runs: pd.DataFrame
    teachers: pd.DataFrame
    problems: list[str] = field(default_factory=list)


def _group(spec: dict[str, Any]) -> str:
    data = spec["data"]
    size = f"@{data['image_size']}" if data.get("image_size") else ""
    return f"{data['name']}{size} / {spec['protocol']['name']}"


def collect(store: ResultStore) -> Collected:
    """Every run of a results folder as rows (one per run); malformed files are listed in `problems`, not fatal."""
    rows, teachers, problems = [], {}, []
    for path, run, error in store.iter_runs():
        if run is None:
            problems.append(error or str(path))
            continue
        spec = run["spec"]
        teacher = spec.get("teacher")
        row = {
            "group": _group(spec), "student": spec["student"], "teacher": teacher["arch"] if teacher else None,
            "method": spec["method"], "seed": spec["seed"], "status": run["status"], "reason": run.get("reason"),
            "run_id": run["run_id"], "file": path.name,
        }
        row.update({k: v for k, v in run["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
        card = run.get("teacher")
        if teacher and isinstance(card, dict) and card.get("top1") is not None:
            key = (row["group"], teacher["arch"], card.get("weights_sha256"))
            teachers[key] = {"group": row["group"], "teacher": teacher["arch"], "top1_last": card.get("top1"),
                             "top1_best": card.get("top1_best", card.get("top1")), "top5_last": card.get("top5"),
                             "top5_best": card.get("top5")}
    return Collected(pd.DataFrame(rows), pd.DataFrame(list(teachers.values())), problems)


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n > 1 and math.isfinite(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def build_tables(col: Collected, metric: str = "top1_last", method_order: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Per (dataset, protocol) group: a frame indexed by row label (Teacher, Student, methods) with one column per
    pair; each cell is a dict(mean, std, n, status)."""
    from kdbench.sweep import method_order as default_order

    runs = col.runs
    out: dict[str, pd.DataFrame] = {}
    if runs.empty:
        return out
    for group, g in runs.groupby("group", sort=False):
        pairs = list(dict.fromkeys(f"{t}:{s}" for t, s in zip(g["teacher"], g["student"]) if isinstance(t, str)))
        methods = [m for m in (method_order or default_order(list(g["method"].unique()))) if m != "ce"]
        cells: dict[str, dict[str, Any]] = {"Teacher": {}, "Student": {}}
        for m in methods:
            cells[m] = {}
        for pair in pairs:
            t, s = pair.split(":")
            tdf = col.teachers[(col.teachers["group"] == group) & (col.teachers["teacher"] == t)] \
                if not col.teachers.empty else pd.DataFrame()
            if not tdf.empty and metric in tdf:
                vals = tdf[metric].dropna().astype(float)
                if len(vals):
                    cells["Teacher"][pair] = _cell(vals)
            ce = g[(g["method"] == "ce") & (g["student"] == s)]
            if not ce.empty:
                cells["Student"][pair] = _status_cell(ce, metric)
            for m in methods:
                sub = g[(g["method"] == m) & (g["teacher"] == t) & (g["student"] == s)]
                if not sub.empty:
                    cells[m][pair] = _status_cell(sub, metric)
        frame = pd.DataFrame({pair: {row: cells[row].get(pair) for row in cells} for pair in pairs})
        frame = frame.loc[[r for r in cells if any(cells[r].get(p) for p in pairs)]]
        out[group] = frame
    return out


def _cell(vals: pd.Series) -> dict[str, Any]:
    n = len(vals)
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if n > 1 else float("nan"), "n": n,
            "status": "done"}


def _status_cell(sub: pd.DataFrame, metric: str) -> dict[str, Any]:
    done = sub[sub["status"] == "done"]
    if not done.empty and metric in done:
        vals = done[metric].dropna().astype(float)
        if len(vals):
            return _cell(vals)
    status = "n/a" if (sub["status"] == "n/a").all() else "failed" if (sub["status"] == "failed").any() else "?"
    return {"status": status}


def _best(frame: pd.DataFrame, pair: str) -> float | None:
    means = [c["mean"] for row, c in frame[pair].items() if row != "Teacher" and isinstance(c, dict) and "mean" in c]
    return max(means) if means else None


def render(tables: dict[str, pd.DataFrame], fmt: str = "md", metric: str = "top1_last") -> str:
    """Markdown, LaTeX or CSV text of the tables; the best method per column is marked (bold)."""
    if fmt == "csv":
        lines = ["group,pair,row,mean,std,n,status"]
        for group, frame in tables.items():
            for pair in frame.columns:
                for row, c in frame[pair].items():
                    if isinstance(c, dict):
                        std = c.get("std", float("nan"))
                        lines.append(",".join([group, pair, row, f"{c['mean']:.4f}" if "mean" in c else "",
                                               f"{std:.4f}" if "mean" in c and math.isfinite(std) else "",
                                               str(c.get("n", "")), c["status"]]))
        return "\n".join(lines) + "\n"
    parts = []
    for group, frame in tables.items():
        pairs = list(frame.columns)
        best = {p: _best(frame, p) for p in pairs}
        rows = []
        for row, series in frame.iterrows():
            cells = []
            for p in pairs:
                c = series[p]
                if not isinstance(c, dict):
                    cells.append("")
                elif "mean" not in c:
                    cells.append(c["status"])
                else:
                    text = _fmt(c["mean"], c["std"], c["n"])
                    is_best = row != "Teacher" and best[p] is not None and abs(c["mean"] - best[p]) < 1e-9
                    if is_best:
                        text = f"**{text}**" if fmt == "md" else f"\\textbf{{{text}}}"
                    cells.append(text.replace("±", "$\\pm$") if fmt == "latex" else text)
            rows.append((row, cells))
        if fmt == "md":
            head = f"### {group} — {metric}\n\n| method | " + " | ".join(pairs) + " |\n|---|" + "---|" * len(pairs)
            body = "\n".join(f"| {r} | " + " | ".join(c) + " |" for r, c in rows)
            parts.append(head + "\n" + body)
        elif fmt == "latex":
            esc = [p.replace("_", "\\_") for p in pairs]
            lines = [f"% {group} -- {metric}", "\\begin{tabular}{l" + "c" * len(pairs) + "}", "\\toprule",
                     "Method & " + " & ".join(esc) + " \\\\", "\\midrule"]
            lines += [f"{r.replace('_', chr(92) + '_')} & " + " & ".join(c) + " \\\\" for r, c in rows]
            lines += ["\\bottomrule", "\\end{tabular}"]
            parts.append("\n".join(lines))
        else:
            raise ValueError(fmt)
    return "\n\n".join(parts) + "\n"
