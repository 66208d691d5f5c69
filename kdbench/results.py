"""The per-run JSON schema and an atomic, resumable store under one results folder.

Layout of a results folder:
    runs/<label>.json            one file per run (done, failed or n/a)
    checkpoints/<label>.pt       the resumable state of an unfinished run (weights-only torch file)
    teachers/<label>.safetensors teacher weights, with teachers/<label>.json, the teacher card
    locks/<label>.lock           held while a process trains a run
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch

from kdbench.errors import KdbenchError

SCHEMA_VERSION = 1
STATUSES = ("done", "failed", "n/a")
_REQUIRED = {"schema": int, "run_id": str, "status": str, "spec": dict, "method": dict, "metrics": dict}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary file name in path's folder; once the body has written it, fsync it and rename it onto
    path, so readers never see half a file. On any error (or a kill) the target is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU model from /proc/cpuinfo (platform's description elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_device(name: str | torch.device) -> torch.device:
    """auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N; a clear error otherwise."""
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise KdbenchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdbenchError(f"device {str(name)!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return dev


def environment(device: torch.device) -> dict[str, Any]:
    import kdbench

    env: dict[str, Any] = {
        "kdbench": kdbench.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "git_commit": git_commit(),
    }
    return env


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
