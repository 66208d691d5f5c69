"""The synthetic data set's class structure (superclasses) and training-label noise options."""

from __future__ import annotations

import pytest
import torch

from kdbench.data import load_dataset, make_synthetic
from kdbench.errors import KdbenchError


def test_defaults_give_the_original_data():
    # the checksum the smoke pair set's runs were trained on before the options existed (their run ids too)
    a = make_synthetic(num_classes=10, image_size=16, train_size=1024, test_size=512)
    assert a.checksum == "00d667e886264b6d38554bbce6b5ae2d8e9c8f174fd3df2fa9e08b7077b4312a"
    assert "superclasses" not in a.source


def _clean_labels(**kw):
    """The labels the generator drew before any flip: the same data without label noise."""
    return make_synthetic(**{**kw, "label_noise": 0.0})


def test_label_noise_flips_that_share_of_training_labels_within_the_superclass():
    kw = dict(num_classes=20, image_size=8, train_size=4000, test_size=1000, seed=3, superclasses=5)
    noisy = make_synthetic(**kw, label_noise=0.3)
    clean = _clean_labels(**kw)
    flipped = noisy.train_labels != clean.train_labels
    assert 0.25 < flipped.float().mean().item() < 0.35
    # a flipped label stays in its superclass (class c is in superclass c % 5)
    assert torch.equal(noisy.train_labels[flipped] % 5, clean.train_labels[flipped] % 5)
    assert torch.equal(noisy.test_labels, clean.test_labels)  # test labels are clean
    assert "label_noise=0.3" in noisy.source and noisy.checksum != clean.checksum


def test_classes_of_a_superclass_look_alike():
    d = make_synthetic(num_classes=20, image_size=8, train_size=2000, test_size=100, seed=0, superclasses=5)
    x = d.train_images.float().flatten(1)
    means = torch.stack([x[d.train_labels == c].mean(0) for c in range(20)])
    dist = torch.cdist(means, means)
    same = torch.tensor([[i != j and i % 5 == j % 5 for j in range(20)] for i in range(20)])
    other = torch.tensor([[i % 5 != j % 5 for j in range(20)] for i in range(20)])
    assert dist[same].mean() < 0.7 * dist[other].mean()


@pytest.mark.parametrize(
    "kw",
    [dict(superclasses=3), dict(superclasses=-1), dict(label_noise=1.0), dict(label_noise="x"), dict(superclasses=20)],
)
def test_bad_options_are_one_clear_error(kw):
    with pytest.raises(KdbenchError, match="synthetic dataset"):
        load_dataset("synthetic", None, image_size=8, num_classes=10, train_size=20, test_size=10, **kw)


def test_unknown_option_names_every_option_of_make_synthetic():
    with pytest.raises(KdbenchError) as err:
        load_dataset("synthetic", None, image_size=8, num_clases=10)
    msg = str(err.value)
    assert "no option(s) num_clases" in msg
    for name in ("num_classes", "train_size", "test_size", "seed", "noise", "grid", "superclasses", "label_noise"):
        assert name in msg
    assert "image_size" not in msg.split("it takes")[1]  # a common argument, not a dataset option
    d = load_dataset("synthetic", None, image_size=8, num_classes=3, train_size=6, test_size=3, superclasses=3)
    assert tuple(d.train_images.shape) == (6, 3, 8, 8)
