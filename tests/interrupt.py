"""Interrupting a sweep the way a kill would, after a checkpoint: shared by the resume tests."""

from __future__ import annotations


class Killed(Exception):
    """Raised inside the sweep by ``interrupt_cohorts``."""


def interrupt_cohorts(monkeypatch, *, epoch: int = 1, spare: tuple[str, ...] = ()):
    """Make the sweep's ``train_cohort`` raise ``Killed`` once a member whose method is not in ``spare`` has
    finished ``epoch`` (its checkpoint is written; the sweep's own per-epoch callback still runs first).
    Returns the real ``train_cohort``, to put back for the resumed sweep."""
    import kdbench.train as train

    real = train.train_cohort

    def dying(members, *a, on_epoch=None, **kw):
        def die(m):
            if on_epoch is not None:
                on_epoch(m)
            if m.epoch == epoch and m.spec.method not in spare:
                raise Killed()

        return real(members, *a, on_epoch=die, **kw)

    monkeypatch.setattr("kdbench.sweep.train_cohort", dying)
    return real
