"""kdbench.execute: the one library call behind `kdbench run`."""

from __future__ import annotations

import pytest

from kdbench.config import load_bench
from kdbench.errors import KdbenchError
from kdbench.execute import execute, local_devices
from kdbench.results import ResultStore
from kdbench.sweep import Request, expand


@pytest.mark.slow
def test_execute_trains_what_is_missing_then_nothing(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "results")
    specs = expand(load_bench(tiny_toml), Request(["ce", "kd"], ["tiny"]), store)
    logged: list[str] = []
    first = execute(store, specs, device="cpu", log=logged.append)
    assert first.executor == "local" and first.jobs == []
    assert sorted(first.report.trained) == sorted(s.label for s in specs) and not first.report.failed
    assert any("training teacher resnet14" in line for line in logged)  # kd needs the teacher: trained first
    for s in specs:
        assert store.finished(s.label)["status"] == "done"
    again = execute(store, specs, device="cpu")
    assert again.report.trained == [] and sorted(again.report.skipped) == sorted(s.label for s in specs)


def test_execute_checks_its_input_before_writing(tiny_toml, tmp_path):
    store = ResultStore(tmp_path / "results")
    specs = expand(load_bench(tiny_toml), Request(["ce"], ["tiny"]), store)
    with pytest.raises(KdbenchError, match="unknown executor"):
        execute(store, specs, executor="cloud")
    with pytest.raises(KdbenchError, match="unknown device"):
        execute(store, specs, device="tpu:0")
    assert not (tmp_path / "results").exists()


def test_local_devices():
    assert local_devices("cpu") == ["cpu"]
    assert local_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    with pytest.raises(KdbenchError, match="at least 1"):
        local_devices("cpu", 0)
