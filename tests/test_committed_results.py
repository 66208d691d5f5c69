"""The committed real-image results regenerate from their own JSON: `kdbench table` on results/tinyimagenet100
reproduces the committed table.md byte for byte (the command is the one its README gives)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "tinyimagenet100"
COMMAND = ["table", "--results", str(RESULTS), "--metric", "top1_last", "--metric", "top1_best"]


def test_table_md_is_what_kdbench_table_prints_from_the_committed_json():
    committed = (RESULTS / "table.md").read_text()
    res = CliRunner().invoke(cli, COMMAND)
    assert res.exit_code == 0, res.output
    assert res.stdout == committed, "regenerate it: kdbench " + " ".join(COMMAND[:1] + COMMAND[3:])


def test_the_readme_gives_that_command():
    readme = (RESULTS / "README.md").read_text()
    assert (
        "kdbench table --results results/tinyimagenet100 --metric top1_last --metric top1_best > "
        "results/tinyimagenet100/table.md" in readme
    )


def test_transfer_md_is_what_kdbench_table_transfer_prints():
    command = ["table", "--results", str(RESULTS), "--transfer"]
    res = CliRunner().invoke(cli, command)
    assert res.exit_code == 0, res.output
    assert res.stdout == (RESULTS / "transfer.md").read_text(), (
        "regenerate it: kdbench table --results results/tinyimagenet100 --transfer > "
        "results/tinyimagenet100/transfer.md"
    )


def test_noise_md_is_what_its_script_prints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("noise_floor", RESULTS / "noise" / "noise_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == (RESULTS / "noise" / "noise.md").read_text(), (
        "regenerate it: python results/tinyimagenet100/noise/noise_floor.py > results/tinyimagenet100/noise/noise.md"
    )


def test_noise_md_counts_a_grid_point_as_another_setting_not_another_seed():
    # a method's seed spread (and the KD comparison with the reference code) is over its default setting only: KD's
    # temperature grid once entered them as extra 'seeds' 0, 0, 0, 0, 1, ...
    import re

    text = (RESULTS / "noise" / "noise.md").read_text()
    seed_lists = re.findall(r"^\| (?:kd|fitnet|pkt) \| \d+ \| ([\d, ]+) \|", text, flags=re.M)
    seed_lists += re.findall(r"kdbench's KD, \d+ seeds \(([\d, ]+)\)", text)
    assert len(seed_lists) == 4
    for listed in seed_lists:
        seeds = [int(s) for s in listed.split(", ")]
        assert len(seeds) == len(set(seeds)), listed


def test_readme_tables_are_what_summary_py_prints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("summary", RESULTS / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for readme, text in ((module.README, module.main()), (module.MAIN_README, module.digest())):
        block = module.readme_block(readme)
        assert block, f"{readme} lacks the summary.py markers"
        assert block == text, "regenerate it: python results/tinyimagenet100/summary.py --readme"


# Every derived file that results/tinyimagenet100/regenerate.sh writes with `kdbench table`, and its arguments.
DERIVED = {
    "vs_kd.md": ["--vs", "kd"],
    "vs_ce.md": ["--vs", "ce"],
    "rank_crd2020.md": ["--reference", "crd2020", "--rank-corr", "resnet56:resnet20"],
    "rank_published.md": ["--reference", "crd2020,rrd2024,dkd2022,ls2024", "--rank-corr", "resnet56:resnet20"],
    "best_of_grid.md": ["--best-of-grid"],
    "compute.md": ["--compute"],
}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_file_is_what_its_command_prints(name):
    args = DERIVED[name]
    res = CliRunner().invoke(cli, ["table", "--results", str(RESULTS), *args])
    assert res.exit_code == 0, res.output
    assert res.stdout == (RESULTS / name).read_text(), "regenerate: bash results/tinyimagenet100/regenerate.sh"


def test_regenerate_sh_writes_each_derived_file_with_its_command():
    script = (RESULTS / "regenerate.sh").read_text().replace("\\\n  ", "")
    for name, args in DERIVED.items():
        line = f"kdbench table --results $R {' '.join(args)} > $R/{name}"
        assert line in script, line
    assert "> $R/table.md" in script and "--transfer > $R/transfer.md" in script
    assert "python $R/summary.py --readme" in script
