"""Bad input (exit 2, one line, nothing written), kills at random moments, concurrent processes, security."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.cli import main
from kdbench.errors import KdbenchError

TINY_EXTRA = """
[protocols.other]
epochs = 1
batch_size = 32
lr = 0.05
lr_small = 0.01
small_lr_students = []
momentum = 0.9
weight_decay = 5e-4
milestones = [1]
lr_decay = 0.1
init_epochs = 0
"""


def _cli(monkeypatch, capsys, args: list[str], cwd: Path) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="session")
def _workspace_template(tmp_path_factory):
    """Built once: a tiny bench.toml and a results folder holding a trained teacher and a vanilla run."""
    from kdbench.config import load_bench
    from kdbench.results import ResultStore
    from kdbench.sweep import Request, Sweep, expand
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("workspace")
    (root / "bench.toml").write_text(TINY_TOML + TINY_EXTRA)
    store = ResultStore(root / "results")
    # The vanilla resnet8 run, the resnet14 teacher and one distilled run (fitnet; RUN below uses kd, which is
    # therefore still to do and loads the teacher).
    specs = expand(load_bench(root / "bench.toml"), Request(["ce", "fitnet"], ["tiny"]), store)
    Sweep(store, torch.device("cpu")).run(specs)
    return root


@pytest.fixture
def workspace(tmp_path, _workspace_template):
    """A copy of the template plus helper files: an empty folder, a file, a wrong-arch and a malicious checkpoint."""
    import shutil

    tmp_path = tmp_path / "ws"
    shutil.copytree(_workspace_template, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    # A state dict of the wrong architecture, and a malicious pickle that would run code when unpickled.
    from kdbench.models import create_model

    torch.save({"model": create_model("resnet8", num_classes=8).state_dict()}, tmp_path / "resnet8.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    return tmp_path


def _edit_toml(ws: Path, old: str, new: str) -> None:
    path = ws / "bench.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _break_teacher(ws: Path, how: str) -> None:
    (weights,) = list((ws / "results" / "teachers").glob("*.safetensors"))
    if how == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # weights of another architecture under the teacher's name
        from kdbench.models import create_model
        from kdbench.teachers import save_weights

        save_weights(weights, create_model("resnet8", num_classes=8).state_dict())


RUN = ["run", "--methods", "kd", "--pairs", "tiny"]
BAD_INPUT = [
    # (id, args, setup, expected words in the message)
    ("unknown-method", ["run", "--methods", "kdd", "--pairs", "tiny"], None, "unknown method 'kdd'"),
    ("unknown-method-list", ["run", "--methods", "kd,nope", "--pairs", "tiny"], None, "unknown method 'nope'"),
    ("method-path", ["run", "--methods", "../evil", "--pairs", "tiny"], None, "invalid method name"),
    ("no-methods", ["run", "--methods", ",", "--pairs", "tiny"], None, "no methods"),
    ("unknown-pairset", ["run", "--methods", "kd", "--pairs", "tiny3"], None, "unknown pair set"),
    ("unknown-model", ["run", "--methods", "kd", "--pairs", "resnet99:resnet8"], None, "unknown model 'resnet99'"),
    ("unknown-student", ["run", "--methods", "kd", "--pairs", "resnet14:resnt8"], None, "did you mean resnet8"),
    (
        "unknown-dataset",
        ["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "imagenet21k"],
        None,
        "unknown dataset",
    ),
    ("unknown-protocol", RUN + ["--protocol", "slow"], None, "unknown protocol 'slow'"),
    ("unknown-executor", RUN + ["--executor", "k8s"], None, "k8s"),
    ("bad-seeds", RUN + ["--seeds", "a,b"], None, "--seeds"),
    ("negative-seed", RUN + ["--seeds", "-1"], None, "non-negative"),
    ("bad-device", RUN + ["--device", "tpu"], None, "unknown device"),
    ("cuda-missing", RUN + ["--device", "cuda"], "nocuda", "no CUDA GPU"),
    ("missing-config", RUN + ["--config", "nope.toml"], None, "not found"),
    ("toml-syntax", RUN, ("toml", "[defaults]", "[defaults"), "not valid TOML"),
    ("toml-unknown-top", RUN, ("toml", "[defaults]", "[defualts]\n[defaults]"), "unknown key top level.defualts"),
    ("toml-unknown-key", RUN, ("toml", "epochs = 2", "epochs = 2\nepoch = 3"), "unknown key protocols.tiny.epoch"),
    ("toml-wrong-type", RUN, ("toml", "epochs = 2", 'epochs = "two"'), "protocols.tiny.epochs must be int"),
    ("toml-negative-epochs", RUN, ("toml", "epochs = 2", "epochs = -2"), "must be >= 1"),
    ("toml-empty-seeds", RUN, ("toml", "seeds = [0]", "seeds = []"), "defaults.seeds must be a non-empty"),
    ("toml-bad-milestones", RUN, ("toml", "milestones = [1]", "milestones = [3, 1]"), "milestones"),
    ("toml-bad-pair", RUN, ("toml", 'pairs = ["resnet14:resnet8"]', 'pairs = ["resnet14"]'), "teacher:student"),
    ("toml-unknown-method", RUN, ("toml", "[pairs.tiny]", "[methods.nope]\nx = 1\n[pairs.tiny]"), "[methods.nope]"),
    (
        "toml-method-key",
        RUN,
        ("toml", "[pairs.tiny]", "[methods.kd]\ntemprature = 1\n[pairs.tiny]"),
        "unknown setting 'temprature'",
    ),
    ("toml-slurm-key", RUN, ("toml", "[pairs.tiny]", "[slurm]\ngpu = 1\n[pairs.tiny]"), "unknown key slurm.gpu"),
    ("set-unknown-key", RUN + ["--set", "methods.kd.temprature=2"], None, "valid: ce_weight"),
    ("set-no-equals", RUN + ["--set", "methods.kd.temperature"], None, "KEY=VALUE"),
    ("set-bad-prefix", RUN + ["--set", "optim.lr=2"], None, "methods.NAME.KEY or protocol.KEY"),
    ("set-other-method", RUN + ["--set", "methods.crd.weight=2"], None, "not in this run"),
    ("set-wrong-type", RUN + ["--set", "methods.kd.temperature=hot"], None, "must be float"),
    ("set-protocol-key", RUN + ["--set", "protocol.epoch=3"], None, "unknown key protocol.epoch"),
    ("set-protocol-negative", RUN + ["--set", "protocol.epochs=-1"], None, "must be >= 1"),
    (
        "data-root-empty",
        ["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--data-root", "empty"],
        None,
        "cifar-100-python",
    ),
    (
        "tiny-root-empty",
        ["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "tinyimagenet", "--data-root", "empty"],
        None,
        "empty",
    ),
    ("results-not-writable", RUN + ["--results", "a_file/results"], None, "not writable"),
    ("teacher-truncated", RUN + ["--results", "results"], ("teacher", "truncate"), "corrupt or truncated"),
    # (checked against the card's weights_sha256 before any training: issue 24)
    ("teacher-wrong-arch", RUN + ["--results", "results"], ("teacher", "arch"), "do not match weights_sha256"),
    (
        "import-malicious",
        ["teachers", "import", "evil.pth", "--arch", "resnet8", "--dataset", "cifar100", "--results", "imp"],
        None,
        "weights-only",
    ),
    (
        "import-wrong-arch",
        [
            "teachers",
            "import",
            "resnet8.pth",
            "--arch",
            "resnet14",
            "--dataset",
            "cifar100",
            "--num-classes",
            "8",
            "--results",
            "imp",
        ],
        None,
        "does not match architecture",
    ),
    (
        "import-missing",
        ["teachers", "import", "nope.pth", "--arch", "resnet8", "--dataset", "cifar100", "--results", "imp"],
        None,
        "not found",
    ),
    (
        "import-bad-arch",
        ["teachers", "import", "resnet8.pth", "--arch", "resnet9", "--dataset", "cifar100", "--results", "imp"],
        None,
        "unknown model",
    ),
    (
        "import-bad-dataset",
        ["teachers", "import", "resnet8.pth", "--arch", "resnet8", "--dataset", "mnist", "--results", "imp"],
        None,
        "unknown dataset",
    ),
    ("table-metric", ["table", "--results", "results", "--metric", "top3"], None, "unknown metric"),
    ("table-empty", ["table", "--results", "empty"], None, "no runs"),
    ("list-unknown", ["list", "gpus"], None, "gpus"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_nothing_written(case, workspace, monkeypatch, capsys):
    _, args, setup, expected = case
    if setup == "nocuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif setup and setup[0] == "toml":
        _edit_toml(workspace, setup[1], setup[2])
    elif setup and setup[0] == "teacher":
        _break_teacher(workspace, setup[1])
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert _files(workspace) == before, "bad input must not write anything"
    assert not (workspace / "pwned").exists()


@pytest.mark.slow
def test_fsp_on_incompatible_pair_is_na_not_an_error(workspace, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, ["run", "--methods", "fsp", "--pairs", "tiny2"], workspace)
    assert code == 0, err
    code, out, err = _cli(monkeypatch, capsys, ["table", "--results", "results"], workspace)
    (row,) = [ln for ln in out.splitlines() if ln.startswith("| fsp |")]
    assert code == 0 and row.split("|")[3].strip() == "n/a", row  # the wrn_16_2:wrn_16_1 column


def test_malformed_json_is_reported_and_skipped_by_table(workspace, monkeypatch, capsys):
    runs = workspace / "results" / "runs"
    (runs / "half-written.json").write_text('{"schema": 1, "run_id": "ab')
    good = next(p for p in runs.glob("*.json") if p.name != "half-written.json")
    edited = json.loads(good.read_text())
    edited["metrics"]["top1_last"] = "high"
    (runs / "hand-edited.json").write_text(json.dumps(edited))
    code, out, err = _cli(monkeypatch, capsys, ["table", "--results", "results"], workspace)
    assert code == 0, err
    assert "half-written.json" in err and "hand-edited.json" in err
    assert "| fitnet |" in out


@pytest.mark.slow
def test_failed_run_shows_as_failed_in_table(workspace, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, RUN + ["--set", "methods.kd.kd_weight=1e39"], workspace)
    assert code == 0, err
    code, out, err = _cli(monkeypatch, capsys, ["table", "--results", "results"], workspace)
    # a run at another setting than the default is a row of its own, named by that setting
    (row,) = [ln for ln in out.splitlines() if ln.startswith("| kd (kd_weight=1e+39) |")]
    assert row.split("|")[2].strip() == "failed", row


def test_plugins_allow_list_and_builtin_only(monkeypatch):
    from kdbench.method import discover

    monkeypatch.setenv("KDBENCH_BUILTIN_ONLY", "1")
    assert all(e.builtin for e in discover().values())
    assert "kd" in discover()


# ---------------------------------------------------------------------------------------------- kills


def _kdbench(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdbench.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _final_metrics(results: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted((results / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        out[run["spec"]["method"] + "/" + str(run["spec"]["student"])] = (
            run["status"],
            run["metrics"].get("top1_last"),
            run["metrics"].get("top1_best"),
            json.dumps(run["curve"]["loss"], sort_keys=True),
        )
    return out


def _wait_for_writes(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Block until the sweep has written n distinct file versions under folder (or has exited)."""
    seen: set[tuple[str, int]] = set()
    end = time.monotonic() + timeout
    while proc.poll() is None and len(seen) < n and time.monotonic() < end:
        for p in folder.rglob("*"):
            try:
                if p.is_file():
                    seen.add((str(p), p.stat().st_mtime_ns))
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_metrics(tmp_path, tiny_toml):
    """SIGKILL a sweep at random moments (mid-epoch, mid-checkpoint, mid-JSON, during the teacher or inside a
    three-epoch init stage of AB or FT), several times over, then finish it: the metrics equal those of an
    uninterrupted sweep. Each kill waits for a random number of file writes plus a random delay, so it lands while
    the sweep works on any machine."""
    (tmp_path / "bench.toml").write_text(tiny_toml.read_text())
    args = [
        "run",
        "--methods",
        "kd,ab,ft,crd",
        "--pairs",
        "tiny",
        "--device",
        "cpu",
        "--set",
        "protocol.epochs=8",
        "--set",
        "protocol.init_epochs=3",
    ]
    ref = _kdbench(args + ["--results", "ref"], tmp_path)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    expected = _final_metrics(tmp_path / "ref")
    rng = random.Random(1234)
    kills = 0
    for trial in range(3):
        results = tmp_path / f"killed{trial}"
        for _ in range(3):
            proc = _kdbench(args + ["--results", results.name], tmp_path)
            _wait_for_writes(results, rng.randint(1, 30), proc)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        final = _kdbench(args + ["--results", results.name], tmp_path)
        assert final.wait(timeout=600) == 0, final.stderr.read().decode()
        got = _final_metrics(results)
        diff = {k: (got.get(k), expected.get(k)) for k in set(got) | set(expected) if got.get(k) != expected.get(k)}
        assert not diff, f"trial {trial}: {diff}"
    assert kills >= 6, f"only {kills} kills landed while the sweep ran"


