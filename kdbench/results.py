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

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.files import atomic_write_json
from kdbench.guard import check_card, check_inside, check_run_names, read_json

SCHEMA_VERSION = 1
STATUSES = ("done", "failed", "n/a")
_REQUIRED = {"schema": int, "run_id": str, "status": str, "spec": dict, "method": dict, "metrics": dict}
_SPEC_TYPES: dict[str, Any] = {
    "student": str,
    "method": str,
    "seed": int,
    "data": dict,
    "protocol": dict,
    "teacher": (dict, type(None)),
}


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
    for key, typ in _SPEC_TYPES.items():
        if key not in spec:
            raise KdbenchError(f"{name}: spec has no {key!r}")
        if not isinstance(spec[key], typ) or (typ is int and isinstance(spec[key], bool)):
            raise KdbenchError(f"{name}: spec.{key} must be {_type_words(typ)}, got {type(spec[key]).__name__}")
    if not isinstance(spec["data"].get("name"), str):
        raise KdbenchError(f"{name}: spec.data.name must be a string")
    if not isinstance(spec["protocol"].get("name"), str):
        raise KdbenchError(f"{name}: spec.protocol.name must be a string")
    if spec["teacher"] is not None and not isinstance(spec["teacher"].get("arch"), str):
        raise KdbenchError(f"{name}: spec.teacher.arch must be a string")
    check_run_names(spec, name)
    if obj.get("teacher") is not None:  # the teacher's card (its accuracy is the Teacher row), or null
        if not isinstance(obj["teacher"], dict):
            raise KdbenchError(f"{name}: 'teacher' must be an object or null, got {type(obj['teacher']).__name__}")
        check_card(obj["teacher"], f"in {name}")
    if obj["status"] == "done":
        for key in ("top1_last", "top1_best"):
            val = obj["metrics"].get(key)
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
                raise KdbenchError(f"{name}: metrics.{key} must be a finite number, got {val!r}")
            if not 0 <= val <= 100:  # a percentage
                raise KdbenchError(f"{name}: metrics.{key} must be a percentage in [0, 100], got {val!r}")
    return obj


def _type_words(typ: Any) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join({dict: "an object", str: "a string", int: "an integer", type(None): "null"}[t] for t in types)


def without_non_finite(obj: Any, path: str = "", found: list[str] | None = None) -> Any:
    """A copy of obj where every NaN or infinite float is None (JSON has no such numbers); their paths go to found."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(path or ".")
        return None
    if isinstance(obj, dict):
        return {k: without_non_finite(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_non_finite(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def load_run(path: Path, root: Path | None = None) -> dict[str, Any]:
    """A run JSON, read with a size cap and only when it is a regular file (inside ``root`` when given)."""
    return validate_run(read_json(path, root), str(path))


class Lock:
    """An exclusive, non-blocking lock on one run (or teacher), correct when many processes race for it.

    The lock is an advisory ``fcntl.flock`` on ``path``, held by the live process: the kernel (or, on NFS, the
    server) releases it when the process dies, however it dies, so a dead owner's lock is free at once and a
    reused PID cannot keep it. The file itself only says who holds it (pid, host, time; the time is refreshed
    every ``heartbeat_s``). Release unlinks the file while still holding the lock, and a process that locked a file
    that was unlinked meanwhile retries on the current one, so two processes never both own it.

    On a file system without flock (Lustre mounted ``noflock``: ENOSYS), or with ``KDBENCH_LOCKS=file`` (for a
    flock that is local to each node: Lustre ``localflock``, NFS ``local_lock``), it uses an ``O_EXCL`` lock file
    instead, whose owner refreshes it every ``heartbeat_s``; it is taken over when its process is gone (same host) or
    its heartbeat is older than ``stale_s`` (any host)."""

    def __init__(self, path: Path, stale_s: float = 600.0, heartbeat_s: float = 30.0):
        self.path = Path(path)
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.mode: str | None = None  # "flock" or "file" while held
        self._fd: int | None = None
        self._info = b""
        self._stop: Any = None

    def acquire(self) -> bool:
        import errno
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if os.environ.get("KDBENCH_LOCKS", "flock") == "file":  # flock is node-local here (Lustre localflock)
            return self._acquire_file()
        for _ in range(10):
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                if created:  # no flock here, and this process made the file exclusively: a lock file it owns
                    self._hold(fd, "file")
                    return True
                os.close(fd)
                return self._acquire_file()
            try:  # the owner before us may have released (unlinked) the file between our open and our flock
                st, cur = os.fstat(fd), os.stat(self.path)
                current = (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            self._hold(fd, "flock")
            return True
        return False

    def _acquire_file(self) -> bool:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                try:
                    seen = self.path.read_bytes()
                except FileNotFoundError:
                    continue
                if not self._stale(seen) or not self._take_over(seen):
                    return False
                continue
            self._hold(fd, "file")
            return True
        return False

    def _take_over(self, seen: bytes) -> bool:
        """Remove the stale lock file whose content is `seen`, under a guard file that one process at a time can
        create, so that no process ever removes a lock another process has just taken. A guard left by a process
        killed inside these few lines is abandoned after 30 s."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 30:
                    guard.unlink()
            return False
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.read_bytes() == seen:  # still the stale one (a fresh lock holds another nonce)
                    self.path.unlink()
            return True
        finally:
            os.close(gfd)
            guard.unlink(missing_ok=True)

    def _hold(self, fd: int, mode: str) -> None:
        import threading

        self._fd, self.mode = fd, mode
        self._nonce = os.urandom(8).hex()
        self._write_info()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop, fd), daemon=True, name=f"lock {self.path.name}").start()

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "nonce": self._nonce}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _beat(self, stop: Any, fd: int) -> None:
        """The heartbeat: the owner refreshes the lock's time while it lives (what other hosts judge it by)."""
        while not stop.wait(self.heartbeat_s):
            try:
                if self._fd == fd:
                    self._write_info()
            except OSError:
                pass

    def _stale(self, seen: bytes) -> bool:
        try:
            info = json.loads(seen)
            pid, host, t = int(info["pid"]), info["host"], float(info["time"])
        except (ValueError, KeyError, TypeError):
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
                pass
        return time.time() - t > self.stale_s

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._stop is not None:
            self._stop.set()
        fd, self._fd = self._fd, None
        try:
            if self.mode == "flock" or self._nonce.encode() in self.path.read_bytes():
                self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
            self.mode = None


