"""Which groups `kdbench table` shows: a teacher's own training run (on its own, longer protocol) is the Teacher row
of its students' table, not a table of its own; a group of vanilla runs only gets one column per student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.errors import KdbenchError
from kdbench.results import ResultStore
from kdbench.tables import STUDENT, build_tables, collect

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"


def _vanilla(folder: Path, run_id: str, student: str, protocol: str) -> None:
    src = next((FIXTURE / "runs").glob("cifar100__none__resnet8x4__ce__s0__*.json"))
    run = json.loads(src.read_text())
    run["run_id"] = run_id
    run["spec"]["student"] = student
    run["spec"]["protocol"]["name"] = protocol
    (folder / "runs" / f"cifar100__none__{student}__ce__s0__{run_id}.json").write_text(json.dumps(run))


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(FIXTURE, out)
    # the teacher's own run on its own protocol, named by a card in teachers/
    _vanilla(out, "00000000000000aa", "resnet32x4", "paper-teacher")
    (out / "teachers").mkdir(exist_ok=True)
    (out / "teachers" / "card.json").write_text(json.dumps({"arch": "resnet32x4", "run_id": "00000000000000aa"}))
    # a group with vanilla runs only
    _vanilla(out, "00000000000000bb", "resnet8", "short")
    return out


def test_teacher_groups_are_not_tables_and_vanilla_groups_are(folder):
    col = collect(ResultStore(folder))
    assert "00000000000000aa" in col.teacher_runs
    tables = build_tables(col, "top1_last")
    assert not any("paper-teacher" in g for g in tables), list(tables)
    (short,) = [t for g, t in tables.items() if g.endswith("/ short")]
    assert short.pairs == ["-:resnet8"] and short.rows == [STUDENT]
    assert any(g.endswith("/ paper") for g in tables)


def test_a_teacher_sharing_its_students_protocol_is_no_student_column(folder):
    # only the teacher's run and a vanilla run so far, on one protocol: the vanilla run gets its column, the
    # teacher's own run does not
    for path in (folder / "runs").glob("*.json"):
        if "__ce__" not in path.name or "resnet8x4" not in path.name:
            path.unlink()
    _vanilla(folder, "00000000000000aa", "resnet32x4", "paper")
    (t,) = build_tables(collect(ResultStore(folder)), "top1_last").values()
    assert t.pairs == ["-:resnet8x4"]


def test_a_folder_with_only_teacher_runs_is_one_clear_error(tmp_path):
    out = tmp_path / "results"
    (out / "runs").mkdir(parents=True)
    _vanilla(out, "00000000000000aa", "resnet32x4", "paper-teacher")
    (out / "teachers").mkdir()
    (out / "teachers" / "card.json").write_text(json.dumps({"arch": "resnet32x4", "run_id": "00000000000000aa"}))
    res = CliRunner().invoke(cli, ["table", "--results", str(out)])
    assert isinstance(res.exception, KdbenchError)  # main() prints it as one line and exits 2
    assert "no student run to tabulate yet" in str(res.exception)
    report = CliRunner().invoke(cli, ["report", "--results", str(out), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    assert "No student run yet" in (tmp_path / "rep" / "report.md").read_text()
