"""The CIFAR model zoo: a timm-style registry over one file per family.

The families (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet) are imported on first use of the
registry, so ``import kdbench.models`` stays cheap.
"""

from kdbench.models.base import (
    FeatureInfo,
    ModelOutput,
    ZooModel,
    create_model,
    feature_info,
    list_models,
    register_model,
)

__all__ = [
    "FeatureInfo",
    "ModelOutput",
    "ZooModel",
    "create_model",
    "feature_info",
    "list_models",
    "register_model",
]