@pytest.mark.slow
def test_two_processes_on_one_folder_never_train_a_run_twice(tmp_path, tiny_toml):
    (tmp_path / "bench.toml").write_text(tiny_toml.read_text())
    args = [
        "run",
        "--methods",
        "kd,fitnet,at,crd",
        "--pairs",
        "tiny",
        "--seeds",
        "0,1",
        "--no-cohort",
        "--device",
        "cpu",
        "--results",
        "shared",
    ]
    procs = [_kdbench(args, tmp_path) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    runs = [json.loads(p.read_text()) for p in (tmp_path / "shared" / "runs").glob("*.json")]
    assert len(runs) == 2 * 4 + 1  # 8 students + the teacher's vanilla run, each exactly once
    assert len({r["run_id"] for r in runs}) == len(runs)
    assert not list((tmp_path / "shared" / "locks").glob("*.lock"))
    assert len(list((tmp_path / "shared" / "teachers").glob("*.json"))) == 1


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from kdbench.results import Lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = tmp_path / "x.lock"
    lock_path.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "time": time.time()}))
    assert Lock(lock_path).acquire()
    assert not Lock(lock_path).acquire()  # held by us, alive


def test_weights_only_loading_refuses_code(tmp_path):
    from kdbench.config import DataSpec
    from kdbench.results import ResultStore
    from kdbench.teachers import TeacherStore

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(KdbenchError, match="weights-only"):
        TeacherStore(ResultStore(tmp_path / "r")).import_checkpoint(
            tmp_path / "evil.pth", "resnet8", DataSpec("cifar100"), 100
        )
    assert not (tmp_path / "pwned").exists()


