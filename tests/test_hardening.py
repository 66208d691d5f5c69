"""Issue 13: crashes, races and silent losses found by an adversarial pass, one test per mechanism."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdbench.config import load_bench
from kdbench.errors import KdbenchError
from kdbench.results import Lock, ResultStore
from kdbench.sweep import Request, Sweep, expand
from tests.test_faults import _cli, _files, _workspace_template, workspace  # noqa: F401  (fixtures)

CPU = torch.device("cpu")
RUN = ["run", "--methods", "kd", "--pairs", "tiny"]


# ---------------------------------------------------------------------------------------------- 1, 9: validation

BAD_SETTINGS = [
    ("lr-nan", RUN + ["--set", "protocol.lr=nan"], "protocols.tiny.lr must be a finite number"),
    ("lr-inf", RUN + ["--set", "protocol.lr=inf"], "finite"),
    ("lr-overflow", RUN + ["--set", "protocol.lr=1e400"], "finite"),
    ("momentum-nan", RUN + ["--set", "protocol.momentum=nan"], "finite"),
    ("weight-decay-inf", RUN + ["--set", "protocol.weight_decay=inf"], "finite"),
    ("temperature-nan", RUN + ["--set", "methods.kd.temperature=nan"], "methods.kd.temperature must be a finite"),
    ("temperature-inf", RUN + ["--set", "methods.kd.temperature=inf"], "finite"),
    ("temperature-zero", RUN + ["--set", "methods.kd.temperature=0"], "methods.kd.temperature must be > 0"),
    ("temperature-negative", RUN + ["--set", "methods.kd.temperature=-4"], "must be > 0"),
    ("ce-weight-negative", RUN + ["--set", "methods.kd.ce_weight=-1"], "methods.kd.ce_weight must be >= 0"),
    ("kd-weight-nan", RUN + ["--set", "methods.kd.kd_weight=nan"], "finite"),
    ("crd-momentum", ["run", "--methods", "crd", "--pairs", "tiny", "--set", "methods.crd.nce_m=1.0"], "[0, 1)"),
    ("crd-temperature", ["run", "--methods", "crd", "--pairs", "tiny", "--set", "methods.crd.nce_t=0"], "> 0"),
    (
        "rrd-queue-update",
        ["run", "--methods", "rrd", "--pairs", "tiny", "--set", "methods.rrd.queue_update=never"],
        "one of before, after",
    ),
    (
        "rkd-angle-weight",
        ["run", "--methods", "rkd", "--pairs", "tiny", "--set", "methods.rkd.angle_weight=-50"],
        ">= 0",
    ),
    ("empty-protocol", RUN + ["--protocol", ""], "unknown protocol ''"),
    ("empty-results", RUN + ["--results", ""], "--results ''"),
    (
        "no-batch-left",
        RUN + ["--set", "protocol.drop_last=true", "--set", "protocol.batch_size=1000"],
        "leaves no batch",
    ),
    ("image-size-zero", RUN + ["--image-size", "0"], "--image-size"),
    ("workers-unbounded", RUN + ["--workers", "100000", "--device", "cpu"], "--workers 100000: at most"),
    (
        "import-num-classes",
        [
            "teachers",
            "import",
            "resnet8.pth",
            "--arch",
            "resnet8",
            "--dataset",
            "cifar100",
            "--num-classes",
            "-1",
            "--results",
            "imp",
        ],
        "--num-classes",
    ),
    (
        "import-image-size",
        [
            "teachers",
            "import",
            "resnet8.pth",
            "--arch",
            "resnet8",
            "--dataset",
            "cifar100",
            "--image-size",
            "-7",
            "--results",
            "imp",
        ],
        "--image-size",
    ),
]


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_numeric_settings_are_one_line_exit_2_nothing_written(case, workspace, monkeypatch, capsys):  # noqa: F811
    _, args, expected = case
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, args, workspace)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert _files(workspace) == before


def test_non_finite_protocol_value_in_bench_toml_is_refused(tiny_toml):
    tiny_toml.write_text(tiny_toml.read_text().replace("lr = 0.05", "lr = nan", 1))
    with pytest.raises(KdbenchError, match="protocols.tiny.lr must be a finite number"):
        load_bench(tiny_toml)


def test_failed_run_record_with_non_finite_values_is_written(tmp_path, tiny_toml):
    store = ResultStore(tmp_path / "r")
    (spec,) = expand(load_bench(tiny_toml), Request(["ce"], ["tiny"]), store)
    record = {
        "schema": 1,
        "run_id": spec.run_id,
        "status": "failed",
        "reason": "x",
        "spec": spec.to_dict(),
        "method": {},
        "metrics": {"ece": float("nan")},
        "curve": {"lr": [float("inf"), 0.1]},
    }
    path = store.write_run(spec.label, record)
    saved = json.loads(path.read_text())  # strict JSON: no NaN
    assert saved["curve"]["lr"] == [None, 0.1] and saved["metrics"]["ece"] is None
    assert saved["non_finite"] == ["metrics.ece", "curve.lr[0]"]


def test_one_failing_member_never_costs_its_cohort_mates_their_results(tmp_path, tiny_toml, monkeypatch):
    import kdbench.train as train

    real = train.main_terms

    def flaky(m, *args, **kw):
        if m.spec.method == "fitnet" and m.epoch >= 1:
            raise RuntimeError("boom in the second epoch")
        return real(m, *args, **kw)

    monkeypatch.setattr(train, "main_terms", flaky)
    store = ResultStore(tmp_path / "r")
    specs = expand(load_bench(tiny_toml), Request(["kd", "fitnet"], ["tiny"]), store)
    report = Sweep(store, CPU).run(specs)
    runs = {r["spec"]["method"]: r for _, r, _ in store.iter_runs()}
    assert runs["kd"]["status"] == "done" and math.isfinite(runs["kd"]["metrics"]["top1_last"])
    assert runs["fitnet"]["status"] == "failed" and "boom" in runs["fitnet"]["reason"]
    assert runs["fitnet"]["failed_epoch"] == 2
    assert any("fitnet" in f for f in report.failed)


def test_the_members_training_in_each_epoch_are_recorded(tmp_path, tiny_toml, monkeypatch):
    """`kdbench table --compute` shares an epoch's wall time between the members that trained in it."""
    import kdbench.train as train

    real = train.main_terms

    def flaky(m, *args, **kw):
        if m.spec.method == "fitnet":
            raise RuntimeError("boom in the first epoch")
        return real(m, *args, **kw)

    monkeypatch.setattr(train, "main_terms", flaky)
    store = ResultStore(tmp_path / "r")
    Sweep(store, CPU).run(expand(load_bench(tiny_toml), Request(["kd", "fitnet"], ["tiny"]), store))
    runs = {r["spec"]["method"]: r for _, r, _ in store.iter_runs()}
    assert runs["kd"]["timings"]["cohort_size"] == 2
    assert runs["kd"]["timings"]["epoch_cohort_sizes"] == [2, 1]  # fitnet dropped out after the first epoch
    assert runs["fitnet"]["timings"]["epoch_cohort_sizes"] == [2]


