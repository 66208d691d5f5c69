"""kdbench bench: the JSON record, the reference loop's batches against GPULoader's, cohort counting, bad input."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
from pathlib import Path

import pytest
import torch

from kdbench.bench import CIFAR100_EPOCH, bench_data, bench_table, reference_loader, run_bench
from kdbench.data import GPULoader, crop_flip
from kdbench.errors import KdbenchError

PAIR = "resnet14:resnet8"
TINY = {"batch_size": 8, "steps": 1, "warmup": 1, "train_size": 32, "device": "cpu"}
ROW_NUMBERS = (
    "seconds",
    "ms_per_step",
    "images_per_s",
    "method_run_images_per_s",
    "epoch_seconds",
    "peak_memory_mb",
    "images_per_s_mean",
    "speedup_vs_reference",
)


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    return run_bench(PAIR, "kd,crd", workers=0, cohort_sizes="1,2", out=out, **{**TINY, "batch_size": 4, "warmup": 0})


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_json_written_with_every_field(record):
    path = Path(record["path"])
    assert path.is_file() and path.name.startswith("bench-cpu-")
    saved = json.loads(path.read_text())
    assert saved == record
    env = saved["environment"]
    for key in ("device", "device_name", "torch", "torch_threads", "python", "cpu_count"):
        assert env[key] not in (None, ""), key
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    s = saved["settings"]
    assert s["pair"] == PAIR and s["methods"] == ["kd", "crd"] and s["cohort_sizes"] == [1, 2]
    assert (s["batch_size"], s["steps"], s["warmup"], s["rounds"], s["train_size"], s["workers"], s["device"]) == (
        4,
        1,
        0,
        1,
        32,
        0,
        "cpu",
    )
    assert "1 timed steps" in saved["notes"]["extrapolation"]
    configs = [(r["config"], tuple(r["methods"]), r["measured"]) for r in saved["results"]]
    assert configs == [
        ("reference", ("kd",), True),
        ("reference", ("crd",), True),
        ("reference", ("kd", "crd"), False),
        ("solo", ("kd",), True),
        ("solo", ("crd",), True),
        ("solo", ("kd", "crd"), False),
        ("cohort", ("kd",), True),
        ("cohort", ("kd", "crd"), True),
    ]
    for row in saved["results"]:
        numbers = ROW_NUMBERS if row["measured"] else ROW_NUMBERS[3:5] + ROW_NUMBERS[-1:]
        for key in numbers:
            assert _positive(row[key]), (row["config"], row["methods"], key, row[key])
        if row["measured"]:
            assert row["timed_steps"] == 1 and row["loss_finite"] is True
            assert row["memory_kind"].startswith("cpu proxy") and row["base_memory_mb"] > 0
            assert math.isclose(row["images_per_s_mean"], 4 / row["seconds"])
            assert math.isclose(row["images_per_s"], row["chunk_images_per_s"]["median"])
            chunks = row["chunk_images_per_s"]
            assert row["chunk_steps"] == [1] and math.isclose(sum(row["chunk_seconds"]), row["seconds"])
            assert 0 < chunks["min"] <= chunks["median"] <= chunks["max"] < math.inf
        else:
            assert row["images_per_s"] is None and row["ms_per_step"] is None


@pytest.mark.slow
def test_cohort_counts_method_runs(record):
    rows = record["results"]
    ref = {r["methods"][0]: r for r in rows if r["config"] == "reference" and r["measured"]}
    solo = {r["methods"][0]: r for r in rows if r["config"] == "solo" and r["measured"]}
    cohorts = [r for r in rows if r["config"] == "cohort"]
    assert [r["n_methods"] for r in cohorts] == [1, 2]
    for r in cohorts:
        k = r["n_methods"]
        assert r["methods"] == ["kd", "crd"][:k]
        assert math.isclose(r["method_run_images_per_s"], k * r["images_per_s"])
        assert math.isclose(r["epoch_seconds"], CIFAR100_EPOCH * k / r["method_run_images_per_s"])
        for key, base in (("speedup_vs_reference", ref), ("speedup_vs_solo", solo)):
            assert math.isclose(r[key], sum(base[m]["epoch_seconds"] for m in r["methods"]) / r["epoch_seconds"])
    (ref_sum,) = [r for r in rows if r["config"] == "reference" and not r["measured"]]
    assert math.isclose(ref_sum["epoch_seconds"], ref["kd"]["epoch_seconds"] + ref["crd"]["epoch_seconds"])
    assert math.isclose(ref_sum["speedup_vs_reference"], 1.0)


@pytest.mark.slow
def test_table_renders(record):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench_table(record))
    text = console.export_text()
    assert "kdbench cohort of 2" in text and "reference (0 workers)" in text and "1 timed steps" in text


def test_reference_batches_match_gpuloader():
    data = bench_data(32)
    assert tuple(data.train_images.shape) == (32, 3, 32, 32) and data.num_classes == 100
    # Unaugmented: the same normalised pixels, labels and indices as GPULoader's test-mode batches.
    gpu = GPULoader(data.test_images, data.test_labels, batch_size=8, train=False, mean=data.mean, std=data.std)
    ref = reference_loader(data, 8, 0, train=False)
    for (x, y, i), b in zip(ref, gpu):
        assert x.dtype == b.images.dtype == torch.float32 and x.shape == b.images.shape
        assert x.shape[1:] == (3, 32, 32)
        torch.testing.assert_close(x, b.images, atol=1e-6, rtol=0)
        assert torch.equal(y, b.labels) and torch.equal(i, b.index)
    # Augmented: every reference image is one of the 9 x 9 x 2 crops/flips GPULoader can draw of the same sample.
    (gb,) = [
        next(
            iter(
                GPULoader(
                    data.train_images, data.train_labels, batch_size=8, train=True, mean=data.mean, std=data.std
                ).epoch(0)
            )
        )
    ]
    x, y, idx = next(iter(reference_loader(data, 8, 0, train=True, seed=1)))
    assert x.shape == gb.images.shape and x.dtype == gb.images.dtype and y.dtype == gb.labels.dtype == torch.int64
    assert torch.equal(y, data.train_labels[idx])
    offsets = torch.arange(9)
    top, left = offsets.repeat_interleave(9).repeat(2), offsets.repeat(9).repeat(2)
    flips = torch.arange(2).repeat_interleave(81).bool()
    for img, j in zip(x, idx.tolist()):
        views = gpu.normalize(crop_flip(data.train_images[j].expand(162, -1, -1, -1), top, left, flips, 4))
        assert (views - img).abs().flatten(1).amax(1).min() < 1e-5


@pytest.mark.slow
def test_worker_processes_and_rounds():
    rec = run_bench(
        PAIR,
        "kd",
        workers=1,
        configs=("reference", "solo"),
        out=None,
        **{**TINY, "steps": 2, "rounds": 2, "warmup": 0, "batch_size": 4},
    )
    ref, solo = rec["results"]
    assert (ref["config"], ref["workers"], solo["config"]) == ("reference", 1, "solo")
    assert (rec["settings"]["workers"], rec["settings"]["rounds"]) == (1, 2)
    assert "path" not in rec and "in 2 rounds" in rec["notes"]["extrapolation"]
    for row in (ref, solo):
        assert row["chunk_steps"] == [1, 1] and row["timed_steps"] == 2  # one chunk per round
        assert _positive(row["images_per_s"]) and _positive(row["epoch_seconds"])
        assert isinstance(row["peak_increment_mb"], float) and math.isfinite(row["peak_increment_mb"])
    assert not [p for p in mp.active_children() if p.is_alive()]  # the DataLoader's workers were shut down


@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": "kd,nosuch"},
        {"pair": "resnet14:nosuch"},
        {"pair": "resnet14"},
        {"steps": 0},
        {"steps": -3},
        {"warmup": -1},
        {"rounds": 0},
        {"rounds": 2},
        {"batch_size": 0},
        {"train_size": 4},
        {"workers": -1},
        {"cohort_sizes": "3"},
        {"cohort_sizes": "x"},
        {"configs": ("bogus",)},
        {"methods": ""},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_input_is_kdbench_error(tmp_path, kwargs):
    args = {"pair": PAIR, "methods": "kd,crd", **TINY, "out": tmp_path / "out", **kwargs}
    with pytest.raises(KdbenchError):
        run_bench(args.pop("pair"), args.pop("methods"), **args)
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exit_2(monkeypatch, capsys, tmp_path):
    from kdbench.cli import main

    monkeypatch.setattr(sys, "argv", ["kdbench", "bench", "--pair", PAIR, "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_not_applicable_method_is_skipped():
    rec = run_bench("wrn_16_2:wrn_16_1", "kd,fsp", workers=0, configs=("cohort",), cohort_sizes="2", out=None, **TINY)
    assert list(rec["skipped"]) == ["fsp"] and rec["settings"]["methods"] == ["kd"]
    assert [(r["config"], r["methods"]) for r in rec["results"]] == [("cohort", ["kd"])]
    with pytest.raises(KdbenchError, match="no method applies"):
        run_bench("wrn_16_2:wrn_16_1", "fsp", workers=0, out=None, **TINY)


@pytest.mark.slow
def test_cli_prints_table_and_writes_json(monkeypatch, capsys, tmp_path):
    from kdbench.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "kdbench",
            "bench",
            "--pair",
            PAIR,
            "--methods",
            "kd",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "8",
            "--train-size",
            "16",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    main()
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("bench-cpu-*.json")
    assert "kdbench cohort of 1" in out and "vs reference" in out and path.name in out
    assert json.loads(path.read_text())["settings"]["methods"] == ["kd"]


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_variants_side_by_side():
    """Eager and compiled, fp32 and bf16 rows of kdbench's loop in one record (compiled with the cheap aot_eager
    backend here: by default the bench compiles with inductor, which takes minutes on a CPU)."""
    rec = run_bench(
        PAIR,
        "kd",
        workers=0,
        configs=("solo", "cohort"),
        out=None,
        compile_backend="aot_eager",
        variants="eager-fp32,eager-bf16,compile-bf16",
        **TINY,
    )
    rows = [(r["config"], r["variant"]) for r in rec["results"]]
    assert rows == [
        ("solo", "eager-fp32"),
        ("cohort", "eager-fp32"),
        ("solo", "eager-bf16"),
        ("cohort", "eager-bf16"),
        ("solo", "compile-bf16"),
        ("cohort", "compile-bf16"),
    ]
    assert all(r["loss_finite"] and _positive(r["images_per_s"]) for r in rec["results"])
    assert rec["settings"]["variants"] == ["eager-fp32", "eager-bf16", "compile-bf16"]
    with pytest.raises(KdbenchError, match="unknown variant"):
        run_bench(PAIR, "kd", workers=0, out=None, variants="fp16", **TINY)
    with pytest.raises(KdbenchError, match="warmup"):
        run_bench(PAIR, "kd", workers=0, out=None, variants="compile-fp32", **{**TINY, "warmup": 0})
