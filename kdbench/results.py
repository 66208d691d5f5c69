"""The per-run JSON schema and an atomic, resumable store under one results folder.

Layout of a results folder (``ResultStore`` is the one place that names these paths):
    runs/<label>.json            one file per run (done, failed or n/a)
    weights/<label>.safetensors  the trained student of a finished run
    checkpoints/<label>.pt       the resumable state of an unfinished run (weights-only torch file)
    teachers/<label>.safetensors teacher weights, with teachers/<label>.json, the teacher card
    locks/<label>.lock           held while a process trains a run
    probes/<label>.json          linear-probe results (``kdbench probe``)
    bench/                       speed benchmarks (``kdbench bench``)
    slurm/<job id>/              submitit's logs and pickles (``--executor slurm``)
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator


from kdbench.errors import KdbenchError
from kdbench.files import atomic_write_json

SCHEMA_VERSION = 1
STATUSES = ("done", "failed", "n/a")
_REQUIRED = {"schema": int, "run_id": str, "status": str, "spec": dict, "method": dict, "metrics": dict}


def validate_run(obj: Any, name: str) -> dict[str, Any]:
    """Check a parsed run JSON; a malformed one raises KdbenchError naming the file and the problem."""
    if not isinstance(obj, dict):
        raise KdbenchError(f"{name}: not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in obj:
            raise KdbenchError(f"{name}: missing {key!r}")
        if not isinstance(obj[key], typ):
            raise KdbenchError(f"{name}: {key!r} must be {typ.__name__}")
    if obj["schema"] != SCHEMA_VERSION:
        raise KdbenchError(f"{name}: schema {obj['schema']} is not {SCHEMA_VERSION}")
    if obj["status"] not in STATUSES:
        raise KdbenchError(f"{name}: status {obj['status']!r} is not one of {', '.join(STATUSES)}")
    spec = obj["spec"]
    for key in ("student", "method", "seed", "data"):
        if key not in spec:
            raise KdbenchError(f"{name}: spec has no {key!r}")
    if obj["status"] == "done":
        for key in ("top1_last", "top1_best"):
            val = obj["metrics"].get(key)
            if not isinstance(val, (int, float)):
                raise KdbenchError(f"{name}: metrics.{key} must be a number")
    return obj


def load_run(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdbenchError(f"{path}: unreadable JSON ({exc})") from None
    return validate_run(obj, str(path))


@dataclass
class Lock:
    """An exclusive lock file (O_EXCL).

    A lock whose process is gone (same host) or that is older than `stale_s` (another host) is taken over."""

    path: Path
    stale_s: float = 6 * 3600.0

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, fh)
            return True
        return False

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text())
            pid, host, t = int(info["pid"]), info["host"], float(info["time"])
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: a writer died between create and write, or it is being written right now.
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return True
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return time.time() - t > self.stale_s

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


class ResultStore:
    """One results folder: run JSONs, checkpoints, teachers, locks."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def teachers_dir(self) -> Path:
        return self.root / "teachers"

    @property
    def probes_dir(self) -> Path:
        return self.root / "probes"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    @property
    def slurm_dir(self) -> Path:
        """submitit's folder; ``%j`` in it stands for the job id."""
        return self.root / "slurm" / "%j"

    def weights_path(self, label: str) -> Path:
        return self.root / "weights" / f"{label}.safetensors"

    def probe_path(self, label: str) -> Path:
        return self.probes_dir / f"{label}.json"

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise KdbenchError(
                f"results folder {self.root} is not writable ({exc.strerror}); pass --results DIR") from None

    def run_path(self, label: str) -> Path:
        return self.runs_dir / f"{label}.json"

    def checkpoint_path(self, label: str) -> Path:
        return self.root / "checkpoints" / f"{label}.pt"

    def lock(self, label: str) -> Lock:
        return Lock(self.root / "locks" / f"{label}.lock")

    def finished(self, label: str) -> dict[str, Any] | None:
        """The run's JSON when it is there and valid (a malformed one counts as not finished)."""
        path = self.run_path(label)
        if not path.is_file():
            return None
        try:
            return load_run(path)
        except KdbenchError:
            return None

    def write_run(self, label: str, obj: dict[str, Any]) -> Path:
        validate_run(obj, label)
        path = self.run_path(label)
        atomic_write_json(path, obj)
        return path

    def iter_runs(self) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
        """(path, run, error) for every JSON in runs/: a malformed file yields its error instead of a run."""
        if not self.runs_dir.is_dir():
            return
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                yield path, load_run(path), None
            except KdbenchError as exc:
                yield path, None, str(exc)