def card_run_id(card: Any) -> str | None:
    """The run id a teacher card names (the vanilla run that trained the teacher), or None."""
    return str(card["run_id"]) if isinstance(card, dict) and card.get("run_id") else None


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

    def own(self, path: Path, what: str = "file") -> Path:
        """The second wall: a path this store writes, refused unless it lies inside the results folder."""
        return check_inside(self.root, path, what)

    def check_layout(self) -> None:
        """The folder and its sub-folders are folders where they exist (checked before any work, dry run too)."""
        for folder in (self.root, self.runs_dir, self.teachers_dir, self.root / "weights", self.root / "checkpoints"):
            if folder.exists() and not folder.is_dir():
                raise KdbenchError(f"{folder} should be a folder but is a file: remove it or pass another --results")
        locks = self.root / "locks"
        if locks.exists() and not locks.is_dir():
            raise KdbenchError(f"{locks} should be a folder but is a file: remove it or pass another --results")

    def weights_path(self, label: str) -> Path:
        return self.own(self.root / "weights" / f"{label}.safetensors", "weights")

    def probe_path(self, label: str) -> Path:
        return self.own(self.probes_dir / f"{label}.json", "probe result")

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise KdbenchError(
                f"results folder {self.root} is not writable ({exc.strerror}); pass --results DIR"
            ) from None

    def inside(self, rel: Any, what: str) -> Path:
        """A path read from a results file (relative to the folder), refused unless it resolves inside the folder:
        a hand-edited or foreign JSON must not make kdbench read, or ask the user to delete, any other file."""
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise KdbenchError(f"{what} {rel!r} is not a path inside the results folder {self.root}")
        root = self.root.resolve()
        path = (root / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(root) or path == root:
            raise KdbenchError(f"{what} {rel!r} points outside the results folder {self.root}: refused")
        return path

    def run_path(self, label: str) -> Path:
        return self.own(self.runs_dir / f"{label}.json", "run JSON")

    def checkpoint_path(self, label: str) -> Path:
        return self.own(self.root / "checkpoints" / f"{label}.pt", "checkpoint")

    def lock(self, label: str) -> Lock:
        return Lock(self.own(self.root / "locks" / f"{label}.lock", "lock"))

    def finished(self, label: str) -> dict[str, Any] | None:
        """The run's JSON when it is there and valid (a malformed one counts as not finished)."""
        path = self.run_path(label)
        if not path.is_file():
            return None
        try:
            return load_run(path, self.runs_dir)
        except KdbenchError:
            return None

    def write_run(self, label: str, obj: dict[str, Any]) -> Path:
        """Validate and write a run JSON atomically. NaN and infinities (which JSON cannot hold) are written as null
        and listed under "non_finite", so a failed run's record can always be written."""
        found: list[str] = []
        obj = without_non_finite(obj, found=found)
        if found:
            obj["non_finite"] = found
        validate_run(obj, label)
        path = self.run_path(label)
        atomic_write_json(path, obj)
        return path

    def teacher_run_ids(self) -> set[str]:
        """Run ids named by the teacher cards in teachers/ (the vanilla runs that trained those teachers)."""
        ids = set()
        folder = self.teachers_dir
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                run_id = card_run_id(read_json(path, self.teachers_dir))
            except KdbenchError:
                continue
            if run_id:
                ids.add(run_id)
        return ids

    def iter_runs(self) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
        """(path, run, error) for every JSON in runs/: a malformed file yields its error instead of a run. Files
        named as kdbench names them (ending in their run id) come first, so a copy under another name is the one a
        reader that counts each run id once leaves out."""
        if not self.runs_dir.is_dir():
            return
        found: list[tuple[Path, dict[str, Any] | None, str | None]] = []
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                found.append((path, load_run(path, self.runs_dir), None))
            except KdbenchError as exc:
                found.append((path, None, str(exc)))
        own = [e for e in found if e[1] is not None and e[0].stem.endswith(f"__{e[1]['run_id']}")]
        mine = {id(e) for e in own}
        yield from own + [e for e in found if id(e) not in mine]
