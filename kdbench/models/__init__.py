"""The CIFAR model zoo: a timm-style registry over one file per family.

``base`` holds the output and feature records, the model base class and the registry; it imports no family. The
families (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet) register their constructors when this package
imports them, as timm's ``timm.models`` does, so importing anything of ``kdbench.models`` fills the registry.
"""

# Importing the families registers their constructors (in any order: base imports none of them).
from kdbench.models import imagenet, mobilenetv2, resnet, resnetv2, shufflenet, vgg, wrn  # noqa: F401
from kdbench.models.base import (
    FeatureInfo,
    ModelOutput,
    ZooModel,
    create_model,
    feature_info,
    freeze,
    list_models,
    register_model,
)

__all__ = [
    "FeatureInfo",
    "ModelOutput",
    "ZooModel",
    "create_model",
    "feature_info",
    "freeze",
    "list_models",
    "register_model",
]
