"""Walls between what users hand kdbench and the file system.

Names read from a config file, the command line or a teacher card become parts of file names (a run's label is
``<dataset>__<teacher>__<student>__<method>__s<seed>__<id>``): each is checked where it is read. As a second wall,
every path kdbench writes is checked to stay inside its results folder (``check_inside``), so a name that slipped
past the first wall still cannot write elsewhere. Files read back from a results folder are read only when they
are regular files inside it, below a size cap, with integers of bounded length (``read_json``): a link to
/dev/zero, a FIFO or a crafted number is a skipped file, not a hang or a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError

NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
MAX_NAME = 100  # characters of one name (a label holds several; file names stop at 255 bytes)
MAX_SEED = 2**31 - 1  # every seeding API kdbench uses (torch, numpy) takes it
MAX_JSON_BYTES = 64 << 20  # a run JSON with every per-epoch curve is well under 1 MB
MAX_INT_DIGITS = 64  # no number kdbench writes is longer; Python refuses beyond 4300 with a ValueError


def check_name(kind: str, name: Any, where: str = "") -> str:
    """A name that becomes part of a file name: letters, digits and _ . + - only, not '.' or '..', 1 to 100
    characters. ``where`` names the file or option it came from."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise KdbenchError(f"{prefix}{kind} name must be a string, got {name!r}")
    if not NAME.match(name) or name in (".", "..") or len(name) > MAX_NAME:
        shown = name if len(name) <= MAX_NAME else name[:40] + "..."
        raise KdbenchError(
            f"{prefix}invalid {kind} name {shown!r}: use 1 to {MAX_NAME} letters, digits and _ . + - only"
        )
    return name


