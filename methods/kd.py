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
    """L = gamma CE(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T)), gamma 0.1, alpha 0.9, T 4.

    Taps: ``logits`` of both networks. Both terms are added by the harness (``loss`` returns nothing of its own).
    Departures: none; the weights are the CRD benchmark's protocol.
    """

    name = "kd"
    paper = "Hinton, Vinyals & Dean. Distilling the Knowledge in a Neural Network. arXiv 2015"
    Config = KDConfig
    needs = frozenset({"logits"})
