"""bench.toml -> frozen dataclasses -> one RunSpec per (pair, method, seed).

Every problem with the file or with an override is a KdbenchError naming the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.guard import check_bench_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The one bench.toml: package data of kdbench (in a wheel and in an editable install alike); the checkout's
# top-level bench.toml is a link to it.
PACKAGED_CONFIG = Path(__file__).with_name("bench.toml")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PRECISIONS = ("fp32", "bf16")  # fp32: no autocast; bf16: the networks' forward under torch.autocast(bfloat16)


@dataclass(frozen=True)
class Protocol:
    """An optimisation recipe (the CRD protocol and its compressions)."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    lr_small: float
    small_lr_students: tuple[str, ...]
    momentum: float
    weight_decay: float
    milestones: tuple[int, ...]
    lr_decay: float
    init_epochs: int
    eval_every: int = 1
    drop_last: bool = False

    def base_lr(self, student_arch: str) -> float:
        return self.lr_small if student_arch in self.small_lr_students else self.lr

    def lr_at(self, base_lr: float, epoch: int) -> float:
        """Step decay: x lr_decay after each milestone (epochs count from 0; milestone m means 'after m epochs')."""
        return base_lr * self.lr_decay ** sum(epoch >= m for m in self.milestones)


@dataclass(frozen=True)
class DataSpec:
    name: str
    data_root: str | None = None
    image_size: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class PairSet:
    name: str
    data: DataSpec
    pairs: tuple[str, ...]
    protocol: str | None = None
    teacher_protocol: str | None = None  # the teachers' own protocol (default: the students')


@dataclass(frozen=True)
class Bench:
    protocols: dict[str, Protocol]
    pair_sets: dict[str, PairSet]
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    protocol: str
    results: str
    teacher_seed: int
    source: str = ""
    slurm: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherSpec:
    arch: str
    data: DataSpec
    protocol: Protocol
    seed: int
    imported: str | None = None  # sha256 of an imported teacher's weights; then protocol and seed do not apply

    def to_dict(self) -> dict[str, Any]:
        if self.imported:
            return {"arch": self.arch, "data": _data_dict(self.data), "imported": self.imported}
        return {
            "arch": self.arch,
            "data": _data_dict(self.data),
            "protocol": dataclasses.asdict(self.protocol),
            "seed": self.seed,
        }

    @property
    def teacher_id(self) -> str:
        return spec_hash(self.to_dict())

    @property
    def label(self) -> str:
        if self.imported:
            return f"{self.data.name}-{self.data.image_size or 'native'}__{self.arch}__imported"
        return f"{self.data.name}__{self.arch}__{self.protocol.name}__s{self.seed}__{self.teacher_id}"


@dataclass(frozen=True)
class RunSpec:
    """One run: a student trained with a method (or alone) on a dataset, under a protocol, with a seed."""

    student: str
    method: str
    method_config: dict[str, Any]
    seed: int
    protocol: Protocol
    data: DataSpec
    teacher: TeacherSpec | None
    pair_set: str = field(default="", compare=False)
    # Where each method setting came from (kdbench.pair_settings.SettingsOrigin): recorded in the run JSON, not part
    # of the run id (the resolved values in method_config are).
    settings: Any = field(default=None, compare=False, repr=False)
    # Numerics of the step: they change the numbers, so they are part of the run's identity, but only when set away
    # from their defaults (the ids of runs trained before these settings existed stay the same).
    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise KdbenchError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")

    @property
    def pair(self) -> str:
        return f"{self.teacher.arch if self.teacher else '-'}:{self.student}"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "student": self.student,
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "method": self.method,
            "method_config": self.method_config,
            "seed": self.seed,
            "protocol": dataclasses.asdict(self.protocol),
            "data": _data_dict(self.data),
        }
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.channels_last:
            out["channels_last"] = True
        return out

    @property
    def run_id(self) -> str:
        return spec_hash(self.to_dict())

    @property
    def label(self) -> str:
        t = self.teacher.arch if self.teacher else "none"
        return f"{self.data.name}__{t}__{self.student}__{self.method}__s{self.seed}__{self.run_id}"

    @property
    def cohort_key(self) -> tuple:
        """Runs with the same key see the same data stream and the same teacher outputs: they can train side by side
        (the teacher's forward runs once per batch, so the members also share its precision and memory layout)."""
        return (self.data, self.teacher, self.seed, self.protocol, self.precision, self.channels_last)