def check_seed(seed: Any, where: str = "seed") -> int:
    """A seed: an integer from 0 to 2**31 - 1 (it is part of file names and seeds torch and numpy)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:40] + "..."
        raise KdbenchError(f"{where} must be an integer from 0 to {MAX_SEED}, got {shown}")
    return seed


def check_bench_names(src: str, raw: dict[str, Any]) -> None:
    """The names and seeds of a parsed bench.toml that reach file names, checked before anything else of it."""
    protocols = raw.get("protocols")
    if isinstance(protocols, dict):
        for name in protocols:
            check_name("protocol", name, src)
    pairs = raw.get("pairs")
    if isinstance(pairs, dict):
        for name, table in pairs.items():
            check_name("pair set", name, src)
            if isinstance(table, dict) and "dataset" in table:
                check_name("dataset", table["dataset"], f"{src}: pairs.{name}.dataset")
    defaults = raw.get("defaults")
    if isinstance(defaults, dict):
        if isinstance(defaults.get("seeds"), list):
            for seed in defaults["seeds"]:
                check_seed(seed, f"{src}: defaults.seeds")
        if "teacher_seed" in defaults:
            check_seed(defaults["teacher_seed"], f"{src}: defaults.teacher_seed")
        if "protocol" in defaults:
            check_name("protocol", defaults["protocol"], f"{src}: defaults.protocol")
    methods = raw.get("methods")
    if isinstance(methods, dict):
        for name in methods:
            check_name("method", name, f"{src}: [methods.*]")


def check_inside(root: str | Path, path: str | Path, what: str = "file") -> Path:
    """The second wall: ``path`` must lie inside ``root`` (compared as written, after removing '..' and '.', so a
    results folder that is itself a link to another disk still works). Raises KdbenchError otherwise."""
    text = str(path)
    if "\x00" in text or "\n" in text:
        raise KdbenchError(f"refused to write {what} {text!r}: the name holds a NUL byte or a newline")
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    if target == base or not target.startswith(base.rstrip(os.sep) + os.sep):
        raise KdbenchError(f"refused to write {what} {text!r}: it lies outside the results folder {root}")
    return Path(path)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def read_json(path: str | Path, root: str | Path | None = None, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file that kdbench wrote, refusing (KdbenchError naming the file and why) what is not one: a
    path outside ``root`` (after following links), anything but a regular file (a FIFO, a device, a folder), a
    file over ``limit`` bytes, an integer over 64 digits, nesting too deep. NaN is read (the caller judges it)."""
    path = Path(path)
    try:
        try:
            real = path.resolve()
        except RuntimeError:  # a link loop (an OSError from Python 3.13 on)
            raise KdbenchError(f"{path}: a link that loops: not read") from None
        if root is not None:
            base = Path(root).resolve()
            if not real.is_relative_to(base) or real == base:
                raise KdbenchError(f"{path}: a link to {real}, outside {root}: not read")
        # O_NONBLOCK: opening a FIFO never waits for a writer; fstat then says what was opened.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KdbenchError(f"{path}: not a regular file: not read")
            if st.st_size > limit:
                raise KdbenchError(f"{path}: {st.st_size} bytes, over the {limit >> 20} MiB a results file may hold")
            data = b""
            while len(data) <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) > limit:
                raise KdbenchError(f"{path}: over the {limit >> 20} MiB a results file may hold (it grew while read)")
        finally:
            os.close(fd)
    except OSError as exc:
        raise KdbenchError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        return json.loads(data.decode("utf-8"), parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KdbenchError(f"{path}: unreadable JSON ({str(exc) or type(exc).__name__})") from None


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool (what a metric or a teacher's accuracy must be)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Teacher card fields: the allowed types (None: the field may be null). Unknown fields are left alone.
_CARD_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "dataset": (str, type(None)),
    "image_size": (int, type(None)),
    "protocol": (str, type(None)),
    "seed": (int, type(None)),
    "source": (str,),
    "run_id": (str, type(None)),
    "teacher_id": (str,),
    "weights": (str,),
    "weights_sha256": (str,),
    "data_checksum": (str, type(None)),
    "original_file": (str,),
    "original_sha256": (str,),
    "created": (int, float),
}
_CARD_NUMBERS = ("top1", "top5", "top1_best")


def check_card(card: Any, path: str | Path) -> dict[str, Any]:
    """A teacher card read back from teachers/: an object with an ``arch`` name and every known field of its type
    (accuracies finite numbers or null), else KdbenchError naming the file and the field."""
    if not isinstance(card, dict) or "arch" not in card:
        raise KdbenchError(
            f"teacher card {path} is malformed (not a teacher card); delete it and train or import again"
        )
    for key, types in _CARD_TYPES.items():
        value = card.get(key)
        if key in card and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise KdbenchError(
                f"teacher card {path}: {key} must be {names}, got {value!r}; delete it and train or import again"
            )
    for key in _CARD_NUMBERS:
        if card.get(key) is not None and not is_number(card[key]):
            raise KdbenchError(
                f"teacher card {path}: {key} must be a finite number or null, got {card[key]!r}; "
                "delete it and train or import again"
            )
    check_name("architecture", card["arch"], f"teacher card {path}")
    if card.get("seed") is not None:
        check_seed(card["seed"], f"teacher card {path}: seed")
    for key in ("dataset", "protocol"):
        if card.get(key) is not None:
            check_name(key, card[key], f"teacher card {path}")
    if "weights" in card:
        check_name("weights file", card["weights"], f"teacher card {path}")
    return card


def probe_record_ok(obj: Any) -> bool:
    """A probe result as ``kdbench probe`` writes it, as far as the report reads it: accuracies are numbers, the
    names are strings, ``published`` a number or null."""
    if not isinstance(obj, dict):
        return False
    numbers = all(is_number(obj.get(k)) for k in ("top1_last", "top1_best"))
    published = obj.get("published") is None or is_number(obj.get("published"))
    names = all(
        isinstance(obj.get(k, ""), (str, int)) and not isinstance(obj.get(k), bool) for k in ("pair", "method", "seed")
    )
    nested = all(isinstance(obj.get(k, {}), dict) for k in ("dataset", "protocol"))
    return numbers and published and names and nested


def check_run_names(spec: dict[str, Any], name: str) -> None:
    """The names a run JSON's spec gives (they become table rows and columns, and file names when rerun)."""
    check_name("student", spec.get("student"), f"{name}: spec.student")
    check_name("method", spec.get("method"), f"{name}: spec.method")
    if isinstance(spec.get("teacher"), dict):
        check_name("teacher", spec["teacher"].get("arch"), f"{name}: spec.teacher.arch")
    for key in ("data", "protocol"):
        if isinstance(spec.get(key), dict):
            check_name(key, spec[key].get("name"), f"{name}: spec.{key}.name")
