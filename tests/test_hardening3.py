"""Issue 24: names that escape the results folder, result files that lie, unchecked teachers, unbounded reads,
validation after the expensive work, a run trained twice. One test (or one parametrized family) per item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.config import load_bench
from kdbench.errors import KdbenchError
from kdbench.results import ResultStore
from kdbench.sweep import Request, Sweep, expand
from tests.test_faults import _cli, _files, _workspace_template, workspace  # noqa: F401  (fixtures)

CPU = torch.device("cpu")
RUN = ["run", "--methods", "kd", "--pairs", "tiny"]


def _one_line_exit_2(code: int, out: str, err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _outside(ws: Path) -> set[str]:
    """Every file under the workspace's parent that is not inside the workspace (what an escape would create)."""
    return {str(p) for p in ws.parent.rglob("*") if ws not in p.parents and p != ws}


# ---------------------------------------------------------------------------------------------- 1: names


def _toml_with(ws: Path, old: str, new: str) -> None:
    path = ws / "bench.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


HOSTILE_NAMES = [
    ("protocol-dotdot", "[protocols.tiny]", '[protocols."../../../../X"]', '"tiny"', '"../../../../X"', "protocol"),
    ("protocol-slash", "[protocols.tiny]", '[protocols."a/b"]', '"tiny"', '"a/b"', "protocol"),
    ("protocol-newline", "[protocols.tiny]", '[protocols."a\\nb"]', '"tiny"', '"a\\nb"', "protocol"),
    ("protocol-nul", "[protocols.tiny]", '[protocols."a\\u0000b"]', '"tiny"', '"a\\u0000b"', "protocol"),
    ("pairset-slash", "[pairs.tiny]", '[pairs."x/y"]', None, None, "pair set"),
    ("dataset-dotdot", 'dataset = "synthetic"', 'dataset = "../synthetic"', None, None, "dataset"),
    ("seed-huge", "seeds = [0]", "seeds = [" + "9" * 18 + "]", None, None, "defaults.seeds"),
    ("teacher-seed-negative", "seeds = [0]", "seeds = [0]\nteacher_seed = -3", None, None, "teacher_seed"),
]


@pytest.mark.parametrize("case", HOSTILE_NAMES, ids=[c[0] for c in HOSTILE_NAMES])
def test_names_that_reach_file_names_are_refused_where_read(case, workspace, monkeypatch, capsys):  # noqa: F811
    _, old, new, old2, new2, words = case
    _toml_with(workspace, old, new)
    if old2:
        _toml_with(workspace, f"protocol = {old2}", f"protocol = {new2}")
    outside, inside = _outside(workspace), _files(workspace)
    pairs = "x/y" if "pairs." in new else "tiny"
    code, out, err = _cli(monkeypatch, capsys, ["run", "--methods", "kd", "--pairs", pairs], workspace)
    _one_line_exit_2(code, out, err, words)
    assert _outside(workspace) == outside and _files(workspace) == inside


def test_seeds_on_the_command_line_are_bounded(workspace, monkeypatch, capsys):  # noqa: F811
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, RUN + ["--seeds", "1" * 300], workspace)
    _one_line_exit_2(code, out, err, "--seeds")
    assert _files(workspace) == before


def test_every_path_kdbench_writes_stays_inside_the_results_folder(tmp_path):
    """The second wall: a label that slipped past every name check still cannot leave the folder."""
    from kdbench.teachers import TeacherStore

    store = ResultStore(tmp_path / "r")
    tstore = TeacherStore(store)
    for bad in ("../../x", "a/../../../b", "x\x00y", "a\nb"):
        for make in (
            store.run_path,
            store.checkpoint_path,
            store.weights_path,
            store.probe_path,
            tstore.card_path,
            tstore.weights_path,
            lambda label: store.lock(label).path,
        ):
            with pytest.raises(KdbenchError, match="refused"):
                make(bad)
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("*"))


# ---------------------------------------------------------------------------------------------- 2: files that lie


def _a_done_run(ws: Path) -> tuple[Path, dict]:
    path = next(p for p in sorted((ws / "results" / "runs").glob("*.json")) if "__fitnet__" in p.name)
    return path, json.loads(path.read_text())


