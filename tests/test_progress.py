"""Progress you can follow anywhere: per-epoch lines when stderr is redirected, a log beside each run's JSON, an
overall ETA priced from measured epochs, a dry run that lists the teachers to train, the long CSV of the curves."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.text import Text

from kdbench.progress import SweepMeter, hms


def _kdbench(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command line with stdout and stderr redirected to pipes, as under nohup, `> log` or SLURM."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "kdbench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_hms():
    assert [hms(7), hms(65), hms(3725), hms(None), hms(float("nan"))] == ["0:07", "1:05", "1:02:05", "?", "?"]


def test_meter_prices_each_architecture_from_its_measured_epochs():
    m = SweepMeter()
    m.plan("teacher", "resnet20", 4)
    m.plan("a", "resnet8", 3)
    m.plan("b", "resnet8", 3)
    assert (m.total_epochs, m.runs_total, m.eta()) == (10, 3, None)  # nothing measured yet: unknown, not 0
    m.epoch_done("teacher", "resnet20", 10.0)
    assert m.eta() == pytest.approx(3 * 10 + 6 * 10)  # resnet8 not measured yet: priced at the known mean
    m.epoch_done("a", "resnet8", 2.0)
    assert m.eta() == pytest.approx(3 * 10 + 2 * 2 + 3 * 2)
    m.start("b", 2)  # b resumed at epoch 2: one epoch left
    assert m.eta() == pytest.approx(3 * 10 + 2 * 2 + 1 * 2) and m.done_epochs == 4
    m.run_done("teacher")  # finished (or failed): nothing left of it
    assert m.eta() == pytest.approx(2 * 2 + 1 * 2) and m.runs_done == 1 and m.done_epochs == 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny bench's ce and kd (and so its teacher) trained once by a redirected `kdbench run`."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_TOML

    root = tmp_path_factory.mktemp("progress")
    toml = root / "bench.toml"
    toml.write_text(TINY_TOML)
    res = root / "results"
    p = _kdbench(
        [
            "run",
            "--config",
            str(toml),
            "-m",
            "ce,kd",
            "-p",
            "tiny",
            "--seeds",
            "0",
            "--results",
            str(res),
            "--device",
            "cpu",
        ],
        root,
    )
    assert p.returncode == 0, p.stderr
    return root, toml, res, p


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_redirected_run_prints_epoch_lines_and_writes_logs(trained):
    _, _, res, p = trained
    lines = [ln for ln in p.stderr.splitlines() if "| epoch " in ln]
    # the teacher's 2 epochs, then ce's and kd's 2 each: one line per epoch per run, as they happen
    names = [ln.split(" | ")[0].split(" ", 2)[2] for ln in lines]
    assert sorted(set(names)) == ["resnet14:resnet8 kd s0", "resnet8 ce s0", "teacher resnet14 s0"]
    assert len(lines) == 6 and all(names.count(n) == 2 for n in set(names))
    kd = [ln for ln in lines if "kd s0" in ln]
    assert "epoch 2/2" in kd[-1] and " kd " in kd[-1] and " ce " in kd[-1] and "total" in kd[-1]
    assert all("top1 " in ln and "img/s" in ln and "run ETA" in ln and "sweep ETA" in ln for ln in lines)
    assert "sweep ETA 0:00" in lines[-1]
    # a log file beside every run's JSON holding the same lines, then the outcome
    jsons = sorted((res / "runs").glob("*.json"))
    assert len(jsons) == 3
    for j in jsons:
        log = j.with_suffix(".log").read_text().splitlines()
        assert len(log) == 3 and "epoch 1/2" in log[0] and "epoch 2/2" in log[1] and log[2].endswith(j.name)
        assert all(ln in p.stderr for ln in log[:2])
    assert "training teacher resnet14" in p.stderr


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_dry_run_lists_teachers_with_estimates_and_the_import_command(trained, tiny_toml, tmp_path):
    root, toml, res, _ = trained
    fresh = tmp_path / "results"
    args = ["run", "--config", str(tiny_toml), "-m", "ce,kd", "-p", "tiny", "--results", str(fresh), "--dry-run"]
    p = _kdbench(args, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "1 teachers to train first" in p.stdout and "resnet14" in p.stdout
    assert "kdbench teachers import ckpt_resnet14.pth --arch resnet14 --dataset synthetic" in p.stdout
    assert "No time estimate yet" in p.stdout and "0:00" not in p.stdout  # nothing measured in an empty folder
    assert not fresh.exists()  # a dry run writes nothing
    # in the folder where resnet8 and resnet14 were trained on this data, their speeds price new runs: a new
    # seed of the students, and a teacher of another seed
    other = root / "other.toml"
    other.write_text(toml.read_text().replace("seeds = [0]", "seeds = [0]\nteacher_seed = 1"))
    p = _kdbench(
        [
            "run",
            "--config",
            str(other),
            "-m",
            "ce,kd",
            "-p",
            "tiny",
            "--seeds",
            "5",
            "--results",
            str(res),
            "--dry-run",
        ],
        root,
    )
    assert p.returncode == 0, p.stderr
    rows = [ln for ln in p.stdout.splitlines() if "todo" in ln]
    assert len(rows) == 2 and all("unknown" not in ln for ln in rows)
    assert "1 teachers to train first" in p.stdout and "without an estimate" not in p.stdout


def test_table_long_csv_holds_every_epoch_of_every_run(trained):
    root, _, res, _ = trained
    p = _kdbench(["table", "--results", str(res), "--format", "csv", "--long"], root)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    runs = [json.loads(f.read_text()) for f in (res / "runs").glob("*.json")]
    expected = 0
    for r in runs:
        c = r["curve"]
        expected += len(c["lr"]) + sum(len(v) for v in c["loss"].values()) + 2 * len(c["eval_epoch"])
    assert len(rows) == expected
    kd = [r for r in rows if r["method"] == "kd" and r["quantity"] == "test_top1"]
    run = next(r for r in runs if r["spec"]["method"] == "kd")
    assert [float(r["value"]) for r in kd] == pytest.approx(run["curve"]["test_top1"])
    assert {r["quantity"] for r in rows if r["method"] == "kd"} == {
        "lr",
        "loss_ce",
        "loss_kd",
        "loss_total",
        "test_top1",
        "test_top5",
    }
    bad = _kdbench(["table", "--results", str(res), "--long"], root)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --long")


def test_cohort_progress_names_every_member_and_survives_markup(tiny_data):
    """The cohort's bar names the pair, the seed and each member's top-1; '[...]' is not eaten as rich markup."""
    import torch

    from kdbench.config import DataSpec, RunSpec, TeacherSpec, load_bench
    from kdbench.method import make_config, resolve
    from kdbench.models import create_model
    from kdbench.train import build_member, train_cohort

    bench = load_bench(None)
    proto = bench.protocols["smoke"]
    import dataclasses

    proto = dataclasses.replace(proto, epochs=1)
    data = DataSpec("synthetic", None, 16)
    teacher = create_model("resnet8", num_classes=tiny_data.num_classes)
    members = []
    for name in ("kd", "fitnet"):
        cfg = dataclasses.asdict(make_config(resolve(name)))
        spec = RunSpec("resnet8", name, cfg, 0, proto, data, TeacherSpec("resnet8", data, proto, 0))
        members.append(build_member(spec, tiny_data, teacher, torch.device("cpu")))

    class Recorder:
        def __init__(self):
            self.descriptions = []

        def add_task(self, description, total):
            self.descriptions.append(description)
            return 0

        def update(self, task, description=None, **kw):
            if description:
                self.descriptions.append(description)

        def reset(self, *a, **k):
            pass

        def advance(self, *a, **k):
            pass

        def remove_task(self, task):
            pass

    rec = Recorder()
    train_cohort(members, tiny_data, teacher, torch.device("cpu"), progress=rec, save=False)
    shown = [Text.from_markup(d).plain for d in rec.descriptions]
    assert shown[0] == "resnet8:resnet8 s0 [kd, fitnet]"
    assert shown[-1].startswith("resnet8:resnet8 s0 ep 1/1 top1: kd ") and ", fitnet " in shown[-1]


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_what_a_run_and_its_report_write_is_ignored_by_git(trained, tmp_path):
    """A run's outputs (runs, logs, weights, teachers, checkpoints, locks) and its report, mapped into a checkout's
    default results/ folder, are all ignored by git: `git status` stays clean after a user's run."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    if not shutil.which("git") or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    _, _, res, _ = trained
    assert _kdbench(["report", "--results", str(res)], tmp_path).returncode == 0
    (res / "checkpoints").mkdir(exist_ok=True)
    (res / "checkpoints" / "x.pt").write_bytes(b"")  # what an interrupted run leaves
    (res / "locks").mkdir(exist_ok=True)
    (res / "locks" / "x.lock").write_text("")
    written = [f"results/{p.relative_to(res).as_posix()}" for p in res.rglob("*") if p.is_file()]
    assert any("/report/" in w for w in written) and any(w.endswith(".log") for w in written)
    check = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"],
        cwd=root,
        input="\n".join(written),
        capture_output=True,
        text=True,
    )
    not_ignored = [ln.split("\t")[-1] for ln in check.stdout.splitlines() if ln.startswith("::")]
    assert not not_ignored, f"git would show these as changes: {not_ignored}"


def test_progress_names_a_grid_point_by_its_setting():
    """Runs of one method at several settings train side by side in a grid's cohort: their progress lines (and the
    cohort's progress bar) name each by its setting, as the tables name its row; the default setting stays plain."""
    from types import SimpleNamespace

    from kdbench.progress import method_label, run_name
    from kdbench.variants import pair_defaults

    pair = "resnet20:resnet8"
    default = pair_defaults([("kd", pair)])[("kd", pair)]
    spec = SimpleNamespace(
        method="kd", pair=pair, teacher="resnet20", student="resnet8", pair_set="x", method_config=dict(default)
    )
    assert run_name(spec) == "resnet20:resnet8 kd" and method_label(spec) == "kd"
    spec.method_config = {**default, "temperature": 2.0}
    assert run_name(spec) == "resnet20:resnet8 kd (temperature=2)"
    teacher = SimpleNamespace(method="ce", student="resnet20", teacher=None, pair_set="teachers", method_config={})
    assert run_name(teacher) == "teacher resnet20"