def group_cohorts(specs: list[RunSpec], cohort: bool = True) -> list[list[RunSpec]]:
    """The runs as they train: one list per cohort key, in order of first appearance (with ``cohort=False``, each
    run alone, still ordered cohort by cohort). The one grouping of the local and the SLURM executors."""
    groups: dict[tuple, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(s.cohort_key, []).append(s)
    if cohort:
        return list(groups.values())
    return [[s] for g in groups.values() for s in g]


def _data_dict(d: DataSpec) -> dict[str, Any]:
    # data_root is where the files are, not what they are: it is left out of the identity (the data checksum
    # in the teacher card and the run JSON says what was read).
    return {"name": d.name, "image_size": d.image_size, "options": dict(d.options)}


def spec_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading

_PROTOCOL_TYPES: dict[str, type | tuple] = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "lr_small": float,
    "small_lr_students": list,
    "momentum": float,
    "weight_decay": float,
    "milestones": list,
    "lr_decay": float,
    "init_epochs": int,
    "eval_every": int,
    "drop_last": bool,
}
_REQUIRED_PROTOCOL = set(_PROTOCOL_TYPES) - {"eval_every", "drop_last"}
_TOP_KEYS = {"defaults", "protocols", "pairs", "methods", "slurm"}
_DEFAULT_KEYS = {"protocol": str, "seeds": list, "results": str, "teacher_seed": int}
_PAIRSET_KEYS = {
    "dataset": str,
    "pairs": list,
    "protocol": str,
    "teacher_protocol": str,
    "image_size": int,
    "data_root": str,
    "dataset_options": dict,
}


def _bad(src: str, msg: str) -> KdbenchError:
    return KdbenchError(f"{src}: {msg}")


def _check_keys(src: str, where: str, table: Any, allowed: dict[str, Any] | set[str]) -> None:
    if not isinstance(table, dict):
        raise _bad(src, f"[{where}] must be a table")
    for key in table:
        if key not in allowed:
            raise _bad(src, f"unknown key {where}.{key}; valid: {', '.join(sorted(allowed))}")


def _typed(src: str, where: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool):
        raise _bad(src, f"{where} must be an integer, got {value!r}")
    if not isinstance(value, typ):
        raise _bad(src, f"{where} must be {typ.__name__}, got {value!r}")
    return value


def _protocol(src: str, name: str, raw: dict[str, Any]) -> Protocol:
    _check_keys(src, f"protocols.{name}", raw, _PROTOCOL_TYPES)
    missing = _REQUIRED_PROTOCOL - set(raw)
    if missing:
        raise _bad(src, f"protocols.{name} is missing {', '.join(sorted(missing))}")
    vals = {k: _typed(src, f"protocols.{name}.{k}", v, _PROTOCOL_TYPES[k]) for k, v in raw.items()}
    for k, v in vals.items():  # nan, inf and overflowing literals (1e400) pass every comparison below
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(src, f"protocols.{name}.{k} must be a finite number, got {v!r}")
    for k in ("epochs", "batch_size", "eval_every"):
        if k in vals and vals[k] < 1:
            raise _bad(src, f"protocols.{name}.{k} must be >= 1, got {vals[k]}")
    if vals["init_epochs"] < 0:
        raise _bad(src, f"protocols.{name}.init_epochs must be >= 0, got {vals['init_epochs']}")
    for k in ("lr", "lr_small"):
        if vals[k] <= 0:
            raise _bad(src, f"protocols.{name}.{k} must be > 0, got {vals[k]}")
    for k, ok, words in (
        ("weight_decay", vals["weight_decay"] >= 0, ">= 0"),
        ("momentum", 0 <= vals["momentum"] < 1, "in [0, 1)"),
        ("lr_decay", 0 < vals["lr_decay"] <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise _bad(src, f"protocols.{name}.{k} must be {words}, got {vals[k]!r}")
    ms = vals["milestones"]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in ms) or list(ms) != sorted(ms):
        raise _bad(src, f"protocols.{name}.milestones must be increasing positive integers, got {ms}")
    if not all(isinstance(s, str) for s in vals["small_lr_students"]):
        raise _bad(src, f"protocols.{name}.small_lr_students must be a list of model names")
    vals["milestones"] = tuple(ms)
    vals["small_lr_students"] = tuple(vals["small_lr_students"])
    return Protocol(name=name, **vals)


@dataclass(frozen=True)
class SlurmSettings:
    """Resources of each array task (bench.toml [slurm], overridden by --slurm-* options)."""

    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: int | None = None
    array_parallelism: int = 64
    cluster: str = "slurm"  # submitit's cluster: slurm, or local / debug to test without a cluster
    # One run on several GPUs (DDP): nodes per array task and processes (one per GPU) per node. With 1 and 1, each
    # task trains its cohort on one device as before.
    nodes: int = 1
    tasks_per_node: int = 1

    @property
    def distributed(self) -> bool:
        return self.nodes * self.tasks_per_node > 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any], src: str = "bench.toml") -> SlurmSettings:
        types = {
            "partition": str,
            "time_min": int,
            "gpus_per_task": int,
            "cpus_per_task": int,
            "mem_gb": int,
            "array_parallelism": int,
            "cluster": str,
            "nodes": int,
            "tasks_per_node": int,
        }
        for key, value in raw.items():
            if key not in types:
                raise KdbenchError(f"{src}: unknown key slurm.{key}; valid: {', '.join(sorted(types))}")
            if not isinstance(value, types[key]) or isinstance(value, bool):
                raise KdbenchError(f"{src}: slurm.{key} must be {types[key].__name__}, got {value!r}")
            if types[key] is int and value < (0 if key == "gpus_per_task" else 1):
                raise KdbenchError(f"{src}: slurm.{key} must be positive, got {value}")
        if raw.get("cluster", "slurm") not in ("slurm", "local", "debug"):
            raise KdbenchError(f"{src}: slurm.cluster must be slurm, local or debug")
        return cls(**raw)

    def with_overrides(self, **kw: Any) -> SlurmSettings:
        names = {f.name for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None and k in names})


