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