def test_a_duplicated_run_id_is_counted_once_with_one_warning_naming_both(workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run["metrics"]["top1_last"] = 99.0  # a copy that differs: it must not be averaged in
    (path.parent / "copy.json").write_text(json.dumps(run))
    code, out, err = _cli(monkeypatch, capsys, ["table", "--format", "csv"], workspace)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if run["run_id"] in ln]
    assert len(warnings) == 1 and path.name in warnings[0] and "copy.json" in warnings[0], err
    assert "99.0" not in out and ",2," not in out.replace(" ", ""), out
    from kdbench.tables import collect

    col = collect(ResultStore(workspace / "results"))
    assert (col.runs["run_id"] == run["run_id"]).sum() == 1


@pytest.mark.parametrize(
    "args,field,value",
    [
        (["table", "--format", "csv", "--long"], "curve", "not a curve"),
        (["table", "--format", "csv", "--long"], "curve", {"epoch": 5, "loss": [1]}),
        (["table", "--compute"], "timings", "not timings"),
        (["table"], "curve", ["x"]),
    ],
)
def test_every_skipped_run_is_named_in_every_table_mode(args, field, value, workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run[field] = value
    path.write_text(json.dumps(run))
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    assert code == 0 and "Traceback" not in err, err
    assert path.name in err + out and field in err + out, (out, err)


# ---------------------------------------------------------------------------------------------- 3: teachers


def _teacher_files(ws: Path) -> tuple[Path, Path]:
    (weights,) = (ws / "results" / "teachers").glob("*.safetensors")
    return weights, weights.with_suffix(".json")


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_swapped_teacher_weights_are_refused_before_training(dry, workspace, monkeypatch, capsys):  # noqa: F811
    from safetensors.torch import load_file

    from kdbench.teachers import save_weights

    weights, _ = _teacher_files(workspace)
    state = load_file(str(weights))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01  # same architecture, other numbers: only the checksum tells
    save_weights(weights, state)
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, RUN + (["--dry-run"] if dry else []), workspace)
    _one_line_exit_2(code, out, err, weights.name, "weights_sha256", "delete")
    assert _files(workspace) == before


@pytest.mark.parametrize("field,value", [("top1", "high"), ("arch", 5), ("seed", "0"), ("weights", "../x")])
def test_teacher_cards_of_the_wrong_types_are_refused_when_read(field, value, workspace, monkeypatch, capsys):  # noqa: F811
    _, card_path = _teacher_files(workspace)
    card = json.loads(card_path.read_text())
    card[field] = value
    card_path.write_text(json.dumps(card))
    code, out, err = _cli(monkeypatch, capsys, RUN, workspace)
    _one_line_exit_2(code, out, err, card_path.name, field)
    code, out, err = _cli(monkeypatch, capsys, ["teachers", "list"], workspace)
    assert code == 0 and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- 4: bounded reads