def test_run_labels_stay_inside_the_results_folder(tiny_toml):
    from kdbench.config import check_safe_name, load_bench
    from kdbench.sweep import Request, expand

    for bad in ("../x", "a/b", "..", ".", "x\\y", ""):
        with pytest.raises(KdbenchError):
            check_safe_name("method", bad)
    for spec in expand(load_bench(tiny_toml), Request(["all"], ["tiny"])):
        assert "/" not in spec.label and not spec.label.startswith(".")


# ---------------------------------------------------------------------------------------------- slurm


def test_slurm_batch_script_and_local_submitit_executor(tmp_path, tiny_toml):
    pytest.importorskip("submitit")
    from kdbench.config import SlurmSettings, load_bench
    from kdbench.results import ResultStore
    from kdbench.slurm import cohorts, sbatch_script, submit
    from kdbench.sweep import Request, expand

    store = ResultStore(tmp_path / "res")
    specs = expand(load_bench(tiny_toml), Request(["kd", "fitnet"], ["tiny", "tiny2"]), store)
    settings = SlurmSettings(partition="gpu", time_min=90, gpus_per_task=1, cpus_per_task=6)
    groups = cohorts(store, specs)
    assert len(groups) == 2
    script = sbatch_script(store, settings, len(groups))
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --array=0-1%",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, line
    # submitit's local executor runs the same array tasks as subprocesses, without a cluster.
    jobs = submit(store, specs, SlurmSettings(cluster="local", time_min=10, cpus_per_task=1), cohort=True)
    results = [j.result() for j in jobs]
    assert sum(len(r["trained"]) for r in results) == len(specs)
    assert all(store.finished(s.label) for s in specs)
    assert submit(store, specs, SlurmSettings(cluster="local")) == []  # nothing left: nothing submitted
    assert hasattr(jobs[0].submission().function, "checkpoint")  # requeue on preemption / timeout