def parse_bench(raw: dict[str, Any], src: str = "bench.toml", base_dir: Path | None = None) -> Bench:
    """Validate a parsed bench.toml and build the Bench. Relative data_root paths are resolved from base_dir."""
    _check_keys(src, "top level", raw, _TOP_KEYS)
    check_bench_names(src, raw)  # names that become file names, and seeds, before anything else
    defaults = raw.get("defaults", {})
    _check_keys(src, "defaults", defaults, _DEFAULT_KEYS)
    for k, v in defaults.items():
        _typed(src, f"defaults.{k}", v, _DEFAULT_KEYS[k])
    seeds = defaults.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _bad(src, f"defaults.seeds must be a non-empty list of non-negative integers, got {seeds!r}")

    protocols_raw = raw.get("protocols", {})
    _check_keys(src, "protocols", protocols_raw, set(protocols_raw))
    protocols = {n: _protocol(src, n, p) for n, p in protocols_raw.items()}
    if not protocols:
        raise _bad(src, "no [protocols.*] defined")
    protocol = defaults.get("protocol", next(iter(protocols)))
    if protocol not in protocols:
        raise _bad(src, f"defaults.protocol {protocol!r} is not defined; protocols: {', '.join(protocols)}")

    pair_sets: dict[str, PairSet] = {}
    for name, ps in raw.get("pairs", {}).items():
        where = f"pairs.{name}"
        _check_keys(src, where, ps, _PAIRSET_KEYS)
        for k, v in ps.items():
            _typed(src, f"{where}.{k}", v, _PAIRSET_KEYS[k])
        if "dataset" not in ps or "pairs" not in ps:
            raise _bad(src, f"{where} needs 'dataset' and 'pairs'")
        if not ps["pairs"]:
            raise _bad(src, f"{where}.pairs is empty")
        for p in ps["pairs"]:
            if not isinstance(p, str) or p.count(":") != 1:
                raise _bad(src, f"{where}.pairs: {p!r} is not 'teacher:student'")
        for key in ("protocol", "teacher_protocol"):
            if ps.get(key) is not None and ps[key] not in protocols:
                raise _bad(src, f"{where}.{key} {ps[key]!r} is not defined; protocols: {', '.join(protocols)}")
        root = ps.get("data_root")
        if root and base_dir is not None and not Path(root).is_absolute():
            root = str((base_dir / root).resolve())
        opts = dict(ps.get("dataset_options", {}))
        size = ps.get("image_size", opts.pop("image_size", None))
        data = DataSpec(ps["dataset"], root, size, tuple(sorted(opts.items())))
        pair_sets[name] = PairSet(name, data, tuple(ps["pairs"]), ps.get("protocol"), ps.get("teacher_protocol"))

    methods = raw.get("methods", {})
    for mname, table in methods.items():
        if not isinstance(table, dict):
            raise _bad(src, f"[methods.{mname}] must be a table")
    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict):
        raise _bad(src, "[slurm] must be a table")
    SlurmSettings.from_dict(slurm, src)  # validated here, used by --executor slurm
    return Bench(
        protocols,
        pair_sets,
        dict(methods),
        tuple(seeds),
        protocol,
        defaults.get("results", "results"),
        defaults.get("teacher_seed", 0),
        src,
        dict(slurm),
    )