def test_a_run_that_cannot_be_built_fails_alone(tmp_path, tiny_toml, monkeypatch):
    import kdbench.sweep as sweep

    real = sweep.build_member

    def build(spec, *args, **kw):
        if spec.method == "cc":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")  # e.g. methods.cc.embed_dim=1e9
        return real(spec, *args, **kw)

    monkeypatch.setattr(sweep, "build_member", build)
    store = ResultStore(tmp_path / "r")
    Sweep(store, CPU).run(expand(load_bench(tiny_toml), Request(["kd", "cc"], ["tiny"]), store))
    runs = {r["spec"]["method"]: r for _, r, _ in store.iter_runs()}
    assert runs["kd"]["status"] == "done"
    assert runs["cc"]["status"] == "failed" and "can't allocate" in runs["cc"]["reason"]


def test_deeply_nested_files_are_malformed_not_a_crash(tmp_path, tiny_toml):
    from kdbench.results import load_run

    deep = "[" * 100_000 + "]" * 100_000
    tiny_toml.write_text(f"x = {deep}\n")
    with pytest.raises(KdbenchError, match="not valid TOML"):
        load_bench(tiny_toml)
    (tmp_path / "run.json").write_text(deep)
    with pytest.raises(KdbenchError, match="unreadable JSON"):
        load_run(tmp_path / "run.json")


