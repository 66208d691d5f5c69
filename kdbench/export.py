"""Tidy (long) CSV of the per-epoch curves of a results folder, for plotting in one's own tools."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

LONG_COLUMNS = [
    "group",
    "data",
    "teacher",
    "student",
    "method",
    "seed",
    "run_id",
    "status",
    "epoch",
    "quantity",
    "value",
]


def duplicate_line(run_id: str, first: Any, again: Any) -> str:
    """The one warning of a run id found in two files (a copy): the second is left out."""
    return f"run id {run_id} is in both {first} and {again}: counted once (from {first.name}); remove the copy"


def curve_problem(curve: Any) -> str | None:
    """Why a run's ``curve`` is not what kdbench writes (None when it is, or when there is none): lists of numbers
    or nulls under epoch, lr, eval_epoch, test_top1, test_top5, init_loss, and an object of such lists under loss."""
    if curve is None:
        return None
    if not isinstance(curve, dict):
        return f"curve is {type(curve).__name__}, not an object"

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v
        )

    for key in ("epoch", "lr", "eval_epoch", "test_top1", "test_top5", "init_loss"):
        if curve.get(key) is not None and not numbers(curve[key]):
            return f"curve.{key} is not a list of numbers"
    loss = curve.get("loss")
    if loss is not None and (not isinstance(loss, dict) or not all(numbers(v) for v in loss.values())):
        return "curve.loss is not an object of lists of numbers"
    return None


def without_curves(col: Any) -> list[str]:
    """The files of the runs that --long leaves out because they hold no usable curve (n/a runs never have one)."""
    if col.runs.empty:
        return []
    rows = col.runs[col.runs["status"] != "n/a"]
    return [f"{col.paths[r]}: no curve (left out of --long)" for r in rows["run_id"] if not col.curves.get(r)]


def _rows(curve: dict[str, Any]) -> list[tuple[int, str, float]]:
    """(epoch, quantity, value) of one run's curve: lr, loss_<term>, test_top1, test_top5, init_loss."""
    out: list[tuple[int, str, float]] = []
    epochs = list(curve.get("epoch") or [])
    for e, v in zip(epochs, curve.get("lr") or []):
        out.append((e, "lr", v))
    for term, values in sorted((curve.get("loss") or {}).items()):
        out += [(e, f"loss_{term}", v) for e, v in zip(epochs, values)]
    evals = list(curve.get("eval_epoch") or [])
    for key in ("test_top1", "test_top5"):
        out += [(e, key, v) for e, v in zip(evals, curve.get(key) or [])]
    # init-stage epochs (AB, FT, FSP) are numbered before the main stage: -k .. -1
    init = list(curve.get("init_loss") or [])
    out += [(i - len(init), "init_loss", v) for i, v in enumerate(init)]
    return out


def curves_long_csv(col: Any) -> str:
    """One row per (run, epoch, quantity): the layout pandas/seaborn, R/ggplot2 and spreadsheets pivot from.

    A value that was not finite (a diverged loss) is left empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LONG_COLUMNS)
    runs = col.runs
    if runs.empty:
        return buf.getvalue()
    for r in runs.sort_values(["group", "teacher", "student", "method", "seed"], na_position="first").itertuples():
        curve = col.curves.get(r.run_id)
        if not curve:
            continue
        meta = [
            r.group,
            r.data,
            r.teacher if isinstance(r.teacher, str) else "",
            r.student,
            r.method,
            r.seed,
            r.run_id,
            r.status,
        ]
        for epoch, quantity, value in _rows(curve):
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            w.writerow(meta + [epoch, quantity, repr(float(value)) if ok else ""])
    return buf.getvalue()
