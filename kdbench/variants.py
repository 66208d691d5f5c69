"""Which setting of its method a run used, written as the name of its table row.

A method's runs at the method's default setting are the row ``at``; runs at another setting (a `--set` value, a
point of a `--set` grid) are the row ``at (weight=250)``, named by the keys that differ from the default. Tables,
figures and dry runs use these names, so runs at different settings are never averaged together.

The default is the method's own Config as registered (the reference setting), read through the method registry;
a method that is not installed here has no known default, and its runs keep the plain method name.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _plain(obj: Any) -> Any:
    """Tuples as lists, as a run's JSON holds them."""
    return json.loads(json.dumps(obj, default=str))


def format_value(value: Any) -> str:
    """A setting's value as a short label: 250.0 -> 250, 0.5 -> 0.5, True -> true, [1, 2] -> [1,2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def setting_diff(
    config: dict[str, Any], default: dict[str, Any] | None, absent: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The keys of a run's method config that differ from the method's default (none when the default is unknown).

    A key the run does not record is taken to be at its default (a field added after the run was trained, or left
    out of the run id at its default), except where ``absent`` says what an absent key meant (``absent_means``)."""
    if default is None or not isinstance(config, dict):
        return {}
    default = _plain(default)
    config = {**_plain(absent or {}), **_plain(config)}
    return {k: v for k, v in sorted(config.items()) if k not in default or default[k] != v}


def setting_label(diff: dict[str, Any]) -> str:
    """``weight=250, temperature=2`` (keys sorted), or '' for the default setting."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in sorted(diff.items()))


def row_name(method: str, diff: dict[str, Any]) -> str:
    """``at`` at the default setting, ``at (weight=250)`` otherwise."""
    label = setting_label(diff)
    return f"{method} ({label})" if label else method


def base_method(row: str) -> str:
    """The method of a row name: ``at (weight=250)`` -> ``at``."""
    return row.split(" (", 1)[0]


def method_defaults(names: list[str], pair: str | None = None) -> dict[str, dict[str, Any] | None]:
    """The identity of each method's default config (as in a run's spec), or None where the method is unknown.

    With `pair` (teacher:student), the default on that pair: the method's own default with the authors' per-pair
    values applied (kdbench/reference/pair_settings.toml), which is what a run on that pair gets unless told
    otherwise, so such a run is the method's row, not a row of another setting."""
    from kdbench.errors import KdbenchError
    from kdbench.method import config_identity, discover, make_config, resolve
    from kdbench.pair_settings import published_config

    registry = discover()
    out: dict[str, dict[str, Any] | None] = {}
    for name in dict.fromkeys(names):
        try:
            entry = resolve(name, registry)
            cfg = published_config(entry, pair)[0] if pair else config_identity(make_config(entry, {}))
            out[name] = _plain(cfg)
        except KdbenchError:  # not installed here, or failed to load: its runs keep the plain name
            out[name] = None
        except Exception:  # a plugin whose Config cannot be built with its own defaults: the same
            out[name] = None
    return out


def method_absent_values(names: list[str]) -> dict[str, dict[str, Any]]:
    """What each method's runs recorded without a key meant (``kdbench.method.absent_means``); {} where unknown."""
    from kdbench.errors import KdbenchError
    from kdbench.method import absent_values, discover, resolve

    registry = discover()
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        try:
            out[name] = absent_values(resolve(name, registry).cls.Config)
        except (KdbenchError, AttributeError, TypeError):
            out[name] = {}
    return out


def pair_defaults(keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any] | None]:
    """method_defaults for (method, pair) keys, each method and pair once."""
    out: dict[tuple[str, str], dict[str, Any] | None] = {}
    for pair in dict.fromkeys(p for _m, p in keys):
        got = method_defaults([m for m, p in keys if p == pair], pair)
        out.update({(m, pair): v for m, v in got.items()})
    return out