def load_bench(path: str | Path | None = None) -> Bench:
    """Read bench.toml: the given file, else ./bench.toml, else the copy shipped with kdbench."""
    if path is None:
        path = Path("bench.toml") if Path("bench.toml").is_file() else PACKAGED_CONFIG
    path = Path(path)
    if not path.is_file():
        raise KdbenchError(f"config file {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise KdbenchError(f"{path}: not valid TOML ({str(exc) or type(exc).__name__})") from None
    # Relative data_root paths are resolved from the folder the file is named in, not where a link points: the
    # checkout's ./bench.toml links to the packaged kdbench/bench.toml, and its paths are relative to the checkout.
    return parse_bench(raw, str(path), path.absolute().parent)


# ---------------------------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A --set value in TOML syntax (2, 0.5, 1e-4, true, [1, 2], "x"); anything else is taken as a plain string."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# A grid bigger than this is a typo, not an experiment (and expanding it would exhaust memory).
MAX_GRID_POINTS = 10_000


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas that are outside brackets, braces and quotes ("1,2" -> 2 parts, "[1, 2]" -> 1)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """`--set KEY=V` or `--set KEY=V1,V2,...` strings -> {KEY: [values]}; a comma list is a grid over the values."""
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise KdbenchError(f"--set {item!r}: expected KEY=VALUE, e.g. methods.kd.temperature=2")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = split_top_level(text)
        if len(parts) > 1 and any(not p.strip() for p in parts):
            raise KdbenchError(f"--set {item!r}: an empty value in the list; write e.g. {key}=1,2,4")
        values = [parse_value(p) for p in parts] if len(parts) > 1 else [parse_value(text)]
        # repeated values run once (compared as JSON: a value may be a list, which cannot be hashed)
        values = list({json.dumps(v, sort_keys=True): v for v in values}.values())
        if len(values) > 1 and key.startswith("protocol."):
            raise KdbenchError(
                f"--set {key}: a list of values (a grid) is accepted for methods.NAME.KEY only; a protocol is one "
                "table group, so run one protocol value per results folder (or per command)"
            )
        if key in out:
            raise KdbenchError(f"--set {key} is given twice; give one list instead, e.g. {key}=1,2")
        out[key] = values
    return out


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values (the product over its keys, the first key varying slowest)."""
    import itertools
    import math

    size = math.prod(len(v) for v in grid.values())
    if size > MAX_GRID_POINTS:
        raise KdbenchError(f"--set: the grid has {size:,} combinations of values; at most {MAX_GRID_POINTS:,} are run")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set a.b.c=value` strings -> {"a.b.c": value} (one value per key: a grid is refused here)."""
    out: dict[str, Any] = {}
    for key, values in parse_grid(items).items():
        if len(values) > 1:
            raise KdbenchError(f"--set {key}: a list of values (a grid) is not accepted here; give one value")
        out[key] = values[0]
    return out


def apply_protocol_sets(proto: Protocol, sets: dict[str, Any], src: str = "--set") -> Protocol:
    """Apply `protocol.KEY=V` overrides to the chosen protocol, validated as in bench.toml."""
    changes = {k.split(".", 1)[1]: v for k, v in sets.items() if k.startswith("protocol.")}
    if not changes:
        return proto
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(proto).items() if k != "name"}
    for k in changes:
        if k not in _PROTOCOL_TYPES:
            raise KdbenchError(f"{src}: unknown key protocol.{k}; valid: {', '.join(sorted(_PROTOCOL_TYPES))}")
    raw.update(changes)
    return _protocol(src, proto.name, raw)


def method_sets(sets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`methods.NAME.KEY=V` overrides grouped by method; any other prefix is an error listing the valid ones."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in sets.items():
        if key.startswith("protocol."):
            continue
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "methods":
            raise KdbenchError(f"--set {key}: keys are methods.NAME.KEY or protocol.KEY")
        out.setdefault(parts[1], {})[parts[2]] = value
    return out


def check_safe_name(kind: str, name: str) -> str:
    """Names that become file names must not escape the results folder."""
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise KdbenchError(f"invalid {kind} name {name!r}: use letters, digits and _ . + - only")
    return name
