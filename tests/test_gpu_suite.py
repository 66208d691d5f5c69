"""The GPU suite's plumbing, checked on the CPU in its dry mode (the real run needs a CUDA machine)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from kdbench.gpusuite import VARIANTS, run_gpu_suite


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_dry_run_writes_one_json_with_every_part(tmp_path):
    rec = run_gpu_suite(out=tmp_path, device="cpu", dry=True, budget_s=1e9)  # a loaded CPU must not skip parts
    (path,) = tmp_path.glob("gpu-suite-dry-cpu-*.json")
    saved = json.loads(path.read_text())
    assert saved == rec and saved["dry_run"] is True and saved["device_name"]
    parts = saved["parts"]
    assert set(parts) == {"tests", "speed", "real_epoch"}
    assert parts["tests"]["status"] in ("passed", "none selected"), parts["tests"]
    speed = parts["speed"]
    assert speed["status"] == "done", speed
    rows = {(r["config"], r["variant"]) for r in speed["results"] if r["measured"]}
    assert ("reference", "eager-fp32") in rows
    for v in VARIANTS:
        assert ("solo", v) in rows and ("cohort", v) in rows, v
    assert all(r["loss_finite"] for r in speed["results"] if r["measured"])
    assert parts["real_epoch"]["status"] == "done", parts["real_epoch"]
    epochs = parts["real_epoch"]["epochs"]
    assert set(epochs) == {"eager-fp32", "compile-bf16"}
    for e in epochs.values():
        assert e["epoch_seconds"] > 0 and not e["failed"] and all(v is not None for v in e["top1"].values())
    assert saved["total_seconds"] > 0 and set(saved["part_seconds"]) == set(parts)


def test_budget_skips_the_remaining_parts(tmp_path):
    rec = run_gpu_suite(out=tmp_path, device="cpu", dry=True, budget_s=0.0)
    assert all(p["status"] == "skipped" and "budget" in p["reason"] for p in rec["parts"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_only_the_dry_run_is_allowed(tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    monkeypatch.setattr(sys, "argv", ["kdbench", "bench", "--suite", "gpu", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
