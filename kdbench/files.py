"""Atomic file writes: readers never see half a file, and a kill leaves the old file (or none) in place."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary file name in path's folder; once the body has written it, fsync it and rename it onto
    path, so readers never see half a file. On any error (or a kill) the target is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            yield tmp
        except (OSError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # torch / safetensors report a failed write as their own error types
            error = _write_error(path, exc)
            if error is None:
                raise
            raise error from exc
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: Exception) -> OSError | None:
    """An OSError for a library's failed write (torch and safetensors raise their own types, with messages such as
    "unexpected pos" that never name the cause) when the cause is the machine: a full disk, or a file-size limit
    (ulimit -f). None when neither holds: the library's error then stands."""
    import errno
    import resource

    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full or "No space left" in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
