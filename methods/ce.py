"""The vanilla student: cross-entropy only, no teacher (also the loop that trains teachers)."""

from __future__ import annotations

from kdbench.method import Method


class CE(Method):
    """L = CE(s, y): the student trained alone on the labels (the 'Student' row of the tables).

    Taps: ``logits`` of the student; no teacher (``requires_teacher`` False). Departures: none.
    """

    name = "ce"
    paper = "Baseline: the student trained alone with cross-entropy"
    needs = frozenset({"logits"})
    requires_teacher = False
