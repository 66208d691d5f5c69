"""Tests of the CIFAR model zoo, parametrised over the registry so that a new model is tested once registered.

The expected counts and state-dict key names were measured on the RepDistiller definitions (models/ of
HobbitLong/RepDistiller) outside this repository; equal keys mean its published checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import fnmatch
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import ModelOutput, ZooModel, create_model, feature_info, list_models

BATCH = 2
SIZES = (32, 64)

# name -> (parameters, state-dict entries) with 100 classes, as counted on the reference definitions.
EXPECTED: dict[str, tuple[int, int]] = {
    "resnet8": (83_892, 56),
    "resnet14": (181_108, 92),
    "resnet20": (278_324, 128),
    "resnet32": (472_756, 200),
    "resnet44": (667_188, 272),
    "resnet56": (861_620, 344),
    "resnet110": (1_736_564, 668),
    "resnet8x4": (1_233_540, 62),
    "resnet32x4": (7_433_860, 206),
    "resnet50": (23_705_252, 320),
    "wrn_16_1": (180_916, 82),
    "wrn_16_2": (703_284, 83),
    "wrn_40_1": (569_780, 226),
    "wrn_40_2": (2_255_156, 227),
    "vgg8": (3_965_028, 37),
    "vgg11": (9_277_284, 58),
    "vgg13": (9_462_180, 72),
    "vgg16": (14_774_436, 93),
    "vgg19": (20_086_692, 114),
    "mobilenetv2": (812_836, 320),
    "shufflenetv1": (949_258, 296),
    "shufflenetv2": (1_355_528, 338),
    # ImageNet models (kdbench.models.imagenet), counted on torchvision's definitions with 100 classes;
    # test_imagenet_models_match_torchvision checks them against torchvision directly.
    "tv_resnet18": (11_227_812, 122),
    "tv_resnet34": (21_335_972, 218),
    "tv_resnet50": (23_712_932, 320),
    "mobilenetv1": (3_309_476, 164),
}

# Shell pattern -> state-dict keys that the matching reference models have (first match wins per list).
REFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "tv_resnet50": ("conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.weight"),
    "tv_resnet*": ("conv1.weight", "layer2.0.downsample.1.running_mean", "layer4.1.bn2.weight", "fc.bias"),
    "mobilenetv1": ("conv1.weight", "bn1.running_var", "blocks.0.dw.weight", "blocks.12.bn2.bias", "fc.weight"),
    "resnet*x4": (
        "conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer3.0.downsample.1.num_batches_tracked",
        "layer3.0.bn2.running_var",
        "fc.weight",
        "fc.bias",
    ),
    "resnet50": ("conv1.weight", "layer1.0.shortcut.0.weight", "layer4.2.bn3.running_var", "linear.weight"),
    "resnet*": (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer3.0.downsample.1.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ),
    "wrn_*_2": (
        "block1.layer.0.convShortcut.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.1.bn2.bias",
        "bn1.running_var",
        "fc.weight",
    ),
    "wrn_*_1": ("block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.running_var", "fc.weight"),
    "vgg8": (
        "block0.0.weight",
        "block0.0.bias",
        "block0.1.running_mean",
        "block4.1.num_batches_tracked",
        "classifier.weight",
        "classifier.bias",
    ),
    "vgg*": (
        "block0.0.weight",
        "block0.0.bias",
        "block2.4.running_mean",
        "block4.4.num_batches_tracked",
        "classifier.weight",
        "classifier.bias",
    ),
    "mobilenetv2": (
        "conv1.0.weight",
        "conv1.1.running_mean",
        "blocks.0.0.conv.0.weight",
        "blocks.6.0.conv.7.running_var",
        "conv2.1.num_batches_tracked",
        "classifier.0.weight",
        "classifier.0.bias",
    ),
    "shufflenetv1": (
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer3.3.bn3.running_var",
        "linear.weight",
    ),
    "shufflenetv2": (
        "conv1.weight",
        "layer1.0.conv5.weight",
        "layer1.3.bn3.running_var",
        "conv2.weight",
        "bn2.num_batches_tracked",
        "linear.weight",
    ),
}
# Keys the reference does NOT have: an identity shortcut adds no module there.
ABSENT_KEYS: dict[str, tuple[str, ...]] = {
    "tv_resnet*": ("layer2.1.downsample.0.weight",),
    "resnet*x4": (),
    "resnet50": ("layer1.1.shortcut.0.weight",),
    "resnet*": ("layer1.0.downsample.0.weight",),
    "wrn_*_1": ("block1.layer.0.convShortcut.weight", "block2.layer.1.convShortcut.weight"),
    "wrn_*_2": ("block2.layer.1.convShortcut.weight",),
}

MODELS = list_models()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 tensors gain nothing from intra-op threads, and on a busy 2-core runner their spin-waiting
    made this module ~30x slower (100 s instead of a few). The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _model(name: str) -> ZooModel:
    """One model per name for the whole module (building the big ones is the slow part), in eval mode."""
    torch.manual_seed(0)
    return create_model(name).eval()


@functools.cache
def _output(name: str, size: int) -> ModelOutput:
    torch.manual_seed(1)
    with torch.no_grad():
        return _model(name)(torch.randn(BATCH, 3, size, size), preact=True)


def _first_match(table: dict[str, tuple[str, ...]], name: str) -> tuple[str, ...] | None:
    return next((keys for pattern, keys in table.items() if fnmatch.fnmatch(name, pattern)), None)


def test_registry_holds_the_reference_zoo() -> None:
    assert set(EXPECTED) <= set(MODELS)
    assert MODELS == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name: str) -> None:
    assert name in EXPECTED, f"{name} is registered but has no expected parameter count in EXPECTED"
    params, entries = EXPECTED[name]
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("name", MODELS)
def test_reference_state_dict_keys(name: str) -> None:
    keys = set(_model(name).state_dict())
    expected = _first_match(REFERENCE_KEYS, name)
    assert expected is not None, f"{name} has no reference key names in REFERENCE_KEYS"
    assert not set(expected) - keys
    assert not set(_first_match(ABSENT_KEYS, name) or ()) & keys


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name: str, size: int) -> None:
    model, out = _model(name), _output(name, size)
    info = model.feature_info
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (BATCH, info.num_classes)
    assert len(out.feats) == len(out.preact) == len(info.channels) == len(info.reduction)
    for i, (f, p) in enumerate(zip(out.feats, out.preact)):
        side = info.spatial(i, size)
        assert f.shape == (BATCH, info.channels[i], side, side), f"feats[{i}]"
        assert p.shape == f.shape, f"preact[{i}]"
        assert torch.isfinite(f).all() and torch.isfinite(p).all()
    assert out.pooled.shape == (BATCH, info.pooled_dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_is_declared(name: str) -> None:
    assert feature_info(name) == _model(name).feature_info
    assert feature_info(name, num_classes=10).num_classes == 10


@pytest.mark.parametrize("name", MODELS)
def test_head_is_the_final_linear(name: str) -> None:
    model, out = _model(name), _output(name, 32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.head is linears[-1]
    assert model.head.in_features == model.feature_info.pooled_dim
    assert model.head.out_features == model.feature_info.num_classes
    with torch.no_grad():
        torch.testing.assert_close(model.head(out.pooled), out.logits)
    with torch.device("meta"):
        assert create_model(name, num_classes=10).head.out_features == 10


@pytest.mark.parametrize("name", MODELS)
def test_preact_precedes_the_relu(name: str) -> None:
    out = _output(name, 32)
    if name.startswith("wrn_"):
        # Pre-activation net: preact[i] is the BN output the next ReLU consumes; the last one feeds the pool.
        torch.testing.assert_close(out.pooled, F.relu(out.preact[-1]).mean(dim=(2, 3)))
        return
    for i, (f, p) in enumerate(zip(out.feats, out.preact)):
        # A tap with no ReLU after it (MobileNetV2's linear bottlenecks) is its own pre-activation.
        assert p is f or torch.equal(F.relu(p), f), f"relu(preact[{i}]) != feats[{i}]"


@pytest.mark.parametrize("name", MODELS)
def test_preact_only_when_asked_and_nothing_else_changes(name: str) -> None:
    """Without ``preact=True`` the forward keeps no pre-activation (its last ReLUs run in place): same outputs,
    same gradients, ``preact`` None."""
    model = _model(name)
    model.train()
    try:
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        params = list(model.parameters())
        runs = []
        for preact in (True, False):
            out = model(x, preact=preact)
            loss = out.logits.square().mean() + sum(f.mean() for f in out.feats) + out.pooled.mean()
            runs.append((out, torch.autograd.grad(loss, params)))
        (with_pre, g_with), (without, g_without) = runs
        assert without.preact is None and len(with_pre.preact) == len(with_pre.feats)
        assert torch.equal(with_pre.logits, without.logits) and torch.equal(with_pre.pooled, without.pooled)
        assert all(torch.equal(a, b) for a, b in zip(with_pre.feats, without.feats))
        assert all(torch.equal(a, b) for a, b in zip(g_with, g_without))
    finally:
        model.eval()


# Children that RepDistiller's get_feat_modules() leaves out besides the classifier: an init stage does not train
# them and keeps them in eval mode.
NOT_FEATURE_MODULES = {"wrn_*": {"bn1"}, "mobilenetv2": {"conv2"}, "shufflenetv2": {"conv2", "bn2"}}


@pytest.mark.parametrize("name", MODELS)
def test_feature_modules_are_the_references(name: str) -> None:
    model = _model(name)
    children = dict(model.named_children())
    got = {n for n, m in children.items() if any(m is f for f in model.feature_modules())}
    head = {n for n, m in children.items() if model.head is m or model.head in set(m.modules())}
    left_out = next((v for k, v in NOT_FEATURE_MODULES.items() if fnmatch.fnmatch(name, k)), set())
    assert len(model.feature_modules()) == len(got)
    assert got == set(children) - head - left_out


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _model(name)
    model.train()
    try:
        torch.manual_seed(2)
        model(torch.randn(BATCH, 3, 32, 32)).logits.square().mean().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_unknown_model_names_the_closest() -> None:
    with pytest.raises(KdbenchError, match="resnet8x4"):
        create_model("resnet8x5")
    with pytest.raises(KdbenchError):
        feature_info("resnet8x5")


def test_list_models_filters() -> None:
    resnets = list_models("resnet*")
    assert resnets and all(n.startswith("resnet") for n in resnets)
    assert {"resnet8", "resnet8x4", "resnet32x4", "resnet50"} <= set(resnets)
    assert "wrn_40_2" not in resnets
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert list_models("no_such_model*") == []


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet34", "tv_resnet50"])
def test_imagenet_models_match_torchvision(name: str) -> None:
    """torchvision's own definition is the reference: same parameter count at 1000 classes, and its state dict
    loads with strict=True and gives the same logits (so its published weights are these models' weights)."""
    import torchvision

    torch.manual_seed(0)
    ref = getattr(torchvision.models, name.removeprefix("tv_"))(num_classes=1000).eval()
    model = create_model(name, num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x), rtol=0, atol=0)


def test_mobilenetv1_parameter_count() -> None:
    """MobileNetV1 (Howard et al. 2017, 1000 classes): the count from its layer table, 4,231,976 (the paper's 4.2M),
    computed here from the block list written out independently of the model's code."""
    blocks = [(32, 64)] + [(64, 128), (128, 128), (128, 256), (256, 256), (256, 512)] + [(512, 512)] * 5
    blocks += [(512, 1024), (1024, 1024)]
    count = 3 * 32 * 9 + 2 * 32  # stem conv + BN
    count += sum(i * 9 + 2 * i + i * o + 2 * o for i, o in blocks)  # depthwise + BN, pointwise + BN
    count += 1024 * 1000 + 1000
    assert count == 4_231_976
    assert sum(p.numel() for p in create_model("mobilenetv1", num_classes=1000).parameters()) == count
