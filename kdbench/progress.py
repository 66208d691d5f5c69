"""Progress you can follow anywhere: one line per epoch per run, a log file beside each run's JSON, and an overall
ETA of a sweep from its measured throughput.

The training loop only calls back once per member and epoch (``train_cohort(on_epoch=...)``); everything about
what is printed where lives here.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def hms(seconds: float | None) -> str:
    """1:02:03, 4:05 or 0:07; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@functools.lru_cache(maxsize=256)
def _default_config(method: str, pair: str) -> Any:
    from kdbench.variants import pair_defaults

    return pair_defaults([(method, pair)])[(method, pair)]


def method_label(spec: Any) -> str:
    """The method as the tables name its row: 'kd' at its default setting on the pair, 'kd (temperature=2)' at
    another (a --set value or grid point), so that the members of a grid are told apart in progress lines."""
    from kdbench.variants import row_name, setting_diff

    config = getattr(spec, "method_config", None)
    if not isinstance(config, dict) or getattr(spec, "pair_set", "") == "teachers":
        return spec.method
    return row_name(spec.method, setting_diff(config, _default_config(spec.method, spec.pair)))


def run_name(spec: Any) -> str:
    """How a run is named in progress lines: 'teacher resnet20' for a teacher's own run, else 'pair method', the
    method with its setting where it is not the default ('pair kd (temperature=2)')."""
    if getattr(spec, "pair_set", "") == "teachers":
        return f"teacher {spec.student}"
    if spec.teacher is None:
        return f"{spec.student} {method_label(spec)}"
    return f"{spec.pair} {method_label(spec)}"


# ---------------------------------------------------------------------------------------------- the sweep's ETA


@dataclass
class SweepMeter:
    """Remaining work of a sweep in member-epochs, priced by measured seconds per member-epoch.

    Each architecture gets its own price (the mean wall time of its epochs, a cohort epoch split evenly over its
    members), so a long teacher and small students mix fairly; an architecture not measured yet is priced at the
    mean of those that are. Before any epoch finished the ETA is unknown."""

    remaining: dict[str, int] = field(default_factory=dict)  # label -> epochs left
    arch: dict[str, str] = field(default_factory=dict)  # label -> architecture
    seconds: dict[str, list[float]] = field(default_factory=dict)  # architecture -> seconds per member-epoch
    total_epochs: int = 0
    done_epochs: int = 0
    runs_total: int = 0
    runs_done: int = 0

    def plan(self, label: str, arch: str, epochs: int) -> None:
        if label in self.remaining:
            return
        self.remaining[label] = max(int(epochs), 0)
        self.arch[label] = arch
        self.total_epochs += self.remaining[label]
        self.runs_total += 1

    def start(self, label: str, epoch: int) -> None:
        """A run resumed at ``epoch``: its earlier epochs are not to be done again."""
        left = self.remaining.get(label)
        if left is None:
            return
        done = min(max(int(epoch), 0), left)
        if done:
            self.remaining[label] -= done
            self.done_epochs += done

    def epoch_done(self, label: str, arch: str, seconds: float) -> None:
        self.seconds.setdefault(arch, []).append(float(seconds))
        if label not in self.remaining:  # a run the plan did not know (resumed elsewhere): count it from here
            return
        if self.remaining[label] > 0:
            self.remaining[label] -= 1
            self.done_epochs += 1

    def run_done(self, label: str) -> None:
        if label in self.remaining:
            self.done_epochs += self.remaining[label]  # a failed run's epochs are not coming
            self.remaining[label] = 0
            self.runs_done += 1

    def price(self, arch: str) -> float | None:
        own = self.seconds.get(arch)
        if own:
            return statistics.fmean(own[-5:])
        known = [statistics.fmean(v[-5:]) for v in self.seconds.values() if v]
        return statistics.fmean(known) if known else None

    def eta(self) -> float | None:
        total = 0.0
        for label, left in self.remaining.items():
            if left:
                p = self.price(self.arch[label])
                if p is None:
                    return None
                total += left * p
        return total


# ---------------------------------------------------------------------------------------------- epoch lines


def epoch_line(m: Any, n_train: int, cohort_size: int, sweep_eta: float | None = None) -> str:
    """One line for one member's finished epoch: what it is, where it is, its loss terms, top-1, speed, ETAs."""
    spec = m.spec
    epochs = spec.protocol.epochs
    seconds = m.epoch_seconds[-1] if m.epoch_seconds else None
    losses = {k: v[-1] for k, v in (m.curve.get("loss") or {}).items() if v}
    terms = " ".join(
        f"{k} {v:.4f}" if v is not None else f"{k} nan"
        for k, v in sorted(losses.items(), key=lambda kv: (kv[0] == "total", kv[0]))
    )
    top1 = m.last_eval.get("top1") if m.last_eval.get("epoch") == m.epoch else None
    parts = [f"{run_name(spec)} s{spec.seed}", f"epoch {m.epoch}/{epochs}", terms or "no loss"]
    parts.append(f"top1 {top1:.2f}" if top1 is not None else "top1 -")
    if seconds:
        parts.append(f"{n_train / seconds:,.0f} img/s" + (f" (cohort of {cohort_size})" if cohort_size > 1 else ""))
        recent = m.epoch_seconds[-3:]
        parts.append(f"run ETA {hms(statistics.fmean(recent) * max(epochs - m.epoch, 0))}")
    if m.failed:
        parts.append(f"FAILED: {m.failed}")
    if sweep_eta is not None:
        parts.append(f"sweep ETA {hms(sweep_eta)}")
    return " | ".join(parts)


