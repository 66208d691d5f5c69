"""The training harness: cohort == solo on the CPU, same seed -> same numbers, resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdbench.config import load_bench
from kdbench.results import ResultStore, load_run
from kdbench.sweep import Request, Sweep, expand
from tests.interrupt import Killed, interrupt_cohorts

CPU = torch.device("cpu")


def _specs(toml: Path, methods: list[str], pairs: str = "tiny", store: ResultStore | None = None, sets=()):
    return expand(load_bench(toml), Request(methods, [pairs], sets=list(sets)), store)


def _metrics(store: ResultStore) -> dict[str, tuple]:
    out = {}
    for _, run, err in store.iter_runs():
        assert err is None, err
        out[run["spec"]["method"]] = (
            run["status"],
            run["metrics"].get("top1_last"),
            run["metrics"].get("top5_best"),
            json.dumps(run["curve"]["loss"], sort_keys=True),
        )
    return out


def _weights(store: ResultStore, method: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = [p for p in (store.root / "weights").glob(f"*__{method}__*.safetensors")]
    return load_file(str(path))


@pytest.mark.slow
def test_cohort_equals_solo(tiny_toml, tmp_path):
    methods = ["kd", "fitnet", "crd", "ab"]
    stores = {}
    for cohort in (True, False):
        store = ResultStore(tmp_path / f"cohort{cohort}")
        Sweep(store, CPU, cohort=cohort).run(_specs(tiny_toml, methods, store=store))
        stores[cohort] = store
    a, b = _metrics(stores[True]), _metrics(stores[False])
    assert set(a) == set(methods) | {"ce"}  # the teacher's own vanilla run is recorded too
    assert a == b
    for m in methods:
        wa, wb = _weights(stores[True], m), _weights(stores[False], m)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_differs(tiny_toml, tmp_path):
    results = []
    for i, seed in enumerate(("0", "0", "1")):
        store = ResultStore(tmp_path / f"r{i}")
        specs = expand(load_bench(tiny_toml), Request(["kd"], ["tiny"], seeds=[int(seed)]), store)
        Sweep(store, CPU).run(specs)
        (run,) = [r for _, r, _ in store.iter_runs() if r["spec"]["method"] == "kd"]
        results.append((run["metrics"], run["curve"]["loss"]))
    assert results[0] == results[1]
    assert results[0] != results[2]


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_resume_after_interruption_matches_uninterrupted(tiny_toml, tmp_path, monkeypatch):

    ref = ResultStore(tmp_path / "ref")
    Sweep(ref, CPU).run(_specs(tiny_toml, ["kd", "ab"], store=ref))

    store = ResultStore(tmp_path / "killed")
    real = interrupt_cohorts(monkeypatch)
    specs = _specs(tiny_toml, ["kd", "ab"], store=store)
    with pytest.raises(Killed):
        Sweep(store, CPU).run(specs)
    assert list((store.root / "checkpoints").glob("*.pt")), "a checkpoint must exist after the interruption"
    assert not list(store.root.glob("locks/*.lock")), "locks are released on the way out"
    monkeypatch.setattr("kdbench.sweep.train_cohort", real)
    report = Sweep(store, CPU).run(specs)
    assert _metrics(store) == _metrics(ref)
    assert not list((store.root / "checkpoints").glob("*.pt"))
    # A finished run is skipped on the next call.
    again = Sweep(store, CPU).run(specs)
    assert again.trained == [] and len(again.skipped) == len(specs)
    assert report.trained


def test_run_json_schema(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "r")
    Sweep(store, CPU).run(_specs(tiny_toml, ["kd"], store=store))
    (path,) = [p for p in store.runs_dir.glob("*__kd__*.json")]
    run = load_run(path)
    assert run["status"] == "done" and run["schema"] == 1
    assert run["run_id"] in path.name
    assert run["method"]["dist"] == "kdbench" and run["method"]["config"]["temperature"] == 4.0
    assert run["teacher"]["arch"] == "resnet14" and run["teacher"]["source"] == "trained"
    assert run["teacher"]["data_checksum"] == run["data"]["checksum"]
    for key in ("top1_last", "top1_best", "top5_last", "top5_best", "agreement", "kl_t1", "kl_t4", "cka", "ece"):
        assert isinstance(run["metrics"][key], float), key
    assert len(run["curve"]["test_top1"]) == 2 and set(run["curve"]["loss"]) == {"ce", "kd", "total"}
    assert len(run["timings"]["epoch_seconds"]) == 2 and run["timings"]["images_per_second"] > 0
    assert run["environment"]["torch"] == torch.__version__
    assert len(run["diagnostics"]["corr_diff"]) == 8
    # The teacher's card and weights are stored once and reused.
    cards = list(store.teachers_dir.glob("*.json"))
    assert len(cards) == 1 and cards[0].with_suffix(".safetensors").is_file()


def test_not_applicable_is_recorded(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "r")
    report = Sweep(store, CPU).run(_specs(tiny_toml, ["fsp"], pairs="tiny2", store=store))
    assert len(report.not_applicable) == 1
    (run,) = [r for _, r, _ in store.iter_runs() if r["spec"]["method"] == "fsp"]
    assert run["status"] == "n/a" and "channel" in run["reason"]


def test_diverging_run_is_recorded_as_failed_and_others_go_on(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "r")
    specs = _specs(tiny_toml, ["kd", "fitnet"], store=store, sets=["methods.fitnet.weight=1e30"])
    report = Sweep(store, CPU).run(specs)
    runs = {r["spec"]["method"]: r for _, r, _ in store.iter_runs()}
    assert runs["fitnet"]["status"] == "failed" and "non-finite" in runs["fitnet"]["reason"]
    assert runs["fitnet"]["failed_epoch"] == 1
    assert runs["kd"]["status"] == "done"
    assert len(report.failed) == 1


def test_lr_schedule_matches_reference_protocol():
    bench = load_bench(Path(__file__).resolve().parents[1] / "bench.toml")
    p = bench.protocols["paper"]
    assert (p.epochs, p.batch_size, p.milestones) == (240, 64, (150, 180, 210))
    # RepDistiller decays after epoch 150 (1-based), i.e. from our 0-based epoch 150 on.
    assert p.lr_at(0.05, 149) == pytest.approx(0.05)
    assert p.lr_at(0.05, 150) == pytest.approx(0.005)
    assert p.lr_at(0.05, 239) == pytest.approx(0.05 * 1e-3)
    assert p.base_lr("mobilenetv2") == 0.01 and p.base_lr("resnet8x4") == 0.05
    fast = bench.protocols["fast"]
    assert [m / fast.epochs for m in fast.milestones] == [m / p.epochs for m in p.milestones]


def test_import_repdistiller_checkpoint_then_runs_use_it(tiny_toml, tmp_path):
    """The published layout: a dict with 'model' (state dict), 'epoch', 'accuracy' and 'optimizer'."""
    from kdbench.config import DataSpec
    from kdbench.models import create_model
    from kdbench.teachers import TeacherStore

    torch.manual_seed(7)
    teacher = create_model("resnet14", num_classes=8)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    teacher(torch.randn(2, 3, 16, 16)).logits.sum().backward()
    opt.step()
    ckpt = tmp_path / "resnet14_best.pth"
    torch.save(
        {
            "epoch": 240,
            "model": {f"module.{k}": v for k, v in teacher.state_dict().items()},
            "accuracy": torch.tensor(71.5),
            "optimizer": opt.state_dict(),
        },
        ckpt,
    )

    store = ResultStore(tmp_path / "r")
    (spec0,) = expand(load_bench(tiny_toml), Request(["kd"], ["tiny"]), store)
    card = TeacherStore(store).import_checkpoint(ckpt, "resnet14", spec0.data, num_classes=8)
    assert card["source"] == "imported" and card["top1"] == pytest.approx(71.5)
    (spec,) = expand(load_bench(tiny_toml), Request(["kd"], ["tiny"]), store)
    assert spec.teacher.imported == card["weights_sha256"] and spec.run_id != spec0.run_id
    report = Sweep(store, CPU).run([spec])
    assert len(report.trained) == 1  # no teacher was trained: the imported one was used
    run = load_run(store.run_path(spec.label))
    assert run["teacher"]["source"] == "imported"
    assert not list(store.runs_dir.glob("*__ce__*"))
    loaded, _ = TeacherStore(store).load_imported("resnet14", DataSpec(**{**spec.data.__dict__}), 8, CPU)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_killed_between_teacher_run_json_and_card_loses_nothing(tiny_toml, tmp_path):
    """A kill after the teacher's vanilla run is written but before its card: the card is rebuilt from the run's
    weights, nothing is retrained, and both files exist."""
    store = ResultStore(tmp_path / "r")
    specs = _specs(tiny_toml, ["kd"], store=store)
    Sweep(store, CPU).run(specs)
    ref = _metrics(store)
    for card in store.teachers_dir.glob("*"):
        card.unlink()
    for run in store.runs_dir.glob("*__kd__*.json"):
        run.unlink()
    report = Sweep(store, CPU).run(specs)
    assert len(report.trained) == 1 and list(store.teachers_dir.glob("*.json"))
    assert _metrics(store) == ref


def test_requires_teacher_is_checked_once_by_the_harness(tiny_toml, tiny_data, tmp_path):
    """A method that requires a teacher, without one: n/a from not_applicable_reason (recorded as such by a sweep),
    one clear KdbenchError from build_member; the method itself checks nothing."""
    import dataclasses

    from kdbench.errors import KdbenchError
    from kdbench.train import build_member, not_applicable_reason

    specs = [
        dataclasses.replace(s, teacher=None)
        for s in _specs(tiny_toml, ["at", "crd", "fsp", "fitnet"])
        if s.method != "ce"
    ]
    for spec in specs:
        assert not_applicable_reason(spec, tiny_data, None) == f"method {spec.method} needs a teacher"
        with pytest.raises(KdbenchError, match="needs a teacher"):
            build_member(spec, tiny_data, None, CPU)
    (ce,) = [s for s in _specs(tiny_toml, ["ce"])]
    assert not_applicable_reason(ce, tiny_data, None) is None  # requires_teacher = False
    store = ResultStore(tmp_path / "r")
    report = Sweep(store, CPU).run(specs[:1])
    assert report.not_applicable == [specs[0].label]
    (run,) = [r for _, r, _ in store.iter_runs()]
    assert run["status"] == "n/a" and run["reason"] == "method at needs a teacher"


def test_ab_init_stage_keeps_a_wrn_students_final_bn_frozen_in_eval_mode(tiny_toml):
    """As RepDistiller's helper/pretrain.py (model_s.eval(); init_modules.train() with get_feat_modules()): a WRN
    student's final bn1 is not a feature module, so AB's init stage neither trains it nor updates its statistics,
    although AB's last tap reads it; the feature layers run in train mode and are trained."""
    from kdbench.data import load_dataset
    from kdbench.models import create_model
    from kdbench.train import build_member, run_init_stage

    data = load_dataset("synthetic", None, image_size=16, num_classes=8, train_size=64, test_size=32, seed=0)
    (spec,) = [s for s in _specs(tiny_toml, ["ab"], pairs="tiny2") if s.method == "ab"]
    torch.manual_seed(0)
    teacher = create_model(spec.teacher.arch, num_classes=8).eval().requires_grad_(False)
    m = build_member(spec, data, teacher, CPU)
    bn1, block_bn = m.student.bn1, m.student.block1.layer[0].bn1
    modes = {"bn1": set(), "block": set()}
    bn1.register_forward_pre_hook(lambda mod, args: modes["bn1"].add(mod.training))
    block_bn.register_forward_pre_hook(lambda mod, args: modes["block"].add(mod.training))
    before = {k: v.clone() for k, v in m.student.state_dict().items()}
    run_init_stage(m, data, teacher, CPU, save=False)
    after = m.student.state_dict()
    assert m.failed is None and m.init_done == spec.protocol.init_epochs
    assert modes == {"bn1": {False}, "block": {True}}
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["block1.layer.0.bn1.running_mean"], after["block1.layer.0.bn1.running_mean"])
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])
