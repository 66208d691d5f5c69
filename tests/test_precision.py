"""--precision bf16 and --channels-last: every registered method steps under bfloat16 autocast on the CPU (the fp32
guards of the losses are exercised), the settings reach the run JSON, and the run id changes only away from the
defaults."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from kdbench.config import load_bench
from kdbench.method import discover
from kdbench.models import create_model
from kdbench.results import ResultStore
from kdbench.sweep import Request, Sweep, expand, method_order
from kdbench.train import autocast, build_member, main_terms, not_applicable_reason, prepare_input

CPU = torch.device("cpu")
METHODS = method_order([n for n, e in discover().items() if e.ok])  # every registered method


@pytest.fixture(scope="module")
def teacher(tiny_data):
    torch.manual_seed(123)
    t = create_model("resnet14", num_classes=tiny_data.num_classes).eval()
    t.requires_grad_(False)
    return t


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    from tests.conftest import TINY_TOML

    path = tmp_path_factory.mktemp("prec") / "bench.toml"
    path.write_text(TINY_TOML)
    return {s.method: s for s in expand(load_bench(path), Request(METHODS, ["tiny"]))}


def _losses(spec, data, teacher, batch):
    m = build_member(spec, data, teacher if spec.teacher is not None else None, CPU)
    m.student.train()
    m.method.train()
    x = prepare_input(batch.images, spec.channels_last)
    stage = m.method.init_stage(m.student)
    stage_terms = None
    if stage is not None:
        with autocast(CPU, spec.precision):
            t_out = teacher(x, preact=m.preact) if teacher is not None else None
            s_out = m.student(x, preact=m.preact) if stage.needs_student else None
            stage_terms = stage.loss(s_out, t_out, batch)
    with autocast(CPU, spec.precision):
        with torch.no_grad():
            t_out = teacher(x, preact=m.preact) if spec.teacher is not None else None
        s_out = m.student(x, preact=m.preact)
        terms = main_terms(m, s_out, t_out, batch)
    total = sum(terms.values())
    total.backward()  # outside autocast, as the harness does
    grads = [p.grad for p in m.student.parameters() if p.grad is not None]
    return m, s_out, terms, stage_terms, grads


@pytest.mark.parametrize("name", METHODS)
def test_every_method_steps_under_bf16_autocast(name, specs, tiny_data, teacher):
    spec = specs[name]
    if not_applicable_reason(spec, tiny_data, teacher) is not None:
        pytest.skip(f"{name} does not apply to the test pair")
    batch = next(iter(tiny_data.train_loader(32, seed=4).epoch(0)))
    _, out32, fp32_terms, _, _ = _losses(spec, tiny_data, teacher, batch)
    bf16 = dataclasses.replace(spec, precision="bf16")
    _, out16, terms, stage_terms, grads = _losses(bf16, tiny_data, teacher, batch)
    assert out32.logits.dtype == torch.float32
    assert out16.logits.dtype == torch.bfloat16, "the network ran under bf16 autocast"
    for k, v in {**terms, **(stage_terms or {})}.items():
        assert v.dtype == torch.float32, f"{name}: term {k} is {v.dtype}: the loss maths must run in fp32"
        assert torch.isfinite(v), f"{name}: term {k} is not finite under bf16"
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Same weights, same batch, same negatives: bf16 moves each term by its rounding only. The relative tolerance
    # is loose (bf16 keeps 8 bits of mantissa, and a ResNet's logits go through ~10 rounded layers).
    for k in fp32_terms:
        a, b = float(fp32_terms[k].detach()), float(terms[k].detach())
        assert abs(a - b) <= 0.1 * abs(a) + 0.05, f"{name}: term {k} fp32 {a:.4f} vs bf16 {b:.4f}"


@pytest.mark.parametrize("name", ["kd", "crd", "ab"])
def test_channels_last_gives_the_fp32_numbers(name, specs, tiny_data, teacher):
    """channels_last changes the memory layout only: the same losses and gradients up to float rounding."""
    spec = specs[name]
    batch = next(iter(tiny_data.train_loader(32, seed=5).epoch(0)))
    m0, _, t0, _, g0 = _losses(spec, tiny_data, teacher, batch)
    m1, _, t1, _, g1 = _losses(dataclasses.replace(spec, channels_last=True), tiny_data, teacher, batch)
    conv = next(p for p in m1.student.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-4, atol=1e-5)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):  # another summation order in the convolutions: compare each gradient as a whole
        assert float((a - b).norm()) <= 5e-3 * float(a.norm()) + 1e-6


def _fp64_grads(m, teacher, batch, channels_last):
    """The student's gradients of one step in float64, from copies of the member's fp32 weights (same init)."""
    student, t = copy.deepcopy(m.student).double().train(), copy.deepcopy(teacher).double()
    method = copy.deepcopy(m.method).double()
    x = batch.images.double()
    if channels_last:
        student, t = student.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    member = dataclasses.replace(m, student=student, method=method)
    with torch.no_grad():
        t_out = t(x, preact=m.preact)
    s_out = student(x, preact=m.preact)
    sum(main_terms(member, s_out, t_out, batch).values()).backward()
    return [p.grad for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", ["kd", "at"])
def test_channels_last_is_the_same_maths_in_fp64(name, specs, tiny_data, teacher):
    """AT's fp32 gradient moves by up to ~1% of its norm with the summation order (measured against fp64 on the same
    weights: 0.1% contiguous with 1 thread, 1.2% channels_last with 2; KD's by 1e-5), so the fp32 comparison above
    cannot tell a layout bug from rounding for AT. In float64 the two layouts must agree to the rounding of the fp32
    casts inside the losses (AT measured 4e-7): a layout bug (a view in the wrong memory order) shows as O(1)."""
    spec = specs[name]
    batch = next(iter(tiny_data.train_loader(32, seed=5).epoch(0)))
    m = build_member(spec, tiny_data, teacher, CPU)
    g0 = _fp64_grads(m, teacher, batch, channels_last=False)
    g1 = _fp64_grads(m, teacher, batch, channels_last=True)
    assert len(g0) == len(g1) and g0[0].dtype == torch.float64
    for a, b in zip(g0, g1):
        assert float((a - b).norm()) <= 1e-5 * float(a.norm()) + 1e-12


def test_settings_enter_the_run_id_only_away_from_their_defaults(specs):
    spec = specs["kd"]
    base = spec.to_dict()
    assert "precision" not in base and "channels_last" not in base
    ids = {
        spec.run_id,
        dataclasses.replace(spec, precision="bf16").run_id,
        dataclasses.replace(spec, channels_last=True).run_id,
        dataclasses.replace(spec, precision="bf16", channels_last=True).run_id,
    }
    assert len(ids) == 4
    assert dataclasses.replace(spec, precision="bf16").cohort_key != spec.cohort_key


def test_bf16_channels_last_sweep_records_its_settings(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "results")
    specs = expand(load_bench(tiny_toml), Request(["kd", "crd"], ["tiny"], precision="bf16", channels_last=True), store)
    report = Sweep(store, CPU).run(specs)
    assert len(report.trained) == 2 and not report.failed
    for spec in specs:
        rec = json.loads((store.runs_dir / f"{spec.label}.json").read_text())
        assert rec["status"] == "done"
        assert rec["execution"] == {"precision": "bf16", "channels_last": True, "compile": False}
        assert rec["spec"]["precision"] == "bf16" and rec["spec"]["channels_last"] is True
    teacher_runs = [p for p in store.runs_dir.glob("*__ce__*.json")]
    assert teacher_runs, "the teacher was trained"
    t = json.loads(teacher_runs[0].read_text())
    assert t["execution"]["precision"] == "fp32" and "precision" not in t["spec"], "teachers train in fp32"


def test_unknown_precision_is_one_line(tmp_path, tiny_toml):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdbench.cli",
            "run",
            "-m",
            "kd",
            "-p",
            "tiny",
            "--config",
            str(tiny_toml),
            "--precision",
            "fp16",
            "--results",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "fp16" in proc.stderr
    assert not (tmp_path / "r").exists()
