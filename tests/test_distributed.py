"""One run on several processes (DDP, gloo on the CPU) against one process with the same global batch.

Two ranks must train the same numbers as one process (losses, weights, memory banks and queues), as PyTorch's own
DDP tests compare; a run whose rank is killed must resume to the same metrics; rank 1 must write nothing. The data
is a tiny generated ImageNet-style folder (4 classes x 8 images, crops of 24 pixels), decoded in the main process
(num_workers 0) to keep the tests short; test_data_imagenet.py covers the workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench import distributed
from kdbench.config import DataSpec, load_bench
from kdbench.data import load_dataset
from kdbench.models import create_model, freeze
from kdbench.results import ResultStore
from kdbench.sweep import Request, Sweep, expand
from kdbench.teachers import TeacherStore
from kdbench.train import build_member, run_init_stage, train_cohort
from tests.imagefolder import make_imagefolder

pytestmark = pytest.mark.slow

SIZE = 24
PAIR = "resnet14:resnet8"
METHODS = ("kd", "crd", "rrd", "crcd", "fsp")  # fsp: an init stage under DDP
# One epoch of 4 steps (32 images, global batch 8); CRD's negatives capped by its classes (24 per anchor).
SETS = ["methods.crd.nce_k=16", "methods.crcd.nce_k=16"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("inet"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BENCH = f"""
[protocols.smoke]
epochs = 1
batch_size = 8
lr = 0.1
lr_small = 0.1
small_lr_students = []
momentum = 0.9
weight_decay = 5e-4
milestones = [1]
lr_decay = 0.1
init_epochs = 1

[pairs.tiny]
dataset = "imagenet"
image_size = {SIZE}
pairs = ["{PAIR}"]
dataset_options = {{ num_workers = 0 }}
"""


def _specs(root: Path, results: Path, methods: tuple[str, ...], sets: list[str]):
    """The runs of ``methods`` on the tiny folder; its pair set decodes in the main process (num_workers 0)."""
    config = root / "bench.toml"
    if not config.is_file():
        config.write_text(BENCH)
    req = Request(list(methods), ["tiny"], [0], "smoke", sets, data_root=str(root))
    return expand(load_bench(config), req, ResultStore(results))


def _teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    return freeze(create_model(PAIR.split(":")[0], num_classes=4))


def _train(
    root: str, out: str, kind: str = "imagenet", methods: tuple[str, ...] = METHODS, train_size: int = 32
) -> None:
    """The methods trained as one cohort for one epoch (4 steps) by this process, alone or as one rank (init stages
    first, as the sweep does); every rank saves what it holds (losses, student and method state) to out/rank<r>.pt."""
    device = distributed.init_from_env(torch.device("cpu"))
    if kind == "imagenet":
        data = load_dataset("imagenet", root, image_size=SIZE, num_workers=0)
    else:  # the device-resident loader of CIFAR / Tiny-ImageNet, on synthetic images of the same counts
        data = load_dataset("synthetic", num_classes=4, image_size=16, train_size=train_size, test_size=8, seed=0)
    teacher = _teacher()
    saved = {}
    sets = [s for s in SETS if s.split(".")[1] in methods]
    members = [build_member(spec, data, teacher, device) for spec in _specs(Path(root), Path(out) / "x", methods, sets)]
    for m in members:
        run_init_stage(m, data, teacher, device, save=False)
    train_cohort(members, data, teacher, device, save=False)
    for m in members:
        assert m.failed is None, m.failed
        saved[m.spec.method] = {
            "loss": {**m.curve["loss"], **({"init": m.curve["init_loss"]} if "init_loss" in m.curve else {})},
            "top1": m.curve["test_top1"],
            "student": {k: v.clone() for k, v in m.student.state_dict().items()},
            "method": {k: v.clone() for k, v in m.method.state_dict().items()},
        }
    torch.save(saved, Path(out) / f"rank{distributed.rank()}.pt")


@pytest.mark.parametrize("kind", ["imagenet", "synthetic"])
def test_two_ranks_train_what_one_process_trains(folder: Path, tmp_path: Path, kind: str) -> None:
    """kd, crd, rrd, crcd and fsp (after its init stage) side by side in one cohort, as the sweep trains them, on
    the ImageNet folder loader and on the device-resident loader."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _train(str(folder), str(one), kind)
    distributed.launch(2, _train, str(folder), str(two), kind)
    _same_as_one_process(one, two, METHODS)
    ref = torch.load(one / "rank0.pt", weights_only=True)
    assert ref["crd"]["method"]["nce_z"].min() > 0  # Z was set (from the global batch on two ranks)
    assert int(ref["rrd"]["method"]["queue_filled"]) > 0


