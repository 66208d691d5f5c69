"""The compute a results folder cost, measured from its runs' JSON timings (``kdbench table --compute``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.catalog import PAPER_NAMES
from kdbench.results import card_run_id


@dataclass
class MethodCompute:
    """Runs of one method (or one teacher architecture): their share of the wall clock and their epoch times."""

    runs: int = 0
    epochs: int = 0
    seconds: float = 0.0  # each run's share of its cohort's epochs, plus its own init stage
    member_epoch_seconds: list[float] = field(default_factory=list)  # one cohort epoch / members training in it
    devices: set[str] = field(default_factory=set)


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return float(v) if ok else None


def share(timings: Any) -> tuple[float, list[float]]:
    """(seconds charged to one run, its per-epoch seconds) from a run's ``timings``.

    A cohort's epoch wall time is split evenly between the members that trained in that epoch
    (``epoch_cohort_sizes``; runs written before it was recorded fall back to ``cohort_size``, the members the
    cohort started with, for the epochs it does not cover); the init stage (AB, FT, FSP) is the run's own.
    Raises ValueError when the timings are not what kdbench writes."""
    if not isinstance(timings, dict):
        raise ValueError("timings is not an object")
    epochs = timings.get("epoch_seconds")
    if not isinstance(epochs, list) or any(_number(s) is None for s in epochs):
        raise ValueError("timings.epoch_seconds is not a list of non-negative numbers")
    size = timings.get("cohort_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError("timings.cohort_size is not a positive integer")
    sizes = timings.get("epoch_cohort_sizes") or []
    if not isinstance(sizes, list) or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in sizes):
        raise ValueError("timings.epoch_cohort_sizes is not a list of positive integers")
    if len(sizes) > len(epochs):
        raise ValueError("timings.epoch_cohort_sizes is longer than timings.epoch_seconds")
    sizes = [size] * (len(epochs) - len(sizes)) + sizes  # a run resumed from a checkpoint of older code
    init = _number(timings.get("init_seconds", 0.0) or 0.0)
    if init is None:
        raise ValueError("timings.init_seconds is not a non-negative number")
    per_epoch = [float(s) / k for s, k in zip(epochs, sizes)]
    return sum(per_epoch) + init, per_epoch


def _device(run: dict[str, Any]) -> str | None:
    env = run.get("environment")
    if not isinstance(env, dict) or not env.get("device"):
        return None
    return f"{env['device']} ({env['device_name']})" if env.get("device_name") else str(env["device"])


@dataclass
class Measured:
    per_method: dict[str, MethodCompute]
    per_teacher: dict[str, MethodCompute]
    failed: MethodCompute
    skipped: list[str]  # why a run was left out


def measure(runs: Sequence[tuple[Path, dict[str, Any]]], teacher_run_ids: set[str] = frozenset()) -> Measured:
    """The folder's compute: finished runs by method, the teachers' own training runs by architecture, failed runs
    together (their time was spent too); runs whose timings are unreadable are listed in ``skipped``."""
    out = Measured({}, {}, MethodCompute(), [])
    for path, run in runs:
        status = run.get("status")
        if status not in ("done", "failed"):
            continue
        try:
            seconds, per_epoch = share(run.get("timings"))
            spec = run["spec"]
            name = str(spec["student"] if run.get("run_id") in teacher_run_ids else spec["method"])
        except (ValueError, KeyError, TypeError) as exc:
            out.skipped.append(f"{path.name}: {exc}")
            continue
        if status == "failed":
            m = out.failed
        else:
            m = (out.per_teacher if run.get("run_id") in teacher_run_ids else out.per_method).setdefault(
                name, MethodCompute()
            )
        m.runs += 1
        m.epochs += len(per_epoch)
        m.seconds += seconds
        m.member_epoch_seconds.extend(per_epoch)
        device = _device(run)
        if device:
            m.devices.add(device)
    return out


def teacher_run_ids(runs: Sequence[tuple[Path, dict[str, Any]]], card_run_ids: set[str] = frozenset()) -> set[str]:
    """Run ids of the vanilla runs that trained a teacher: those of the teachers/ cards and of the cards the
    students' runs carry."""
    return set(card_run_ids) | {i for _path, run in runs if (i := card_run_id(run.get("teacher")))}


def render_compute_md(runs: Sequence[tuple[Path, dict[str, Any]]], card_run_ids: set[str] = frozenset()) -> str:
    """Markdown: per method the finished runs, epochs, wall-clock hours and median seconds per member-epoch; the
    teachers' training and the failed runs on lines of their own; the total."""
    got = measure(runs, teacher_run_ids(runs, card_run_ids))
    order = list(PAPER_NAMES)
    names = sorted(got.per_method, key=lambda n: (order.index(n) if n in order else len(order), n))
    lines = [
        "| runs of | runs | epochs | wall-clock hours | median s per epoch |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, m: MethodCompute, median: bool = True) -> str:
        med = f"{statistics.median(m.member_epoch_seconds):.1f}" if median and m.member_epoch_seconds else ""
        return f"| {label} | {m.runs} | {m.epochs} | {m.seconds / 3600:.2f} | {med} |"

    for name in names:
        lines.append(row(name, got.per_method[name]))
    for name, m in sorted(got.per_teacher.items()):
        lines.append(row(f"teacher {name}", m))
    if got.failed.runs:
        lines.append(row("failed runs", got.failed))
    everything = [*got.per_method.values(), *got.per_teacher.values(), got.failed]
    total = MethodCompute(
        runs=sum(m.runs for m in everything),
        epochs=sum(m.epochs for m in everything),
        seconds=sum(m.seconds for m in everything),
    )
    lines.append(row("**total**", total, median=False))
    devices = sorted({d for m in everything for d in m.devices})
    where = ", ".join(devices) if devices else "an unrecorded device"
    lines += [
        "",
        f"Measured from the runs' JSON timings on {where}. A cohort's epoch wall time is split evenly between the "
        "members that trained in it; the AB/FT/FSP init stage is the run's own. Hours are wall-clock time of the "
        "machine, including any time it spent on other work; the median epoch is the steadier figure.",
        "",
    ]
    if got.skipped:
        lines += [f"Left out ({len(got.skipped)}, timings unreadable): " + "; ".join(got.skipped), ""]
    return "\n".join(lines)