@pytest.mark.slow
def test_local_executor_with_two_workers_trains_each_run_once(tmp_path, tiny_toml):
    from kdbench.config import load_bench
    from kdbench.results import ResultStore
    from kdbench.sweep import Request, Sweep, expand, run_local

    store = ResultStore(tmp_path / "res")
    specs = expand(load_bench(tiny_toml), Request(["kd", "fitnet"], ["tiny", "tiny2"]), store)
    report = run_local(store, specs, ["cpu", "cpu"])
    assert {s.label for s in specs} <= set(report.trained)
    runs = [json.loads(p.read_text()) for p in store.runs_dir.glob("*.json")]
    assert len(runs) == len(specs) + 2  # + the two teachers' vanilla runs, each once
    assert len({r["run_id"] for r in runs}) == len(runs)
    assert len(list(store.teachers_dir.glob("*.json"))) == 2
    # The workers train with this process's thread count, so the numbers are those of a single process.
    assert {r["environment"]["torch_threads"] for r in runs} == {torch.get_num_threads()}
    single = ResultStore(tmp_path / "single")
    Sweep(single, torch.device("cpu")).run(specs)
    assert _final_metrics(single.root) == _final_metrics(store.root)


def test_teachers_train_trains_once_then_reuses(monkeypatch, capsys, workspace):
    """`kdbench teachers train` shares run's selection options: it trains the pair's teacher into a fresh
    results folder (a card with its top-1), reuses it on a second call, and a bad seed is one line, exit 2."""
    args = ["teachers", "train", "--pairs", "tiny", "--seeds", "0", "--results", "fresh"]
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    assert code == 0, err
    assert "resnet14" in out and "top-1" in out
    cards = list((workspace / "fresh" / "teachers").glob("*.json"))
    assert len(cards) == 1 and json.loads(cards[0].read_text())["arch"] == "resnet14"
    before = cards[0].stat().st_mtime_ns
    code, out2, err = _cli(monkeypatch, capsys, args, workspace)
    assert code == 0 and out2 == out, err
    assert cards[0].stat().st_mtime_ns == before, "the second call reuses the teacher"
    code, out, err = _cli(monkeypatch, capsys, [*args[:5], "x", *args[6:]], workspace)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