def _hostile_table(ws: Path, make) -> subprocess.CompletedProcess:
    """`kdbench table` in a subprocess (a hang or a huge read must not take the test runner with it)."""
    make(ws / "results" / "runs")
    return subprocess.run(
        [sys.executable, "-m", "kdbench.cli", "table", "--results", "results"],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _fifo(runs: Path) -> None:
    os.mkfifo(runs / "fifo.json")


def _dev_zero(runs: Path) -> None:
    (runs / "zero.json").symlink_to("/dev/zero")


def _outside_link(runs: Path) -> None:
    path = next(p for p in sorted(runs.glob("*.json")) if "__fitnet__" in p.name)
    run = json.loads(path.read_text())
    run["run_id"] = "feedfeedfeedfeed"
    run["spec"]["seed"] = 7
    outside = runs.parent.parent.parent / "elsewhere.json"
    outside.write_text(json.dumps(run))
    (runs / "linked.json").symlink_to(outside)


def _long_int(runs: Path) -> None:
    path = next(p for p in sorted(runs.glob("*.json")) if "__fitnet__" in p.name)
    text = path.read_text()
    run = json.loads(text)
    run["run_id"] = "beefbeefbeefbeef"
    run["spec"]["seed"] = 8
    (runs / "digits.json").write_text(
        json.dumps(run).replace('"metrics": {', '"metrics": {"huge": ' + "7" * 5000 + ", ")
    )


@pytest.mark.parametrize(
    "make,name",
    [(_fifo, "fifo.json"), (_dev_zero, "zero.json"), (_outside_link, "linked.json"), (_long_int, "digits.json")],
)
def test_only_regular_files_inside_the_folder_are_read(make, name, workspace):  # noqa: F811
    proc = _hostile_table(workspace, make)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    skipped = [ln for ln in proc.stderr.splitlines() if name in ln]
    assert skipped and "skipped" in skipped[0], proc.stderr
    assert "| 7 |" not in proc.stdout  # nothing of the linked run reached the table


# ---------------------------------------------------------------------------------------------- 5: validate first

BEFORE_TRAINING = [
    ("at-mode", ["--methods", "at", "--set", "methods.at.mode=bogus"], "methods.at.mode"),
    ("seed-300-digits", ["--methods", "kd", "--seeds", "1" * 300], "--seeds"),
    ("simkd-factor", ["--methods", "simkd", "--set", "methods.simkd.factor=0"], "methods.simkd.factor"),
    ("ofd-kernel", ["--methods", "ofd", "--set", "methods.ofd.kernel_size=0"], "methods.ofd.kernel_size"),
    (
        "reviewkd-mid",
        ["--methods", "reviewkd", "--set", "methods.reviewkd.max_mid_channels=0"],
        "methods.reviewkd.max_mid_channels",
    ),
    ("momentum", ["--methods", "kd", "--set", "protocol.momentum=1.5"], "protocols.tiny.momentum"),
    ("weight-decay", ["--methods", "kd", "--set", "protocol.weight_decay=-1"], "protocols.tiny.weight_decay"),
    ("crd-kd-kd", ["--methods", "crd+kd+kd"], "crd+kd+kd"),
]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", BEFORE_TRAINING, ids=[c[0] for c in BEFORE_TRAINING])
def test_everything_a_run_needs_is_checked_before_any_training(case, dry, workspace, monkeypatch, capsys):  # noqa: F811
    _, args, words = case
    before = _files(workspace)
    full = ["run", *args, "--pairs", "tiny", "--results", "fresh", *(["--dry-run"] if dry else [])]
    code, out, err = _cli(monkeypatch, capsys, full, workspace)
    line = _one_line_exit_2(code, out, err, words)
    value = {"momentum": "1.5", "weight-decay": "-1"}.get(case[0])
    assert value is None or value in line, line
    assert _files(workspace) == before


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_a_runs_folder_that_is_a_file_is_refused_first(dry, workspace, monkeypatch, capsys):  # noqa: F811
    (workspace / "fresh").mkdir()
    (workspace / "fresh" / "runs").write_text("x")
    before = _files(workspace)
    args = RUN + ["--results", "fresh", *(["--dry-run"] if dry else [])]
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    _one_line_exit_2(code, out, err, "runs")
    assert _files(workspace) == before


def test_teachers_train_refuses_method_settings(workspace, monkeypatch, capsys):  # noqa: F811
    args = ["teachers", "train", "--pairs", "tiny", "--set", "methods.kd.temperature=2", "--results", "fresh"]
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    _one_line_exit_2(code, out, err, "methods.kd")


def test_unreadable_teacher_weights_are_called_unreadable(workspace, monkeypatch, capsys):  # noqa: F811
    import kdbench.teachers as teachers

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(teachers, "load_file", denied)
    monkeypatch.setattr(teachers, "sha256_file", lambda p: denied(p))
    code, out, err = _cli(monkeypatch, capsys, RUN, workspace)
    line = _one_line_exit_2(code, out, err, "unreadable", "Permission denied")
    assert "corrupt" not in line


def test_nan_teacher_weights_name_the_teacher(workspace, monkeypatch, capsys):  # noqa: F811
    from safetensors.torch import load_file

    from kdbench.teachers import save_weights, sha256_file

    weights, card_path = _teacher_files(workspace)
    state = load_file(str(weights))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] * float("nan")
    save_weights(weights, state)
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = sha256_file(weights)  # a consistent card: the numbers themselves are the problem
    card_path.write_text(json.dumps(card))
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, RUN, workspace)
    _one_line_exit_2(code, out, err, "resnet14", weights.name, "NaN")
    assert _files(workspace) == before


# ---------------------------------------------------------------------------------------------- 6: trained twice