class RunLogs:
    """Writes every epoch line to ``runs/<label>.log`` (beside the run's JSON) and hands it to ``echo`` (stderr when
    it is not a terminal); keeps the sweep's meter and its progress-bar task up to date."""

    def __init__(
        self,
        runs_dir: Path,
        echo: Callable[[str], None] | None = None,
        meter: SweepMeter | None = None,
        progress: Any = None,
        task: Any = None,
    ):
        self.runs_dir = Path(runs_dir)
        self.echo = echo
        self.meter = meter or SweepMeter()
        self.progress = progress
        self.task = task
        self.quiet = False  # a rank other than 0 of a distributed run writes nothing

    def log_path(self, label: str) -> Path:
        from kdbench.guard import check_inside

        return check_inside(self.runs_dir, self.runs_dir / f"{label}.log", "run log")

    def write(self, label: str, line: str) -> None:
        if self.quiet:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path(label), "a", encoding="utf-8") as fh:
                fh.write(stamped + "\n")
        except OSError:  # a log is a convenience: a full disk must not stop the training
            pass
        if self.echo is not None:
            self.echo(stamped)

    def note(self, specs: Iterable[Any], text: str) -> None:
        """A line (resumed, finished, failed) into the logs of these runs."""
        for spec in specs:
            self.write(spec.label, f"{run_name(spec)} s{spec.seed} {text}")

    def cohort(self, members: list[Any], n_train: int) -> Callable[[Any], None]:
        """The on_epoch callback of one cohort."""

        def on_epoch(m: Any) -> None:
            # members that failed in an earlier epoch no longer share the epoch's time
            k = sum(1 for x in members if x.failed_epoch is None or x.failed_epoch >= m.epoch) or 1
            if m.epoch_seconds:
                self.meter.epoch_done(m.spec.label, m.spec.student, m.epoch_seconds[-1] / k)
            if m.done:
                self.meter.run_done(m.spec.label)
            self.write(m.spec.label, epoch_line(m, n_train, k, self.meter.eta()))
            self.refresh()

        return on_epoch

    def refresh(self, current: str | None = None) -> None:
        if self.progress is None or self.task is None:
            return
        mt = self.meter
        eta = mt.eta()
        text = (
            f"sweep: {mt.runs_done}/{mt.runs_total} runs, {mt.done_epochs}/{mt.total_epochs} epochs, "
            f"ETA {hms(eta) if eta is not None else 'after the first epoch'}"
        )
        from rich.markup import escape

        if current:
            text += f" — {escape(current)}"
        self.progress.update(self.task, total=max(mt.total_epochs, 1), completed=mt.done_epochs, description=text)


# ---------------------------------------------------------------------------------------------- estimates


_SPEEDS: dict[tuple[str, float], dict[tuple[str, str], list[float]]] = {}


def _measured_speeds(runs_dir: Path) -> dict[tuple[str, str], list[float]]:
    """(architecture, data identity) -> seconds per member-epoch of every finished run in ``runs_dir``."""
    import json

    from kdbench.errors import KdbenchError
    from kdbench.guard import read_json

    try:
        key = (str(runs_dir.resolve()), runs_dir.stat().st_mtime)
    except OSError:
        return {}
    if key in _SPEEDS:
        return _SPEEDS[key]
    out: dict[tuple[str, str], list[float]] = {}
    for path in sorted(runs_dir.glob("*.json")):
        try:
            r = read_json(path, runs_dir)
            t = r.get("timings") or {}
            secs = [float(x) for x in t.get("epoch_seconds") or []]
            steady = secs[1:] or secs
            if r.get("status") != "done" or not steady:
                continue
            per = statistics.fmean(steady) / max(int(t.get("cohort_size") or 1), 1)
            ident = json.dumps(r["spec"]["data"], sort_keys=True)
            out.setdefault((r["spec"]["student"], ident), []).append(per)
        except (KdbenchError, OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    _SPEEDS.clear()
    _SPEEDS[key] = out
    return out


def estimate_seconds(store: Any, arch: str, data: Any, epochs: int) -> float | None:
    """Seconds to train ``arch`` for ``epochs`` on ``data`` (a DataSpec), priced from the finished runs of the same
    architecture on the same data in ``store`` (median seconds per epoch); None when none was measured."""
    import json

    from kdbench.config import _data_dict

    got = _measured_speeds(Path(store.runs_dir)).get((arch, json.dumps(_data_dict(data), sort_keys=True)))
    return statistics.median(got) * epochs if got else None
