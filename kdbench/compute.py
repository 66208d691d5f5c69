"""The compute a results folder cost, measured from its runs' JSON timings (``kdbench table --compute``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.catalog import PAPER_NAMES


@dataclass
class MethodCompute:
    """One method's finished runs: their share of the wall clock and their epoch times."""

    runs: int = 0
    epochs: int = 0
    seconds: float = 0.0  # each run's share of its cohort's epochs, plus its own init stage
    member_epoch_seconds: list[float] = field(default_factory=list)  # one cohort epoch / cohort size
    devices: set[str] = field(default_factory=set)


def _share(timings: dict[str, Any]) -> tuple[float, list[float]]:
    """(seconds charged to one run, its per-epoch seconds): a cohort's epoch wall time is split evenly between its
    members (every member trains on the same batches); the init stage (AB, FT, FSP) is the run's own."""
    size = max(int(timings.get("cohort_size") or 1), 1)
    epochs = [float(s) / size for s in timings.get("epoch_seconds") or []]
    return sum(epochs) + float(timings.get("init_seconds") or 0.0), epochs


def measure(runs: list[tuple[Path, dict[str, Any]]], key: str = "method") -> dict[str, MethodCompute]:
    """``spec[key]`` (the method name, or the student architecture) -> compute of the finished runs given."""
    out: dict[str, MethodCompute] = {}
    for _path, run in runs:
        if run.get("status") != "done":
            continue
        name = str(run["spec"][key])
        timings = run.get("timings") or {}
        seconds, per_epoch = _share(timings)
        m = out.setdefault(name, MethodCompute())
        m.runs += 1
        m.epochs += len(per_epoch)
        m.seconds += seconds
        m.member_epoch_seconds.extend(per_epoch)
        env = run.get("environment") or {}
        m.devices.add(f"{env.get('device', '?')} ({env.get('device_name', '?')})")
    return out


def _teacher_runs(runs: list[tuple[Path, dict[str, Any]]], cards: list[dict[str, Any]]) -> set[str]:
    """Run ids of the vanilla runs that trained a teacher: named by the teacher cards of the folder's teachers/ and
    by the cards the students' runs carry."""
    ids = set()
    for card in [run.get("teacher") for _path, run in runs] + list(cards):
        if isinstance(card, dict) and card.get("run_id"):
            ids.add(str(card["run_id"]))
    return ids


def render_compute_md(runs: list[tuple[Path, dict[str, Any]]], teacher_cards: list[dict[str, Any]] = ()) -> str:
    """Markdown: per method the finished runs, epochs, wall-clock hours and median seconds per member-epoch; the
    teachers' training on its own line; the total."""
    teacher_ids = _teacher_runs(runs, list(teacher_cards))
    teacher_runs = [(p, r) for p, r in runs if r.get("run_id") in teacher_ids]
    student_runs = [(p, r) for p, r in runs if r.get("run_id") not in teacher_ids]
    per_method = measure(student_runs)
    per_teacher = measure(teacher_runs, key="student")
    order = list(PAPER_NAMES)
    names = sorted(per_method, key=lambda n: (order.index(n) if n in order else len(order), n))
    lines = [
        "| method | runs | epochs | wall-clock hours | median s per epoch |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, m: MethodCompute) -> str:
        med = statistics.median(m.member_epoch_seconds) if m.member_epoch_seconds else float("nan")
        return f"| {label} | {m.runs} | {m.epochs} | {m.seconds / 3600:.2f} | {med:.1f} |"

    for name in names:
        lines.append(row(name, per_method[name]))
    for name, m in per_teacher.items():
        lines.append(row(f"teacher {name}", m))
    everything = list(per_method.values()) + list(per_teacher.values())
    total = MethodCompute(
        runs=sum(m.runs for m in everything),
        epochs=sum(m.epochs for m in everything),
        seconds=sum(m.seconds for m in everything),
        member_epoch_seconds=[s for m in everything for s in m.member_epoch_seconds],
    )
    lines.append(row("**total**", total))
    devices = sorted({d for m in everything for d in m.devices})
    lines += [
        "",
        f"Measured from the runs' JSON timings (finished runs only) on {', '.join(devices) or 'no device'}. A cohort's "
        "epoch wall time is split evenly between its members; the AB/FT/FSP init stage is the run's own. Hours are "
        "wall-clock of the whole machine (every core), including any time the machine spent on other work.",
        "",
    ]
    return "\n".join(lines)
