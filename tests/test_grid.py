"""Grids over settings: `--set KEY=V1,V2` expands into one run per value (a product over several keys), each with its
own run id; tables show one row per distinct setting (``at (weight=250)``), never averaging settings together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.catalog import method_order
from kdbench.cli import cli
from kdbench.config import MAX_GRID_POINTS, expand_grid, load_bench, parse_grid, parse_sets, split_top_level
from kdbench.errors import KdbenchError
from kdbench.results import ResultStore
from kdbench.sweep import Request, expand
from kdbench.tables import build_tables, collect

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"


def _expand(methods, sets, seeds=(0,)):
    return expand(load_bench(ROOT / "bench.toml"), Request(methods, ["tinyimagenet100-cpu"], list(seeds), sets=sets))


def test_split_respects_lists_and_quotes():
    assert split_top_level("1,2,4") == ["1", "2", "4"]
    assert split_top_level("[1, 2]") == ["[1, 2]"]
    assert split_top_level('"a,b",c') == ['"a,b"', "c"]
    assert split_top_level("[1, 2],[3]") == ["[1, 2]", "[3]"]


def test_parse_grid_values_and_errors():
    assert parse_grid(["methods.at.weight=125,250"]) == {"methods.at.weight": [125, 250]}
    assert parse_grid(["methods.x.m=[1, 2]"]) == {"methods.x.m": [[1, 2]]}
    assert parse_grid(["a.b.c=1,1,2"]) == {"a.b.c": [1, 2]}  # repeated values run once
    with pytest.raises(KdbenchError, match="empty value"):
        parse_grid(["methods.at.weight=1,,2"])
    with pytest.raises(KdbenchError, match="given twice"):
        parse_grid(["methods.at.weight=1", "methods.at.weight=2"])
    with pytest.raises(KdbenchError, match="not accepted here"):
        parse_sets(["methods.at.weight=1,2"])
    assert expand_grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    with pytest.raises(KdbenchError, match="combinations"):
        expand_grid({f"k{i}": list(range(10)) for i in range(5)})
    assert MAX_GRID_POINTS < 10**5


def test_a_grid_is_one_run_per_value_with_the_ids_of_single_settings():
    specs = _expand(["ce", "at"], ["methods.at.weight=125,250,500,1000"], seeds=(0, 1))
    at = {(s.seed, s.method_config["weight"]): s.run_id for s in specs if s.method == "at"}
    assert len(at) == 8 and len(set(at.values())) == 8
    assert sum(s.method == "ce" for s in specs) == 2  # the vanilla student once per seed, not once per value
    # a grid point has the id of the same single setting: the reference weight is the committed AT run, 250 the
    # committed investigation run of seed 0
    assert at[(0, 1000.0)] == "1464aac4e3f9c79e"
    assert at[(0, 250.0)] == "ebf877e8cc9a05c4"
    single = _expand(["at"], ["methods.at.weight=500"])
    assert single[0].run_id == at[(0, 500.0)]


def test_a_product_over_several_keys():
    specs = _expand(["kd"], ["methods.kd.temperature=2,4", "methods.kd.kd_weight=0.5,0.9"])
    got = sorted((s.method_config["temperature"], s.method_config["kd_weight"]) for s in specs)
    assert got == [(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)]


def test_grid_errors_are_one_line():
    with pytest.raises(KdbenchError, match="not in this run"):
        _expand(["kd"], ["methods.at.weight=1,2"])
    with pytest.raises(KdbenchError, match="unknown setting"):
        _expand(["kd"], ["methods.kd.nosuch=1,2"])


def test_dry_run_lists_every_grid_point(tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "run",
            "--methods",
            "kd",
            "--pairs",
            "resnet20:resnet8",
            "--dataset",
            "synthetic",
            "--protocol",
            "smoke",
            "--set",
            "methods.kd.temperature=1,2,8",
            "--results",
            str(tmp_path / "r"),
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "3 runs" in res.output
    for t in (1, 2, 8):
        assert f"temperature={t}" in res.output


def _variant(folder: Path, src_glob: str, run_id: str, top1: float = 50.0, **config) -> None:
    src = next((folder / "runs").glob(src_glob))
    run = json.loads(src.read_text())
    run["run_id"] = run_id
    run["spec"]["method_config"].update(config)
    run["metrics"]["top1_last"] = top1
    (folder / "runs" / src.name.replace(src.name.rsplit("__", 1)[1], f"{run_id}.json")).write_text(json.dumps(run))


def test_a_table_row_per_distinct_setting(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(FIXTURE, folder)
    _variant(folder, "*resnet8x4__kd__s0__*.json", "00000000000000t2", temperature=2.0)
    _variant(folder, "*resnet8x4__kd__s1__*.json", "00000000000000u2", temperature=2.0)
    _variant(folder, "*resnet8x4__kd__s0__*.json", "00000000000000t8", temperature=8.0)
    col = collect(ResultStore(folder))
    (table,) = build_tables(col, "top1_last").values()
    assert table.rows[:5] == ["Teacher", "Student", "kd", "kd (temperature=2)", "kd (temperature=8)"]
    pair = "resnet32x4:resnet8x4"
    assert table.cell("kd (temperature=2)", pair).values == [(0, 50.0), (1, 50.0)]
    assert table.cell("kd", pair).n == 3  # the default setting's runs alone, as before
    assert not any("differ in their settings" in p for p in col.problems)
    # a variant is compared with KD at its reference setting, seed by seed
    (t2,) = build_tables(col, "top1_last", vs="kd").values()
    assert t2.paired[("kd (temperature=2)", pair)].n == 2


def test_variant_rows_follow_their_method():
    assert method_order(["at (weight=500)", "kd", "at", "at (weight=125)", "ce"]) == [
        "ce",
        "kd",
        "at",
        "at (weight=125)",
        "at (weight=500)",
    ]


def test_best_of_grid_and_the_sensitivity_figure(tmp_path):
    from kdbench.grids import best_of_grid, render_best_of_grid_md
    from kdbench.plots import sensitivity_figure

    folder = tmp_path / "results"
    shutil.copytree(FIXTURE, folder)
    # kd at temperature 2 beats kd's default on both seeds; at 8 it loses
    _variant(folder, "*resnet8x4__kd__s0__*.json", "00000000000000t2", top1=90.0, temperature=2.0)
    _variant(folder, "*resnet8x4__kd__s1__*.json", "00000000000000u2", top1=91.0, temperature=2.0)
    _variant(folder, "*resnet8x4__kd__s0__*.json", "00000000000000t8", top1=10.0, temperature=8.0)
    col = collect(ResultStore(folder))
    (table,) = build_tables(col, "top1_last").values()
    pair = "resnet32x4:resnet8x4"
    got = best_of_grid(table, pair)
    assert got["kd"][0] == "kd (temperature=2)" and got["kd"][2].mean == 90.5
    assert got["crd"][0] == "crd"  # no grid: its own best
    text = render_best_of_grid_md(table)
    assert "| kd | 74.60 ± 0.50 (n=3) | 90.50 ± 0.71 (n=2) | temperature=2 | +15.90 |" in text
    assert "Kendall tau-b between the ranking of the 5 methods" in text and "optimistic" in text
    fig = sensitivity_figure(col, table.group, pair)
    assert fig is not None
    (ax,) = [a for a in fig.axes if a.get_visible()]
    # seed counts per value: 3 at the default (4), 2 at 2 and 1 at 8; the title says each count that differs
    assert ax.get_title() == "kd: temperature (3 seeds; 2 at 2; 1 at 8)" and ax.get_xscale() == "log"  # 2..8 spans 4x
    xs = sorted(ax.lines[0].get_xdata())
    assert xs == [2.0, 4.0, 8.0]


def test_a_protocol_grid_is_refused_and_list_values_make_a_grid():
    with pytest.raises(KdbenchError, match="accepted for methods.NAME.KEY only"):
        parse_grid(["protocol.lr=0.05,0.1"])
    # values that are lists (unhashable) are de-duplicated too; a single protocol value is fine
    assert parse_grid(["methods.x.y=[1, 2],[1, 2],[3]"]) == {"methods.x.y": [[1, 2], [3]]}
    assert parse_grid(["protocol.milestones=[1, 2]"]) == {"protocol.milestones": [[1, 2]]}


def test_a_run_recorded_before_a_new_default_is_a_row_of_its_old_setting(tmp_path):
    """OFD's teacher_bn arrived with default "batch"; runs recorded without the key used the running statistics."""
    from kdbench.variants import method_absent_values, setting_diff

    absent = method_absent_values(["ofd"])["ofd"]
    assert absent == {"teacher_bn": "eval"}
    spec = _expand(["ofd"], [])[0]
    default = dict(spec.method_config)
    old = {k: v for k, v in default.items() if k != "teacher_bn"}
    assert setting_diff(old, default, absent) == {"teacher_bn": "eval"}
    assert setting_diff(default, default, absent) == {}