def test_import_refuses_weights_holding_nan(tmp_path):
    from kdbench.config import DataSpec
    from kdbench.models import create_model
    from kdbench.teachers import TeacherStore

    state = create_model("resnet8", num_classes=8).state_dict()
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save({"model": state}, tmp_path / "nan.pth")
    with pytest.raises(KdbenchError, match="NaN or infinite"):
        TeacherStore(ResultStore(tmp_path / "r")).import_checkpoint(
            tmp_path / "nan.pth", "resnet8", DataSpec("synthetic"), 8
        )
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- 2: init stages


class _Killed(Exception):
    pass


def _train(spec, data, teacher, ckpt: Path, kill_at: int | None = None):
    """Build, resume from ckpt, run the init stage and the main stage; raise _Killed after kill_at init batches."""
    from kdbench.train import build_member, load_checkpoint, run_init_stage, train_cohort

    m = build_member(spec, data, teacher, CPU)
    m.checkpoint_path = ckpt
    load_checkpoint(m)
    seen = [0]

    def on_batch():
        seen[0] += 1
        if kill_at is not None and seen[0] == kill_at:
            raise _Killed

    run_init_stage(m, data, teacher, CPU, on_batch=on_batch)
    train_cohort([m], data, teacher, CPU)
    return m


@pytest.mark.parametrize("method", ["ab", "ft", "fsp"])
def test_kill_inside_an_init_stage_resumes_to_identical_metrics(method, tmp_path, tiny_toml, tiny_data):
    from kdbench.models import create_model

    specs = expand(load_bench(tiny_toml), Request([method], ["tiny"], sets=["protocol.init_epochs=3"]))
    (spec,) = [s for s in specs if s.method == method]
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=8).eval()
    ref = _train(spec, tiny_data, teacher, tmp_path / "ref.pt")
    ckpt = tmp_path / "killed.pt"
    batches = math.ceil(96 / 32)
    with pytest.raises(_Killed):  # killed in the middle of the third init epoch, after two checkpoints
        _train(spec, tiny_data, teacher, ckpt, kill_at=2 * batches + 2)
    assert torch.load(ckpt, weights_only=True)["init_done"] == 2
    got = _train(spec, tiny_data, teacher, ckpt)
    assert got.curve == ref.curve
    assert got.last_eval == ref.last_eval
    for (k, a), b in zip(ref.student.state_dict().items(), got.student.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------- 3: checkpoints


def test_partly_loadable_checkpoint_is_discarded_whole_and_reported(tmp_path, tiny_toml, tiny_data):
    from kdbench.models import create_model
    from kdbench.train import build_member, load_checkpoint, save_checkpoint, train_cohort

    teacher = create_model("resnet14", num_classes=8).eval()
    (spec,) = [s for s in expand(load_bench(tiny_toml), Request(["crd"], ["tiny"])) if s.method == "crd"]
    m = build_member(spec, tiny_data, teacher, CPU)
    m.checkpoint_path = tmp_path / "c.pt"
    train_cohort([m], tiny_data, teacher, CPU, save=False)
    state = {k: v for k, v in m.method.state_dict().items()}
    state.pop(next(iter(state)))  # the student part loads, the method part does not
    save_checkpoint(m)
    ckpt = torch.load(m.checkpoint_path, weights_only=True)
    ckpt["method"] = state
    torch.save(ckpt, m.checkpoint_path)

    fresh = build_member(spec, tiny_data, teacher, CPU)
    again = build_member(spec, tiny_data, teacher, CPU)
    again.checkpoint_path = m.checkpoint_path
    assert load_checkpoint(again) is False
    assert again.epoch == 0 and again.discarded and "starts again" in again.discarded
    for (k, a), b in zip(fresh.student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), f"{k}: the student was loaded from a checkpoint that was then discarded"


def test_sweep_reports_a_discarded_checkpoint(tmp_path, tiny_toml):
    store = ResultStore(tmp_path / "r")
    specs = expand(load_bench(tiny_toml), Request(["kd"], ["tiny"]), store)
    (kd,) = [s for s in specs if s.method == "kd"]
    store.checkpoint_path(kd.label).parent.mkdir(parents=True)
    store.checkpoint_path(kd.label).write_bytes(b"not a checkpoint")
    said: list[str] = []
    Sweep(store, CPU, log=said.append).run(specs)
    assert any("not used" in s and kd.label in s for s in said), said


# ---------------------------------------------------------------------------------------------- 4: locks


def _jitter(seed: int) -> None:
    """Adversarial scheduling: a random pause of up to 3 ms before every file operation a lock makes, so that the
    interleavings that break a takeover (read stale, someone else replaces it, remove theirs) happen often. A correct
    lock is correct under any interleaving."""
    import random

    rng = random.Random(seed)

    def slow(f):
        def g(*a, **kw):
            time.sleep(rng.uniform(0, 0.003))
            return f(*a, **kw)

        return g

    for name in ("unlink", "read_text", "read_bytes", "stat"):
        setattr(Path, name, slow(getattr(Path, name)))
    for name in ("open", "rename", "link", "stat", "fstat"):
        setattr(os, name, slow(getattr(os, name)))


def _racer(base: Path, me: int, n: int, trials: int, start: float, every: float, env: dict[str, str]) -> None:
    os.environ.update(env)
    _jitter(me)
    for t in range(trials):
        time.sleep(max(0.0, start + t * every - time.time()))
        lock = Lock(base / f"t{t}" / "x.lock")
        tried = time.time()
        got = lock.acquire()
        held = time.time()
        if got:  # hold it until every other process has tried (and written its line), however slow the machine
            end = time.monotonic() + 60  # reached only when a second process also owns it: the test then fails
            while len(list((base / f"t{t}").glob("p*"))) < n - 1 and time.monotonic() < end:
                time.sleep(0.01)
        (base / f"t{t}" / f"p{me}").write_text(f"{int(got)} {tried} {held} {time.time()}")
        if got:
            lock.release()


def _race(tmp_path: Path, n: int, trials: int, env: dict[str, str], stale: str):
    """n forked processes race for a stale lock in each of `trials` rounds: (overlapping ownerships, attempts refused
    before the owner let go, i.e. that raced)."""
    import multiprocessing as mp

    for t in range(trials):
        (tmp_path / f"t{t}").mkdir()
        (tmp_path / f"t{t}" / "x.lock").write_text(stale)
    start, every = time.time() + 1.0, 1.0
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_racer, args=(tmp_path, i, n, trials, start, every, env)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=1200)
        assert p.exitcode == 0
    overlaps, contended = [], 0
    for t in range(trials):
        rows = [(tmp_path / f"t{t}" / f"p{i}").read_text().split() for i in range(n)]
        owned = sorted((float(r[2]), float(r[3])) for r in rows if r[0] == "1")
        overlaps += [(a, b) for a, b in zip(owned, owned[1:]) if b[0] < a[1]]
        contended += sum(r[0] == "0" and any(float(r[1]) <= o[1] for o in owned) for r in rows)
    return overlaps, contended


