"""On a CUDA GPU only (skipped elsewhere; `kdbench bench --suite gpu` runs them): every method trains in a cohort on
the device in fp32, in bf16 with channels_last, and compiled; an interrupted cohort resumes there (the CUDA
generators' states go through the checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from kdbench.config import load_bench
from kdbench.results import ResultStore
from kdbench.sweep import Request, Sweep, expand
from tests.interrupt import Killed, interrupt_cohorts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "methods,precision,channels_last,compile_",
    [
        (["all"], "fp32", False, False),
        (["all"], "bf16", True, False),
        (["kd", "crd", "rrd"], "bf16", False, True),
    ],
    ids=["fp32", "bf16-channels_last", "bf16-compiled"],
)
def test_every_method_trains_on_cuda(tiny_toml, tmp_path, methods, precision, channels_last, compile_):
    store = ResultStore(tmp_path / "results")
    req = Request(methods, ["tiny"], precision=precision, channels_last=channels_last)
    specs = expand(load_bench(tiny_toml), req, store)
    report = Sweep(store, CUDA, compile=compile_).run(specs)
    assert not report.failed, report.failed
    assert len(report.trained) == len(specs)
    for spec in specs:
        rec = json.loads((store.runs_dir / f"{spec.label}.json").read_text())
        assert rec["status"] == "done" and rec["environment"]["device"].startswith("cuda")
        assert rec["execution"]["precision"] == precision and rec["execution"]["compile"] == compile_


def test_interrupted_cohort_resumes_on_cuda(tiny_toml, tmp_path, monkeypatch):

    store = ResultStore(tmp_path / "results")
    specs = expand(load_bench(tiny_toml), Request(["kd", "crd", "rrd"], ["tiny"]), store)
    real = interrupt_cohorts(monkeypatch, spare=("ce",))
    with pytest.raises(Killed):
        Sweep(store, CUDA).run(specs)
    assert list((store.root / "checkpoints").glob("*.pt"))
    monkeypatch.setattr("kdbench.sweep.train_cohort", real)
    report = Sweep(store, CUDA).run(specs)
    assert len(report.trained) == len(specs) and not report.failed
    for spec in specs:
        rec = json.loads((store.runs_dir / f"{spec.label}.json").read_text())
        assert rec["curve"]["epoch"] == [1, 2], "resumed at epoch 2, not restarted"
