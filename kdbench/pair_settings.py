"""The authors' method settings per teacher/student pair (``reference/pair_settings.toml``), and where each value of
a run's resolved config came from.

A published number was produced with a setting its authors chose for that pair. A run of a method on a listed pair
gets those values by default; the order, later winning: the method's default, the per-pair published setting,
bench.toml ``[methods.NAME]``, ``--set``. ``uniform=True`` (``--uniform-settings``) skips the per-pair step, so every
pair runs the method's single default (CRD's protocol for a uniform comparison). The run id hashes the resolved
config only, so a per-pair value equal to the default (or a pair with none) leaves the id as it was.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PAIR_SETTINGS_FILE = Path(__file__).resolve().parent / "reference" / "pair_settings.toml"
# Where a value came from, in the order in which they are applied (a later one wins).
ORIGINS = ("default", "pair", "bench.toml", "--set")
_META = {"from", "confirmed", "note", "reference"}  # reference: a pair's own, when not the method table's


@dataclass(frozen=True)
class PairSetting:
    """One method's published setting on one pair, with its citation."""

    method: str
    pair: str
    values: tuple[tuple[str, Any], ...]
    reference: str | None  # the `kdbench table --reference` name of the numbers it produced, if kdbench ships them
    source: str  # "owner/repo @ commit: path (key)"
    confirmed: bool = True
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"values": dict(self.values), "reference": self.reference, "source": self.source}
        if not self.confirmed:
            out["confirmed"] = False
            out["note"] = self.note
        return out


def parse_pair_settings(raw: dict[str, Any], src: str) -> dict[tuple[str, str], PairSetting]:
    """Validate the file's layout (the values themselves are checked against each method's Config by a test and by
    ``make_config`` when a run uses them)."""
    out: dict[tuple[str, str], PairSetting] = {}
    for method, table in raw.items():
        if not isinstance(table, dict) or not isinstance(table.get("pairs"), dict):
            raise KdbenchError(f"{src}: [{method}] needs a [{method}.pairs] table")
        repo, commit = table.get("repository", "?"), table.get("commit", "?")
        for pair, entry in table["pairs"].items():
            if pair.count(":") != 1 or not isinstance(entry, dict) or "from" not in entry:
                raise KdbenchError(f"{src}: [{method}.pairs.{pair!r}] must be a 'teacher:student' table with 'from'")
            values = tuple(sorted((k, v) for k, v in entry.items() if k not in _META))
            if not values:
                raise KdbenchError(f"{src}: [{method}.pairs.{pair!r}] sets no value")
            out[(method, pair)] = PairSetting(
                method,
                pair,
                values,
                entry.get("reference", table.get("reference")),
                f"{repo} @ {commit}: {entry['from']}",
                bool(entry.get("confirmed", True)),
                str(entry.get("note", "")),
            )
    return out


@lru_cache(maxsize=4)
def load_pair_settings(path: Path = PAIR_SETTINGS_FILE) -> dict[tuple[str, str], PairSetting]:
    """Every per-pair setting of the shipped file, keyed by (method, "teacher:student")."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KdbenchError(f"{path}: cannot read the per-pair settings ({exc})") from None
    return parse_pair_settings(raw, str(path))


def pair_setting(method: str, pair: str) -> PairSetting | None:
    """The published setting of `method` on `pair` ("teacher:student"), or None."""
    return load_pair_settings().get((method, pair))


@dataclass(frozen=True)
class SettingsOrigin:
    """Where each value of a run's resolved method config came from (recorded in the run JSON as ``settings``; not
    part of the run id, which hashes the values themselves)."""

    mode: str  # "per-pair" (published per-pair settings applied where the pair has them) or "uniform"
    origin: tuple[tuple[str, str], ...]  # (config key, one of ORIGINS), every field of the Config
    pair: PairSetting | None = None  # the per-pair setting that was applied, if any

    @property
    def kind(self) -> str:
        """One word for a table cell: "set" when bench.toml or --set changed a value, else "pair" when a per-pair
        published value was applied, else "default"."""
        used = {o for _, o in self.origin}
        if used & {"bench.toml", "--set"}:
            return "set"
        return "pair" if "pair" in used else "default"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "kind": self.kind,
            "from": dict(self.origin),
            "pair_setting": self.pair.to_dict() if self.pair is not None else None,
        }


def resolve_values(
    method: str,
    pair: str,
    fields: list[str],
    bench_values: dict[str, Any],
    set_values: dict[str, Any],
    *,
    uniform: bool = False,
) -> tuple[dict[str, Any], SettingsOrigin]:
    """The values to give ``make_config`` for `method` on `pair`, and where each field's value comes from."""
    ps = None if uniform else pair_setting(method, pair)
    origin = dict.fromkeys(fields, "default")
    values: dict[str, Any] = {}
    for name, layer in (("pair", dict(ps.values) if ps else {}), ("bench.toml", bench_values), ("--set", set_values)):
        values.update(layer)
        origin.update(dict.fromkeys(layer, name))
    return values, SettingsOrigin("uniform" if uniform else "per-pair", tuple(origin.items()), ps)


def published_config(entry: Any, pair: str) -> tuple[dict[str, Any], PairSetting | None]:
    """The resolved config identity the published number of `entry`'s method on `pair` came from: the method's
    default with the pair's published values (what a run with no bench.toml or --set override gets)."""
    from kdbench.method import config_identity, make_config

    ps = pair_setting(entry.name, pair)
    return config_identity(make_config(entry, dict(ps.values) if ps else {})), ps


def config_fields(entry: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(entry.cls.Config)]
