"""The README's quick start, exactly as written there: its table must make sense to a newcomer (the teacher above
the vanilla student, KD above the vanilla student, each by more than the spread over seeds), and what it writes into
a checkout must be ignored by git."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.results import ResultStore
from kdbench.tables import STUDENT, TEACHER, build_tables, collect

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart_commands() -> list[list[str]]:
    """The `kdbench ...` commands of the README's quick-start block (the line that installs and runs)."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    line = next(ln for ln in block.splitlines() if "kdbench run" in ln)
    return [shlex.split(part.strip())[1:] for part in line.split("&&") if part.strip().startswith("kdbench ")]


def test_readme_quickstart_runs_the_quickstart_pair_set_with_several_seeds():
    cmds = quickstart_commands()
    assert [c[0] for c in cmds] == ["run", "table"]
    run = cmds[0]
    assert run[run.index("--pairs") + 1] == "quickstart"
    assert len(run[run.index("--seeds") + 1].split(",")) >= 3


@pytest.mark.slow
def test_quickstart_table_makes_sense(tmp_path):
    """Trains the quick start exactly as the README says (about 100 s on 2 idle cores) into a temporary results
    folder, then checks the ordering its table shows."""
    from kdbench.cli import cli

    run, table = quickstart_commands()
    res = tmp_path / "results"
    out = CliRunner().invoke(cli, [*run, "--results", str(res)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    shown = CliRunner().invoke(cli, [*table, "--results", str(res)])
    assert shown.exit_code == 0, shown.output

    (t,) = build_tables(collect(ResultStore(res)), "top1_last").values()
    (pair,) = t.pairs
    teacher, student, kd = t.cell(TEACHER, pair), t.cell(STUDENT, pair), t.cell("kd", pair)
    assert student.n == kd.n >= 3
    # the teacher clearly above the vanilla student, and KD above it, each by more than the spread over seeds that
    # the table shows (± the sample standard deviation)
    assert teacher.mean - student.mean > max(student.std, 1.0), (teacher.mean, student.values)
    assert kd.mean - student.mean > max(student.std, kd.std), (kd.values, student.values)
    # what the quick start writes into a checkout's results/ folder is ignored by git
    if shutil.which("git") and (ROOT / ".git").exists():
        written = [f"results/{p.relative_to(res).as_posix()}" for p in res.rglob("*") if p.is_file()]
        assert written
        check = subprocess.run(
            ["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"],
            cwd=ROOT,
            input="\n".join(written),
            capture_output=True,
            text=True,
        )
        not_ignored = [ln.split("\t")[-1] for ln in check.stdout.splitlines() if ln.startswith("::")]
        assert not not_ignored, f"git would show these as changes: {not_ignored}"
