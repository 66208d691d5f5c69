"""The vanilla student: cross-entropy only, no teacher (also the loop that trains teachers)."""

from __future__ import annotations

from kdbench.method import Method


class CE(Method):
    """The student trained alone with cross-entropy on the labels (the 'Student' row of the tables)."""

    name = "ce"
    paper = "Baseline: the student trained alone with cross-entropy"
    needs = frozenset({"logits"})
    requires_teacher = False
