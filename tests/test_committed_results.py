"""The committed real-image results regenerate from their own JSON: `kdbench table` on results/tinyimagenet100
reproduces the committed table.md byte for byte (the command is the one its README gives)."""

from __future__ import annotations

from pathlib import Path

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