def _check_race(overlaps, contended, n, trials) -> None:
    assert not overlaps, f"two processes owned the lock at the same time: {overlaps}"
    assert contended >= n * trials // 2, f"only {contended} attempts met a held lock: the race was not exercised"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_many_processes_racing_for_one_stale_lock_give_exactly_one_owner(tmp_path):
    stale = json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "time": time.time()})
    _check_race(*_race(tmp_path, n=16, trials=10, env={}, stale=stale), n=16, trials=10)


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_many_processes_racing_with_the_lock_file_fallback_give_exactly_one_owner(tmp_path):
    stale = json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "time": time.time(), "nonce": "old"})
    _check_race(*_race(tmp_path, n=16, trials=10, env={"KDBENCH_LOCKS": "file"}, stale=stale), n=16, trials=10)


def test_lock_whose_pid_was_reused_by_a_live_process_is_free(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "time": time.time()}))
    lock = Lock(path)
    assert lock.acquire()
    assert not Lock(path).acquire()
    lock.release()
    assert not path.exists()


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from kdbench.results import Lock
        assert Lock(__import__("pathlib").Path({str(path)!r})).acquire()
        print("held", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert not Lock(path).acquire()
    holder.kill()
    holder.wait()
    assert Lock(path).acquire()


def test_live_owner_heartbeat_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / "x.lock"
    lock = Lock(path, heartbeat_s=0.05)
    assert lock.acquire()

    def beat() -> float | None:
        try:  # the owner rewrites the file in place: a read may land between its truncate and its write
            return json.loads(path.read_text())["time"]
        except ValueError:
            return None

    end = time.monotonic() + 120  # polls until the beat lands: a bound on the wait, not a race with the clock
    while (first := beat()) is None and time.monotonic() < end:
        time.sleep(0.01)
    while (now := beat()) in (None, first) and time.monotonic() < end:
        time.sleep(0.05)
    assert first is not None and now is not None and now > first
    lock.release()


def test_lock_file_fallback_takes_over_only_a_silent_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_LOCKS", "file")
    path = tmp_path / "x.lock"
    other_host = {"pid": 1, "host": "another-node", "nonce": "n"}
    path.write_text(json.dumps({**other_host, "time": time.time() - 60}))
    assert not Lock(path, stale_s=600).acquire()  # its heartbeat is recent: alive on its node
    path.write_text(json.dumps({**other_host, "time": time.time() - 601}))
    lock = Lock(path, stale_s=600)
    assert lock.acquire() and lock.mode == "file"
    lock.release()


def test_file_system_without_flock_falls_back_to_lock_files(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted noflock

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = Lock(tmp_path / "x.lock")
    assert lock.acquire() and lock.mode == "file"
    assert not Lock(tmp_path / "x.lock").acquire()
    lock.release()
    assert not (tmp_path / "x.lock").exists()


# ---------------------------------------------------------------------------------------------- 5: workers


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_workers_die_with_a_killed_parent(tmp_path, tiny_toml):
    (tmp_path / "bench.toml").write_text(tiny_toml.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kdbench.cli",
            "run",
            "--methods",
            "kd,fitnet",
            "--pairs",
            "tiny,tiny2",
            "--device",
            "cpu",
            "--workers",
            "2",
            "--set",
            "protocol.epochs=1000000",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    # The workers report their first epoch (a run of a million epochs cannot finish first): they are training.
    seen = _wait_for_line(parent.stderr, "| epoch 1/1000000 |")
    kids = children()
    assert parent.poll() is None and len(kids) >= 2, "".join(seen)
    parent.kill()
    parent.wait()
    parent.stderr.close()
    end = time.monotonic() + 120  # a bound on a wait, not a race: the kernel signals them at once
    alive = kids
    while alive and time.monotonic() < end:
        time.sleep(0.2)
        alive = [k for k in alive if Path(f"/proc/{k}").exists() and "Z" not in _state(k)]
    assert not alive, f"orphaned workers {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_run_records_the_thread_count(tmp_path, tiny_toml):
    store = ResultStore(tmp_path / "r")
    Sweep(store, CPU).run(expand(load_bench(tiny_toml), Request(["ce"], ["tiny"]), store))
    for _, run, _ in store.iter_runs():
        assert run["environment"]["torch_threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- 6: tables


def _a_done_run(ws: Path) -> tuple[Path, dict]:
    runs = ws / "results" / "runs"
    path = next(p for p in sorted(runs.glob("*.json")) if "__fitnet__" in p.name)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "field,value",
    [
        (("spec", "data"), "cifar100"),
        (("spec", "teacher"), "resnet14"),
        (("spec", "method"), {"name": "kd"}),
        (("spec", "seed"), [0]),
        (("spec", "student"), 8),
        (("spec", "protocol"), "tiny"),
    ],
)
def test_table_reports_and_skips_run_json_of_the_wrong_types(field, value, workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run[field[0]][field[1]] = value
    bad = path.with_name("edited.json")
    bad.write_text(json.dumps(run))
    for cmd in (["table", "--results", "results"], ["report", "--results", "results", "--out", "rep"]):
        code, out, err = _cli(monkeypatch, capsys, cmd, workspace)
        assert code == 0, err
        assert "edited.json" in err and f"spec.{field[1]}" in err and "Traceback" not in err


def test_table_says_when_a_done_runs_metric_is_not_a_number(workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run["metrics"]["top1_last"] = float("nan")
    path.write_text(json.dumps(run))  # json writes NaN
    run["metrics"]["top1_last"] = 50.0
    run["metrics"]["cka"] = float("nan")
    path.with_name("cka.json").write_text(json.dumps(run))
    code, out, err = _cli(monkeypatch, capsys, ["table", "--results", "results"], workspace)
    assert code == 0, err
    assert f"{path.name}: metrics.top1_last must be a finite number" in err
    assert "cka.json: metrics cka not a finite number" in err


def test_methods_trained_without_a_teacher_appear_in_tables(workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run["spec"]["teacher"] = None
    run["spec"]["method"] = run["method"]["name"] = "selfdistill"
    run["run_id"] = "0" * 16
    path.with_name("selfdistill.json").write_text(json.dumps(run))
    code, out, err = _cli(monkeypatch, capsys, ["table", "--results", "results"], workspace)
    assert code == 0, err
    (row,) = [ln for ln in out.splitlines() if ln.startswith("| selfdistill |")]
    assert f"{run['metrics']['top1_last']:.2f}" in row, row


# ---------------------------------------------------------------------------------------------- 7: probe paths


@pytest.mark.parametrize("weights", ["../../../../etc/passwd", "/etc/passwd", "weights/../../outside.safetensors"])
def test_probe_refuses_weights_outside_the_results_folder(weights, workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    run["weights"] = weights
    path.write_text(json.dumps(run))
    code, out, err = _cli(
        monkeypatch,
        capsys,
        ["probe", str(path.relative_to(workspace)), "--dataset", "synthetic", "--protocol", "smoke", "--device", "cpu"],
        workspace,
    )
    assert code == 2 and "outside the results folder" in err and "delete" not in err, err


# ---------------------------------------------------------------------------------------------- 8: one line


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_report_out_at_a_file_or_read_only_folder_is_one_line(workspace, monkeypatch, capsys):  # noqa: F811
    ro = workspace / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for out in ("a_file", "ro/report"):
            code, _, err = _cli(monkeypatch, capsys, ["report", "--results", "results", "--out", out], workspace)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            if os.geteuid() == 0 and out.startswith("ro"):
                continue  # root writes anywhere
            assert code == 2 and lines[-1].startswith("error: --out") and "Traceback" not in err, err
    finally:
        ro.chmod(0o700)


def test_import_with_a_nan_accuracy_writes_a_card(workspace, monkeypatch, capsys):  # noqa: F811
    from kdbench.models import create_model

    torch.save(
        {"model": create_model("resnet8", num_classes=8).state_dict(), "accuracy": torch.tensor(float("nan"))},
        workspace / "nan.pth",
    )
    code, out, err = _cli(
        monkeypatch,
        capsys,
        [
            "teachers",
            "import",
            "nan.pth",
            "--arch",
            "resnet8",
            "--dataset",
            "synthetic",
            "--num-classes",
            "8",
            "--results",
            "imp",
        ],
        workspace,
    )
    assert code == 0, err
    (card,) = (workspace / "imp" / "teachers").glob("*.json")
    assert json.loads(card.read_text())["top1"] is None


def test_tiny_imagenet_without_val_images_is_one_line(workspace, monkeypatch, capsys):  # noqa: F811
    root = workspace / "tin"
    (root / "train" / "n01" / "images").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "wnids.txt").write_text("n01\n")
    (root / "words.txt").write_text("n01\tcat\n")
    (root / "val" / "val_annotations.txt").write_text("")
    code, out, err = _cli(
        monkeypatch,
        capsys,
        ["run", "--methods", "ce", "--pairs", "resnet14:resnet8", "--dataset", "tinyimagenet", "--data-root", "tin"],
        workspace,
    )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err


def test_a_folder_where_a_run_json_should_be_is_one_line(workspace, monkeypatch, capsys):  # noqa: F811
    specs = expand(load_bench(workspace / "bench.toml"), Request(["kd"], ["tiny"]))
    (kd,) = [s for s in specs if s.method == "kd"]
    (workspace / "results" / "runs" / f"{kd.label}.json").mkdir()
    code, out, err = _cli(monkeypatch, capsys, RUN, workspace)
    assert code == 2 and "is a folder" in err and "Traceback" not in err, err


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_file_size_limit_is_one_line_naming_it(workspace):  # noqa: F811
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [sys.executable, "-m", "kdbench.cli", *RUN, "--device", "cpu"],
        cwd=workspace,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: file-size limit") and "Traceback" not in proc.stderr, proc.stderr


def test_disk_full_message_says_so():
    import errno

    from kdbench.cli import os_error_line

    assert "the disk is full" in os_error_line(OSError(errno.ENOSPC, "No space left on device", "x.json"))


# ---------------------------------------------------------------------------------------------- 10: leftovers


def test_leftovers_of_finished_runs_are_cleaned_and_truncated_json_reported(workspace, monkeypatch, capsys):  # noqa: F811
    path, run = _a_done_run(workspace)
    label = path.stem
    results = workspace / "results"
    ckpt = results / "checkpoints" / f"{label}.pt"
    ckpt.parent.mkdir(exist_ok=True)
    ckpt.write_bytes(b"x")
    tmp = results / "runs" / f".{label}.json.abc123.tmp"
    tmp.write_text("{")
    lock = results / "locks" / f"{label}.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "time": time.time()}))
    code, out, err = _cli(monkeypatch, capsys, ["run", "--methods", "fitnet", "--pairs", "tiny"], workspace)
    assert code == 0, err
    assert not ckpt.exists() and not tmp.exists() and not lock.exists()

    path.write_text(path.read_text()[:200])  # truncated by hand or by a broken disk
    code, out, err = _cli(monkeypatch, capsys, ["run", "--methods", "fitnet", "--pairs", "tiny"], workspace)
    assert code == 0 and path.name in err and "training the run again" in err, err


def _wait_for_line(stream, words: str) -> list[str]:
    """Read a child's stderr until a line holding ``words`` (the point the run reports); every line read."""
    lines = []
    for line in stream:
        lines.append(line)
        if words in line:
            break
    return lines


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, tiny_toml):
    """Deterministic on any load: the signal goes once the run reports its first epoch, and the run (a million
    epochs) cannot finish first."""
    (tmp_path / "bench.toml").write_text(tiny_toml.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdbench.cli", *RUN, "--device", "cpu", "--set", "protocol.epochs=1000000"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell starts a background job (`... &`) with SIGINT ignored, and Python keeps an inherited SIG_IGN:
        # give the run the default disposition a terminal's Ctrl-C meets, however the suite itself was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = _wait_for_line(proc.stderr, "| epoch 1/1000000 |")
    assert proc.poll() is None, "".join(seen)
    proc.send_signal(signal.SIGINT)
    try:
        err = "".join(seen) + proc.communicate(timeout=600)[1]  # a bound on a wait of a second, not a race
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run went on training after Ctrl-C") from None
    assert proc.returncode == 130, err
    assert "interrupted: rerun the same command to resume" in err and "Traceback" not in err


def test_slurm_without_submitit_writes_nothing(workspace, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "submitit", None)
    before = _files(workspace)
    code, out, err = _cli(monkeypatch, capsys, RUN + ["--executor", "slurm", "--results", "slurm-results"], workspace)
    assert code == 2 and "submitit" in err, err
    assert _files(workspace) == before


def test_bench_checks_its_output_folder_first(workspace, monkeypatch, capsys):  # noqa: F811
    import kdbench.bench

    def built(*a, **kw):
        raise AssertionError("the benchmark data was built before --out was checked")

    monkeypatch.setattr(kdbench.bench, "bench_data", built)
    code, out, err = _cli(
        monkeypatch,
        capsys,
        [
            "bench",
            "--pair",
            "resnet14:resnet8",
            "--methods",
            "kd",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--train-size",
            "64",
            "--out",
            "a_file",
        ],
        workspace,
    )
    assert code == 2 and "--out a_file" in err, err
