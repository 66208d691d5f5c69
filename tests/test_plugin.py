"""A third-party method package, really installed (pip), is discovered through the entry-point group and runs;
its broken sibling is listed with its error and nothing else breaks."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "toy_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    import shutil

    src = build / "toy_plugin"
    shutil.copytree(FIXTURE, src)  # build outside the source tree: nothing is left in tests/
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    for mod in [m for m in sys.modules if m.startswith("kdbench_toy")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def test_plugin_is_discovered_broken_one_is_listed(installed_plugin):
    from kdbench.method import discover, resolve

    reg = discover()
    assert reg["toy"].ok and reg["toy"].dist == "kdbench-toy-plugin" and reg["toy"].version == "0.0.1"
    assert not reg["toy-broken"].ok and "kdbench_toy_missing_dependency" in reg["toy-broken"].error
    assert not reg["toy-badneeds"].ok and "'preacts'" in reg["toy-badneeds"].error  # needs is checked
    assert reg["kd"].ok and reg["kd"].builtin  # everything else keeps working
    assert resolve("toy").cls.__module__ == "kdbench_toy"


@pytest.mark.slow
def test_plugin_runs_end_to_end(installed_plugin, tiny_toml, tmp_path):
    from kdbench.config import load_bench
    from kdbench.results import ResultStore
    from kdbench.sweep import Request, Sweep, expand

    store = ResultStore(tmp_path / "r")
    specs = expand(load_bench(tiny_toml), Request(["toy"], ["tiny"]), store)
    Sweep(store, torch.device("cpu")).run(specs)
    (run,) = [r for _, r, _ in store.iter_runs() if r["spec"]["method"] == "toy"]
    assert run["status"] == "done"
    assert run["method"]["dist"] == "kdbench-toy-plugin" and "toy" in run["curve"]["loss"]
    # `all` takes every method that loads, the plugin included, and skips the broken one.
    names = {s.method for s in expand(load_bench(tiny_toml), Request(["all"], ["tiny"]))}
    assert "toy" in names and "toy-broken" not in names


def test_allow_list_and_builtin_only(installed_plugin, monkeypatch):
    from kdbench.method import discover

    monkeypatch.setenv("KDBENCH_PLUGINS", "toy")
    reg = discover()
    assert "toy" in reg and "toy-broken" not in reg and "kd" in reg
    monkeypatch.setenv("KDBENCH_BUILTIN_ONLY", "1")
    reg = discover()
    assert "toy" not in reg and "kd" in reg


def test_list_methods_shows_broken_plugin(installed_plugin, monkeypatch, capsys):
    from kdbench.cli import main

    monkeypatch.setattr(sys, "argv", ["kdbench", "list", "methods"])
    monkeypatch.setenv("COLUMNS", "250")
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "toy-broken" in out and "broken" in out and "kdbench-toy-plugin" in out


def test_progress_reaches_loss_warmup_weight_follows_the_epoch(installed_plugin, tiny_toml, tmp_path):
    """A plugin whose weight depends on the epoch (a DKD-style warm-up) trains through the harness: each step's
    ``loss`` gets the main stage's Progress (epoch, epochs, step, steps)."""
    from kdbench.config import load_bench
    from kdbench.results import ResultStore
    from kdbench.sweep import Request, Sweep, expand

    store = ResultStore(tmp_path / "r")
    specs = expand(load_bench(tiny_toml), Request(["toy-warmup"], ["tiny"]), store)
    Sweep(store, torch.device("cpu")).run(specs)
    (run,) = [r for _, r, _ in store.iter_runs() if r["spec"]["method"] == "toy-warmup"]
    assert run["status"] == "done"
    loss = run["curve"]["loss"]
    # weight 0.5, warm-up over 2 epochs: 0.25 in epoch 0, 0.5 in epoch 1 (the per-epoch mean of a constant).
    assert loss["toy_w"] == pytest.approx([0.25, 0.5], rel=1e-6)
    # toy_seen = epoch + step / steps + epochs; the tiny protocol has 2 epochs of 96 / 32 = 3 steps, so its
    # per-epoch mean is epoch + (0 + 1/3 + 2/3) / 3 + 2.
    assert loss["toy_seen"] == pytest.approx([0 + 1 / 3 + 2, 1 + 1 / 3 + 2], rel=1e-6)


def test_readme_plugin_example_follows_the_contract():
    """The README's "Adding a method" example runs as written: progress in loss, init_stage(student), needs."""
    import re

    from kdbench.method import Batch, MethodContext, Progress
    from kdbench.models import create_model

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cls = namespace["MyMethod"]
    torch.manual_seed(0)
    teacher, student = create_model("resnet14", num_classes=4).eval(), create_model("resnet8", num_classes=4)
    ctx = MethodContext(
        student=student.feature_info,
        teacher=teacher.feature_info,
        num_classes=4,
        num_train=8,
        train_labels=torch.arange(8) % 4,
        image_size=16,
    )
    m = cls(namespace["MyConfig"](), ctx)
    x = torch.randn(2, 3, 16, 16)
    s_out, t_out = student(x), teacher(x)
    batch = Batch(images=x, labels=torch.zeros(2, dtype=torch.long), index=torch.arange(2))
    early = m.loss(s_out, t_out, batch, Progress(epoch=0, epochs=240, step=0, steps=391))["mine"]
    late = m.loss(s_out, t_out, batch, Progress(epoch=30, epochs=240, step=0, steps=391))["mine"]
    assert late.item() == pytest.approx(20 * early.item(), rel=1e-5)  # the warm-up reaches 1 after 20 epochs
    stage = m.init_stage(student)
    assert stage.student_modules == student.feature_modules()
    assert torch.isfinite(sum(stage.loss(s_out, t_out, batch).values()))
