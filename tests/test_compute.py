"""`kdbench table --compute`: the compute of a results folder, from its runs' JSON timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.compute import measure, render_compute_md
from kdbench.errors import KdbenchError


def _run(run_id, method, student, timings, *, status="done", teacher=None, device_name="Xeon"):
    return {
        "run_id": run_id,
        "status": status,
        "spec": {"method": method, "student": student, "teacher": {"arch": "resnet20"} if teacher else None},
        "teacher": teacher,
        "timings": timings,
        "environment": {"device": "cpu", "device_name": device_name},
    }


def _folder():
    card = {"arch": "resnet20", "run_id": "t0", "top1": 40.0}
    teacher = _run("t0", "ce", "resnet20", {"epoch_seconds": [30.0, 40.0, 50.0], "cohort_size": 1})
    # a cohort of two students: every epoch's wall time is shared; FSP's init stage is its own
    kd = _run("a", "kd", "resnet8", {"epoch_seconds": [10.0, 20.0], "cohort_size": 2}, teacher=card)
    fsp = _run(
        "b", "fsp", "resnet8", {"epoch_seconds": [10.0, 20.0], "cohort_size": 2, "init_seconds": 6.0}, teacher=card
    )
    kd2 = _run("c", "kd", "resnet8", {"epoch_seconds": [8.0], "cohort_size": 1}, teacher=card)
    failed = _run("d", "kd", "resnet8", {"epoch_seconds": [1000.0], "cohort_size": 1}, status="failed", teacher=card)
    return [(Path(f"{r['run_id']}.json"), r) for r in (teacher, kd, fsp, kd2, failed)], card


def test_cohort_epochs_are_shared_and_init_stages_are_the_runs_own():
    runs, _card = _folder()
    per = measure([r for r in runs if r[1]["run_id"] != "t0"])
    assert per["kd"].runs == 2 and per["kd"].epochs == 3  # the failed run is not counted
    assert per["kd"].seconds == pytest.approx(5 + 10 + 8)
    assert per["kd"].member_epoch_seconds == [5.0, 10.0, 8.0]
    assert per["fsp"].seconds == pytest.approx(5 + 10 + 6)


def test_render_names_teachers_and_totals():
    runs, card = _folder()
    text = render_compute_md(runs, [card])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["kd"] == "| kd | 2 | 3 | 0.01 | 8.0 |"
    assert rows["teacher resnet20"] == "| teacher resnet20 | 1 | 3 | 0.03 | 40.0 |"
    total_hours = (23 + 21 + 120) / 3600
    assert rows["**total**"] == f"| **total** | 4 | 8 | {total_hours:.2f} | 10.0 |"
    assert "ce" not in rows  # the teacher's own vanilla run is the teacher's line, not the vanilla student's
    assert "cpu (Xeon)" in text
    # the teacher is recognised from the teachers/ cards alone, before any student has finished
    alone = render_compute_md(runs[:1], [card])
    assert "| teacher resnet20 |" in alone and "| ce |" not in alone


def test_cli_compute_on_a_folder_and_on_an_empty_one(tmp_path):
    runs, card = _folder()
    (tmp_path / "runs").mkdir()
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "t.json").write_text(json.dumps(card))
    empty = CliRunner().invoke(cli, ["table", "--results", str(tmp_path), "--compute"])
    assert isinstance(empty.exception, KdbenchError)  # main() prints it as one line and exits 2
    assert "no finished runs" in str(empty.exception)
    fixture = Path(__file__).resolve().parent / "fixtures" / "results_known"
    out = CliRunner().invoke(cli, ["table", "--results", str(fixture), "--compute"])
    assert out.exit_code == 0, out.output
    assert "| **total** |" in out.output and "wall-clock hours" in out.output