def test_a_partial_last_batch_and_the_methods_batchnorms_train_what_one_process_trains(
    folder: Path, tmp_path: Path
) -> None:
    """11 samples in global batches of 8: the last batch's 3 rows split 2 / 1 over two ranks, and DDP's equal-weight
    mean of the ranks' gradients must still be the one-device gradient (the loss terms weighted by each rank's
    share). FitNet's regressor has a BatchNorm of its own, which must see the global batch like the student's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    methods = ("kd", "fitnet")
    _train(str(folder), str(one), "synthetic", methods, 11)
    distributed.launch(2, _train, str(folder), str(two), "synthetic", methods, 11)
    _same_as_one_process(one, two, methods)


def _same_as_one_process(one: Path, two: Path, methods: tuple[str, ...]) -> None:
    ref = torch.load(one / "rank0.pt", weights_only=True)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for method in methods:
        for got in ranks:
            r = got[method]
            for term, values in ref[method]["loss"].items():
                assert r["loss"][term] == pytest.approx(values, rel=1e-4, abs=1e-5), (method, term)
            assert r["top1"] == ref[method]["top1"]
            # Weights, BN statistics, memory banks and queues. The largest gap measured: 1.9e-4 on kd's conv1 weight
            # (entries up to 0.38; CRD and RRD below 1e-6 apart from CRD's Z, 1.5e-5 of 61): the synchronised BN's
            # two-pass statistics round differently from one process's batch norm, and KD's T^2-scaled steps
            # amplify it. A wrong gradient average (a sum, or a rank's rows missing) is 1e-2 away after one step.
            # FSP's init stage amplifies any rounding: ONE process gives weights 1.9e-2 apart with 1 and 2 intra-op
            # threads; its two ranks were 9e-4 (conv1) and 2.6e-2 (a running variance of 13.5) from one process.
            rtol, atol = (1e-2, 3e-3) if method == "fsp" else (1e-3, 5e-4)
            for part in ("student", "method"):
                for key, value in ref[method][part].items():
                    torch.testing.assert_close(r[part][key], value, rtol=rtol, atol=atol, msg=f"{method} {key}")
        for key, value in ranks[0][method]["method"].items():  # the ranks hold identical banks
            assert torch.equal(value, ranks[1][method]["method"][key]), (method, key)


# ---------------------------------------------------------------------------------------------- kill and resume


def _sweep(results: str, root: str, kill_after: int, audit: str) -> None:
    """One rank of a sweep of kd over 2 epochs; rank 1 records every file it writes under ``results`` (audit
    hook) and, with kill_after > 0, kills itself with SIGKILL once rank 0 has checkpointed that epoch."""
    import kdbench.train as train

    device = distributed.init_from_env(torch.device("cpu"))
    writes: list[str] = []
    if distributed.rank() == 1:
        prefix = str(Path(results).resolve())

        def hook(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], str) and args[0].startswith(prefix):
                mode = args[1] if isinstance(args[1], str) else ""
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    writes.append(args[0])
            elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir") and str(args[0]).startswith(prefix):
                writes.append(f"{event} {args[0]}")

        sys.addaudithook(hook)
    original = train.save_checkpoint

    def save_then_maybe_die(m) -> None:
        original(m)
        distributed.barrier()  # rank 0's checkpoint is on disk
        if distributed.rank() == 1 and kill_after and m.epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train.save_checkpoint = save_then_maybe_die
    specs = _specs(Path(root), Path(results), ("kd",), ["protocol.epochs=2"])
    Sweep(ResultStore(results), device).run(specs)
    if distributed.rank() == 1:
        Path(audit).write_text(json.dumps(writes))


def _import_teacher(results: Path) -> None:
    weights = results.parent / f"{results.name}-teacher.pt"
    torch.save(_teacher().state_dict(), weights)
    TeacherStore(ResultStore(results)).import_checkpoint(weights, "resnet14", DataSpec("imagenet", None, SIZE), 4)


def _run_json(results: Path) -> dict:
    (path,) = [p for p in (results / "runs").glob("*__kd__*.json")]
    return json.loads(path.read_text())


def test_killed_rank_resumes_to_identical_metrics_and_only_rank0_writes(folder: Path, tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for results in (whole, killed):
        _import_teacher(results)
    # The uninterrupted run: the command line's --nproc-per-node (kdbench.execute.run_distributed).
    from click.testing import CliRunner

    from kdbench.cli import cli

    args = ["run", "-m", "kd", "-p", "tiny", "--protocol", "smoke", "--set", "protocol.epochs=2", "--seeds", "0"]
    args += ["--data-root", str(folder), "--config", str(folder / "bench.toml"), "--results", str(whole)]
    _specs(folder, whole, ("kd",), [])  # writes the test's bench.toml
    done = CliRunner().invoke(cli, [*args, "--nproc-per-node", "2", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "trained 1" in done.output

    from kdbench.errors import KdbenchError

    with pytest.raises(KdbenchError, match="rank"):
        distributed.launch(2, _sweep, str(killed), str(folder), 1, str(tmp_path / "unused.json"))
    assert not list((killed / "runs").glob("*__kd__*.json"))
    assert len(list((killed / "checkpoints").glob("*.pt"))) == 1  # epoch 1 of 2, written by rank 0
    audit = tmp_path / "audit.json"
    distributed.launch(2, _sweep, str(killed), str(folder), 0, str(audit))
    assert json.loads(audit.read_text()) == []  # rank 1 wrote nothing in the results folder
    a, b = _run_json(whole), _run_json(killed)
    assert a["run_id"] == b["run_id"]
    assert a["metrics"] == b["metrics"]
    assert a["curve"]["loss"] == b["curve"]["loss"] and a["curve"]["test_top1"] == b["curve"]["test_top1"]
    assert a["execution"]["processes"] == 2
    log = next((killed / "runs").glob("*__kd__*.log")).read_text()
    assert "resumed at epoch 1/2" in log


# ---------------------------------------------------------------------------------------------- refused up front

COUPLED = {"sp", "rkd", "pkt", "cc", "dist", "ofd"}


def _kdbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from kdbench.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _smoke(results: Path, methods: str) -> list[str]:
    return ["run", "-m", methods, "-p", "resnet20:resnet8", "--dataset", "synthetic", "--protocol", "smoke"] + [
        "--results",
        str(results),
        "--device",
        "cpu",
    ]


def test_the_methods_whose_loss_couples_the_batch_say_so() -> None:
    from kdbench.method import discover

    declared = {name for name, e in discover().items() if e.builtin and e.ok and e.cls.couples_batch}
    assert declared == COUPLED


@pytest.mark.parametrize(
    "args,words",
    [
        (["--nproc-per-node", "2", "--dry-run"], "method 'sp' cannot run on 2 processes"),
        (["--nproc-per-node", "2"], "method 'sp' cannot run on 2 processes"),
        (["--executor", "slurm", "--nproc-per-node", "2", "--slurm-nodes", "2", "--dry-run"], "on 4 processes"),
    ],
)
def test_a_method_that_couples_the_batch_is_refused_before_anything_trains(tmp_path: Path, args, words) -> None:
    results = tmp_path / "r"
    res = _kdbench(*_smoke(results, "kd,sp"), *args)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "couples the samples of a batch" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not results.exists()


def test_a_torchrun_rank_refuses_it_too(tmp_path: Path, monkeypatch) -> None:
    """torchrun starts `kdbench run` on every rank (WORLD_SIZE > 1): refused before the process group is joined."""
    from kdbench.errors import KdbenchError
    from kdbench.execute import execute

    monkeypatch.setenv("WORLD_SIZE", "2")
    specs = _specs(tmp_path, tmp_path / "r", ("pkt",), [])
    with pytest.raises(KdbenchError, match="method 'pkt' cannot run on 2 processes"):
        execute(ResultStore(tmp_path / "r"), specs, device="cpu")
    assert not distributed.active()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path: Path) -> None:
    results = tmp_path / "r"
    res = _kdbench(*_smoke(results, "kd"), "--nproc-per-node", "3", "--dry-run")  # smoke: batch 64
    assert res.returncode == 2, res.stderr
    assert "batch size 64 does not split evenly over 3 processes" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _kdbench(*_smoke(results, "kd"), "--nproc-per-node", "2", "--dry-run").returncode == 0


def test_the_device_resident_loader_checks_the_split(monkeypatch) -> None:
    """The in-memory loader refuses what the command line refuses, and an epoch whose last batch has fewer rows
    than processes (a rank would hold none)."""
    from kdbench.data.loader import GPULoader
    from kdbench.errors import KdbenchError

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    images, labels = torch.zeros(51, 3, 4, 4, dtype=torch.uint8), torch.zeros(51, dtype=torch.long)

    def loader(n: int, bs: int, drop_last: bool = False) -> GPULoader:
        return GPULoader(
            images[:n], labels[:n], batch_size=bs, train=True, mean=(0,) * 3, std=(1,) * 3, drop_last=drop_last
        )

    with pytest.raises(KdbenchError, match="batch size 8 does not split evenly over 3 processes"):
        loader(48, 8)
    with pytest.raises(KdbenchError, match="last batch of each epoch has 2 rows"):
        loader(50, 6)
    loader(50, 6, drop_last=True)
    loader(51, 6)  # a last batch of 3 rows: one per rank
