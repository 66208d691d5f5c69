"""--compile: compiled and eager forwards give the same loss and gradients; a compiled cohort trains and resumes.

Compiling is slow on a CPU (inductor generates and builds C++: a minute or more per model and mode on 2 cores), so
the default run uses the "aot_eager" backend (the same graph capture by dynamo and the same AOT autograd as
inductor, without code generation) on one model, and the ``slow`` marker runs inductor on every model of the pair
sets of bench.toml (``KDBENCH_SLOW_TESTS=1 pytest -m slow tests/test_compile.py``).
"""

from __future__ import annotations

import copy
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdbench.config import load_bench
from kdbench.models import create_model
from kdbench.results import ResultStore
from kdbench.sweep import Request, Sweep, expand
from kdbench.train import prepare_model
from tests.interrupt import Killed, interrupt_cohorts

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PAIR_SET_MODELS = sorted(
    {arch for ps in load_bench(ROOT / "bench.toml").pair_sets.values() for pair in ps.pairs for arch in pair.split(":")}
)


def _loss_and_grads(model, x, y):
    out = model(x, preact=True)
    # Every output takes part, so that every tap's gradient is compared.
    loss = F.cross_entropy(out.logits, y) + out.pooled.pow(2).mean() + sum(f.pow(2).mean() for f in out.feats)
    loss = loss + sum(p.mean() for p in out.preact)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(arch: str, backend: bool | str, rtol: float) -> None:
    torch.manual_seed(0)
    eager = create_model(arch, num_classes=10).train()
    compiled = prepare_model(copy.deepcopy(eager), compile=backend)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    l0, g0 = _loss_and_grads(eager, x, y)
    l1, g1 = _loss_and_grads(compiled, x, y)
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:  # relative to each gradient's norm (summation order differs); the floor of 1e-5 is for the
        # gradients that are zero up to rounding (a BatchNorm bias whose shift the next convolution and BatchNorm
        # remove: measured norms of 2e-6 in eager, compiled and eager differing by 3e-6)
        err = float((g1[name] - g0[name]).norm())
        assert err <= rtol * float(g0[name].norm()) + 1e-5, f"{arch}: gradient of {name} differs by {err}"
    assert set(compiled.state_dict()) == set(eager.state_dict()), "compiling must not rename state-dict keys"
    compiled.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, eager(x).logits, rtol=rtol, atol=1e-4)


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_compiled_forward_matches_eager():
    _compare("resnet8", "aot_eager", 1e-4)


# Measured 2026-11-30 (torch 2.14.1, gcc 12, 2-core AMD EPYC): inductor's gradients of these deep models differ
# from eager's by 0.3-3.1% of their norm (first conv: shufflenetv1 0.3%, wrn_40_2 0.9%, resnet50 2.1%, resnet110
# 2.4%, resnet56 3.1%). For resnet56 with a plain CE loss, against the float64 gradient of the same weights:
# inductor 4.4%, eager fp32 1.6e-5, the aot_eager backend (same graph, no generated C++) 5e-5. A numerical defect of
# inductor's CPU kernels, not of kdbench's models. Strict: a torch that fixes it makes these pass, and fail here.
INDUCTOR_CPU_GRADIENT_DEFECT = {"resnet56", "resnet110", "resnet50", "wrn_40_2", "shufflenetv1"}


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("KDBENCH_SLOW_TESTS"), reason="slow (inductor on every model): set KDBENCH_SLOW_TESTS=1"
)
@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(
            a,
            marks=pytest.mark.xfail(
                strict=True, reason="inductor's CPU gradients of deep models are 0.3-3% off eager's (see above)"
            ),
        )
        if a in INDUCTOR_CPU_GRADIENT_DEFECT
        else a
        for a in PAIR_SET_MODELS
    ],
)
def test_inductor_matches_eager_on_every_pair_set_model(arch):
    _compare(arch, True, 2e-3)


COMPILE_TOML = textwrap.dedent("""
    [defaults]
    protocol = "tiny"
    [protocols.tiny]
    epochs = 2
    batch_size = 32
    lr = 0.05
    lr_small = 0.01
    small_lr_students = []
    momentum = 0.9
    weight_decay = 5e-4
    milestones = [1]
    lr_decay = 0.1
    init_epochs = 1
    [pairs.tiny]
    dataset = "synthetic"
    pairs = ["resnet8:resnet8"]
    [pairs.tiny.dataset_options]
    num_classes = 8
    image_size = 16
    train_size = 64
    test_size = 32
    seed = 0
""")


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_compiled_cohort_trains_and_resumes(tmp_path, monkeypatch):
    """A cohort (KD and CRD, one teacher forward per batch) trains with compiled networks, is interrupted after its
    first epoch and resumes from checkpoints; the results match an eager run of the same cohort."""

    toml = tmp_path / "bench.toml"
    toml.write_text(COMPILE_TOML)  # teacher and student share an architecture: its graphs are compiled once

    def specs(store):
        return expand(load_bench(toml), Request(["kd", "crd"], ["tiny"]), store)

    eager = ResultStore(tmp_path / "eager")
    Sweep(eager, CPU).run(specs(eager))

    store = ResultStore(tmp_path / "compiled")
    real = interrupt_cohorts(monkeypatch, spare=("ce",))
    with pytest.raises(Killed):
        Sweep(store, CPU, compile="aot_eager").run(specs(store))
    checkpoints = list((store.root / "checkpoints").glob("*.pt"))
    assert checkpoints
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in state["student"]), "checkpoints load into an eager model too"
    monkeypatch.setattr("kdbench.sweep.train_cohort", real)
    report = Sweep(store, CPU, compile="aot_eager").run(specs(store))
    assert len(report.trained) == 2 and not report.failed

    def runs(s):
        out = {}
        for f in s.runs_dir.glob("*.json"):
            r = json.loads(f.read_text())
            out[r["method"]["name"]] = r
        return out

    got, ref = runs(store), runs(eager)
    for name in ("kd", "crd"):
        assert got[name]["execution"]["compile"] == "aot_eager"
        assert got[name]["curve"]["epoch"] == [1, 2]
        assert got[name]["run_id"] == ref[name]["run_id"], "compiling is not part of the run id"
        for a, b in zip(got[name]["curve"]["loss"]["total"], ref[name]["curve"]["loss"]["total"]):
            assert abs(a - b) <= 1e-3 * abs(b) + 1e-4, f"{name}: compiled loss {a} vs eager {b}"


def test_compile_with_inductor_on_a_cpu_warns_that_results_are_not_comparable(tmp_path):
    from kdbench.execute import execute

    said = []
    execute(ResultStore(tmp_path / "r"), [], device="cpu", compile=True, log=said.append)
    assert any("warning: --compile on a CPU" in s and "not comparable" in s for s in said)
    said.clear()
    execute(ResultStore(tmp_path / "r"), [], device="cpu", compile="aot_eager", log=said.append)
    assert not said