def test_a_worker_rechecks_done_under_the_lock(tmp_path, tiny_toml, monkeypatch):
    """Another process finishes the run between this worker's first look and its lock: it is not trained again."""
    bench = load_bench(tiny_toml)
    ref = ResultStore(tmp_path / "ref")
    (spec,) = [s for s in expand(bench, Request(["kd"], ["tiny"]), ref) if s.method == "kd"]
    Sweep(ref, CPU).run([spec])
    finished = json.loads(ref.run_path(spec.label).read_text())

    store = ResultStore(tmp_path / "r")
    Sweep(store, CPU).run(expand(bench, Request(["ce"], ["tiny"]), store))  # the teacher exists
    from kdbench.results import Lock

    real = Lock.acquire

    def acquire(self):
        if self.path.name == f"{spec.label}.lock" and not store.run_path(spec.label).exists():
            store.write_run(spec.label, finished)  # the other process's result lands just before our lock
        return real(self)

    monkeypatch.setattr(Lock, "acquire", acquire)
    built: list[str] = []
    import kdbench.sweep as sweep

    real_build = sweep.build_member
    monkeypatch.setattr(sweep, "build_member", lambda s, *a, **kw: built.append(s.label) or real_build(s, *a, **kw))
    report = Sweep(store, CPU).run([spec])
    assert spec.label not in built and spec.label not in report.trained and spec.label in report.skipped, report
    assert json.loads(store.run_path(spec.label).read_text()) == json.loads(json.dumps(finished))


# ---------------------------------------------------------------------------------------------- adversarial pass


def _edit_run(ws: Path, edit) -> Path:
    path, run = _a_done_run(ws)
    edit(run)
    path.write_text(json.dumps(run))
    return path


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda r: r["spec"].update(student="../x"), "spec.student"),
        (lambda r: r["spec"].update(method="a\nb"), "spec.method"),
        (lambda r: r["spec"]["data"].update(name="x/y"), "spec.data.name"),
        (lambda r: r["metrics"].update(top1_last=-5), "percentage"),
        (lambda r: r["metrics"].update(top1_best=1000), "percentage"),
        (lambda r: r.update(teacher="resnet14"), "'teacher' must be an object"),
    ],
)
def test_run_json_that_lies_about_names_or_accuracy_is_skipped_by_name(edit, words, workspace, monkeypatch, capsys):  # noqa: F811
    path = _edit_run(workspace, edit)
    for args in (["table"], ["table", "--format", "csv", "--long"], ["table", "--compute"]):
        code, out, err = _cli(monkeypatch, capsys, args, workspace)
        assert code == 0 and "Traceback" not in err, err
        assert path.name in err and words in err, (args, err)


def test_long_csv_names_a_run_without_a_curve(workspace, monkeypatch, capsys):  # noqa: F811
    path = _edit_run(workspace, lambda r: r.pop("curve"))
    code, out, err = _cli(monkeypatch, capsys, ["table", "--format", "csv", "--long"], workspace)
    assert code == 0 and f"{path.name}: no curve" in err, err


def test_a_run_json_link_that_loops_is_skipped(workspace, monkeypatch, capsys):  # noqa: F811
    loop = workspace / "results" / "runs" / "loop.json"
    loop.symlink_to(loop)
    code, out, err = _cli(monkeypatch, capsys, ["table"], workspace)
    assert code == 0 and "loop.json" in err and "Traceback" not in err, err


def test_a_nul_byte_in_an_argument_is_one_line(workspace, monkeypatch, capsys):  # noqa: F811
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, RUN + ["--results", "res\x00x"], workspace)
    _one_line_exit_2(code, out, err, "NUL")
    assert _files(workspace) == before


def test_report_skips_probe_results_of_the_wrong_types(workspace, monkeypatch, capsys):  # noqa: F811
    probes = workspace / "results" / "probes"
    probes.mkdir()
    (probes / "p.json").write_text(json.dumps({"top1_last": 5.0, "top1_best": None, "pair": [], "dataset": {}}))
    (probes / "q.json").symlink_to("/dev/zero")
    code, out, err = _cli(monkeypatch, capsys, ["report", "--out", "rep"], workspace)
    assert code == 0 and "Traceback" not in err, err
    assert "Transfer" not in (workspace / "rep" / "report.md").read_text()
