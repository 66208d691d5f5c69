"""Shared fixtures: a tiny bench (synthetic data, resnet14 -> resnet8 at 16x16) that trains in seconds on a CPU."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

# The method tests' shared checks (golden values, ...) assert in this helper module: let pytest explain a failure there.
pytest.register_assert_rewrite("tests.method_helpers")

TINY_TOML = textwrap.dedent("""
    [defaults]
    protocol = "tiny"
    seeds = [0]
    results = "results"

    [protocols.tiny]
    epochs = 2
    batch_size = 32
    lr = 0.05
    lr_small = 0.01
    small_lr_students = ["mobilenetv2"]
    momentum = 0.9
    weight_decay = 5e-4
    milestones = [1]
    lr_decay = 0.1
    init_epochs = 1
    eval_every = 1

    [pairs.tiny]
    dataset = "synthetic"
    pairs = ["resnet14:resnet8"]

    [pairs.tiny.dataset_options]
    num_classes = 8
    image_size = 16
    train_size = 96
    test_size = 48
    seed = 0

    [pairs.tiny2]
    dataset = "synthetic"
    pairs = ["wrn_16_2:wrn_16_1"]

    [pairs.tiny2.dataset_options]
    num_classes = 8
    image_size = 16
    train_size = 64
    test_size = 32
    seed = 0
""")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="session")
def tiny_data():
    from kdbench.data import load_dataset

    return load_dataset("synthetic", None, image_size=16, num_classes=8, train_size=96, test_size=48, seed=0)


def shared_data(name: str) -> Path:
    """A folder of $KDBENCH_SHARED/data when that is set (the only place then looked: set it to a missing folder to
    run the suite as a fresh clone would), else of ../shared/data beside the checkout (CI's layout), or of
    /work/shared/data. Tests that need one skip, saying so, when it is not there."""
    import os

    if os.environ.get("KDBENCH_SHARED"):
        return Path(os.environ["KDBENCH_SHARED"]) / "data" / name
    candidates = [Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")]
    for root in candidates:
        if (root / "data" / name).is_dir():
            return root / "data" / name
    return candidates[0] / "data" / name
