"""`kdbench table --compute`: the compute of a results folder, from its runs' JSON timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.compute import measure, render_compute_md, share
from kdbench.errors import KdbenchError

CARD = {"arch": "resnet20", "run_id": "t0", "top1": 40.0}


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
    teacher = _run("t0", "ce", "resnet20", {"epoch_seconds": [30.0, 40.0, 50.0], "cohort_size": 1})
    # a cohort of two students: every epoch's wall time is shared; FSP's init stage is its own
    kd = _run("a", "kd", "resnet8", {"epoch_seconds": [10.0, 20.0], "cohort_size": 2}, teacher=CARD)
    fsp = _run(
        "b", "fsp", "resnet8", {"epoch_seconds": [10.0, 20.0], "cohort_size": 2, "init_seconds": 6.0}, teacher=CARD
    )
    kd2 = _run("c", "kd", "resnet8", {"epoch_seconds": [8.0], "cohort_size": 1}, teacher=CARD)
    failed = _run("d", "crd", "resnet8", {"epoch_seconds": [7.0], "cohort_size": 1}, status="failed", teacher=CARD)
    return [(Path(f"{r['run_id']}.json"), r) for r in (teacher, kd, fsp, kd2, failed)]


def test_cohort_epochs_are_shared_and_init_stages_are_the_runs_own():
    got = measure(_folder(), {"t0"})
    assert got.per_method["kd"].runs == 2 and got.per_method["kd"].epochs == 3
    assert got.per_method["kd"].seconds == pytest.approx(5 + 10 + 8)
    assert got.per_method["kd"].member_epoch_seconds == [5.0, 10.0, 8.0]
    assert got.per_method["fsp"].seconds == pytest.approx(5 + 10 + 6)
    assert "crd" not in got.per_method and got.failed.runs == 1 and got.failed.seconds == pytest.approx(7)
    assert got.per_teacher["resnet20"].seconds == pytest.approx(120)


def test_an_epoch_is_shared_by_the_members_that_trained_in_it():
    # a cohort of 3 whose third member failed after epoch 1; the first epoch came from a checkpoint of older code
    # that did not record the sizes, so it falls back to the cohort's starting size
    seconds, per_epoch = share({"epoch_seconds": [30.0, 30.0, 30.0], "cohort_size": 3, "epoch_cohort_sizes": [3, 2]})
    assert per_epoch == [10.0, 10.0, 15.0] and seconds == pytest.approx(35.0)


@pytest.mark.parametrize(
    "timings",
    [
        [1, 2],
        {"epoch_seconds": 3.0},
        {"epoch_seconds": [1.0, None]},
        {"epoch_seconds": [1.0], "cohort_size": "2"},
        {"epoch_seconds": [1.0], "init_seconds": "5"},
        {"epoch_seconds": [1.0], "epoch_cohort_sizes": [1, 1]},
        {"epoch_seconds": [-1.0]},
    ],
)
def test_unreadable_timings_are_left_out_with_a_reason(timings):
    with pytest.raises(ValueError):
        share(timings)
    runs = [(Path("x.json"), _run("x", "kd", "resnet8", timings, teacher=CARD))]
    text = render_compute_md(runs + _folder()[1:2], {"t0"})
    assert "Left out (1, timings unreadable): x.json: timings" in text
    assert "| kd | 1 | 2 |" in text


def test_render_names_teachers_failed_runs_and_totals():
    runs = _folder()
    text = render_compute_md(runs, {"t0"})
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["kd"] == "| kd | 2 | 3 | 0.01 | 8.0 |"
    assert rows["teacher resnet20"] == "| teacher resnet20 | 1 | 3 | 0.03 | 40.0 |"
    assert rows["failed runs"] == "| failed runs | 1 | 1 | 0.00 | 7.0 |"
    total_hours = (23 + 21 + 120 + 7) / 3600
    assert rows["**total**"] == f"| **total** | 5 | 9 | {total_hours:.2f} |  |"
    assert "ce" not in rows  # the teacher's own vanilla run is the teacher's line, not the vanilla student's
    assert "cpu (Xeon)" in text
    # the teacher is recognised from the teachers/ cards alone, before any student has finished
    alone = render_compute_md(runs[:1], {"t0"})
    assert "| teacher resnet20 |" in alone and "| ce |" not in alone
    # ... and from the card a student's run carries
    assert "| teacher resnet20 |" in render_compute_md(runs)
    # no environment recorded: no made-up device
    bare = [(p, {k: v for k, v in r.items() if k != "environment"}) for p, r in runs]
    assert "on an unrecorded device" in render_compute_md(bare)


def test_cli_compute_on_a_folder_and_on_an_empty_one(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "t.json").write_text(json.dumps(CARD))
    empty = CliRunner().invoke(cli, ["table", "--results", str(tmp_path), "--compute"])
    assert isinstance(empty.exception, KdbenchError)  # main() prints it as one line and exits 2
    assert "no finished runs" in str(empty.exception)
    fixture = Path(__file__).resolve().parent / "fixtures" / "results_known"
    out = CliRunner().invoke(cli, ["table", "--results", str(fixture), "--compute"])
    assert out.exit_code == 0, out.output
    assert "| **total** |" in out.output and "wall-clock hours" in out.output
    both = CliRunner().invoke(cli, ["table", "--results", str(fixture), "--compute", "--format", "latex", "--vs", "kd"])
    assert isinstance(both.exception, KdbenchError) and "--format, --vs" in str(both.exception)
