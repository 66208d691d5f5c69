"""The model contract (ModelOutput, FeatureInfo) and the timm-style registry of the CIFAR zoo."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdbench.errors import KdbenchError


@dataclass
class ModelOutput:
    """What every zoo model returns.

    feats:  the stem output (after ReLU) then the output of every block group (VGG: every stage), in order;
            ``feats[-1]`` is the last feature map before global pooling. Indices follow the reference zoo's
            feature lists, so ``feats[2]`` is FitNet's hint layer 2.
    preact: the same taps before their final ReLU (AB needs them); None unless the forward was asked for them
            (``model(x, preact=True)``): the harness asks only when a method of the cohort declares "preact".
    pooled: the penultimate vector (after global pooling, flattened), the input of the classifier.
    """

    logits: torch.Tensor
    feats: list[torch.Tensor]
    preact: list[torch.Tensor] | None
    pooled: torch.Tensor


@dataclass(frozen=True)
class FeatureInfo:
    """Declared shapes of a model's taps, known without running it.

    channels[i] and reduction[i] describe feats[i] / preact[i]: a 32x32 input gives a map of
    32 // reduction[i] pixels a side.
    """

    channels: tuple[int, ...]
    reduction: tuple[int, ...]
    pooled_dim: int
    num_classes: int

    def spatial(self, i: int, image_size: int = 32) -> int:
        return image_size // self.reduction[i]


class ZooModel(nn.Module):
    """Base class of the zoo: a model with a declared ``feature_info`` and a final linear ``head``.

    Submodules keep the reference zoo's names (``fc``, ``classifier``, ``linear``...) so that published
    RepDistiller / mdistiller state dicts load key for key; ``head`` returns the final nn.Linear whatever
    it is called.
    """

    feature_info: FeatureInfo

    @property
    def head(self) -> nn.Linear:  # pragma: no cover - implemented by each family
        raise NotImplementedError

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        """Per tap i, the BatchNorm whose output is ``preact[i]`` (or its residual branch, before the shortcut is
        added), or None where no single BN precedes that tap's ReLU. OFD reads its margins from these; a family
        that does not say is treated as having none."""
        return [None] * len(self.feature_info.channels)

    def feature_modules(self) -> list[nn.Module]:
        """The layers an init stage trains (RepDistiller's ``get_feat_modules()``): by default every child
        module except ``head``; a family whose reference list leaves more out overrides it."""
        head = self.head
        return [m for m in self.children() if m is not head and head not in set(m.modules())]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:  # pragma: no cover - per family
        raise NotImplementedError


def freeze(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Eval mode and no gradients (moved to ``device`` first when given): how a teacher, or a model being probed,
    is held. Returns the model."""
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


_REGISTRY: dict[str, Callable[..., ZooModel]] = {}


def register_model(fn: Callable[..., ZooModel]) -> Callable[..., ZooModel]:
    """Decorator: register a constructor ``fn(num_classes=100) -> ZooModel`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style wildcard, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def check_model_name(name: str) -> str:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `kdbench list models`"
        raise KdbenchError(f"unknown model {name!r}: {hint}")
    return name


def create_model(name: str, num_classes: int = 100) -> ZooModel:
    """Build a zoo model by name; an unknown name raises KdbenchError listing the closest names."""
    check_model_name(name)
    return _REGISTRY[name](num_classes=num_classes)


def feature_info(name: str, num_classes: int = 100) -> FeatureInfo:
    """The declared FeatureInfo of a model (builds it on the meta device: no memory, no forward pass)."""
    check_model_name(name)
    with torch.device("meta"):
        return _REGISTRY[name](num_classes=num_classes).feature_info
