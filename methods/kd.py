"""Hinton et al. 2015: soft targets at temperature T. The harness computes the KD term from the weights."""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.method import Method, MethodConfig


@dataclass
class KDConfig(MethodConfig):
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    temperature: float = 4.0


class KD(Method):
    """Knowledge distillation: 0.1 CE + 0.9 KL(softmax(t/T) || softmax(s/T)) T^2 with T = 4 (CRD protocol)."""

    name = "kd"
    paper = "Hinton, Vinyals & Dean. Distilling the Knowledge in a Neural Network. arXiv 2015"
    url = "https://arxiv.org/abs/1503.02531"
    Config = KDConfig
    needs = frozenset({"logits"})
