"""RRD: a hand-computed cross-entropy, FIFO queue order and wrap-around, before/after, state, the golden-value cases."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, MethodContext, discover
from kdbench.methods.rrd import RRD, RRD2025, RRDKD, RRD2025Config, RRDConfig, RRDKDConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START

STUDENT = FeatureInfo(channels=(4, 8), reduction=(1, 2), pooled_dim=8, num_classes=4)
TEACHER = FeatureInfo(channels=(4, 16), reduction=(1, 2), pooled_dim=16, num_classes=4)
PLANE = FeatureInfo(channels=(2,), reduction=(1,), pooled_dim=2, num_classes=2)  # for identity embeddings
N = 64
LABELS = torch.arange(N) % 4


def make_ctx(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER) -> MethodContext:
    return MethodContext(
        student=student, teacher=teacher, num_classes=student.num_classes, num_train=N, train_labels=LABELS
    )


def build(cls: type[RRD] = RRD, student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, **cfg) -> RRD:
    torch.manual_seed(0)
    m = cls(cls.Config(**cfg), make_ctx(student, teacher))
    m.rng = torch.Generator().manual_seed(0)
    return m


def make_out(info: FeatureInfo, b: int, gen: torch.Generator, grad: bool = False) -> ModelOutput:
    pooled = torch.randn(b, info.pooled_dim, generator=gen).relu().requires_grad_(grad)
    return ModelOutput(logits=torch.randn(b, info.num_classes, generator=gen), feats=[], preact=[], pooled=pooled)


def plain(pooled: list[list[float]]) -> ModelOutput:
    p = torch.tensor(pooled)
    return ModelOutput(logits=torch.zeros(p.shape[0], 2), feats=[], preact=[], pooled=p)


def make_batch(b: int, start: int = 0) -> Batch:
    index = torch.arange(start, start + b) % N
    return Batch(images=torch.zeros(b, 3, 8, 8), labels=LABELS[index], index=index)


def set_identity(embed: torch.nn.Module) -> None:
    with torch.no_grad():
        embed.linear.weight.copy_(torch.eye(*embed.linear.weight.shape))
        embed.linear.bias.zero_()


def plane_rrd(cls: type[RRD] = RRD, **cfg) -> RRD:
    m = build(cls, PLANE, PLANE, feat_dim=2, **cfg)
    set_identity(m.embed_s)
    set_identity(m.embed_t)
    return m


def embed(m_embed: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The embedding computed in the test with plain ops: normalize(W x + b)."""
    return F.normalize(pooled @ m_embed.linear.weight.detach().t() + m_embed.linear.bias.detach(), dim=1)


def cross_entropy(z_s: torch.Tensor, z_t: torch.Tensor, keys: torch.Tensor, tau_s: float, tau_t: float):
    p_t = F.softmax(z_t @ keys.t() / tau_t, dim=1)
    return -(p_t * F.log_softmax(z_s @ keys.t() / tau_s, dim=1)).sum(1).mean()


def test_registered_with_reference_defaults():
    reg = discover()
    assert reg["rrd"].cls is RRD and reg["rrd+kd"].cls is RRDKD and reg["rrd-2025"].cls is RRD2025
    a, k, b = RRDConfig(), RRDKDConfig(), RRD2025Config()
    assert (a.ce_weight, a.kd_weight, a.weight, a.feat_dim, a.queue_size) == (1.0, 0.0, 1.0, 128, 16384)
    assert (a.tau_s, a.tau_t, a.queue_update, a.train_teacher_embed) == (0.04, 0.10, "after", False)
    assert (k.kd_weight, k.tau_s, k.tau_t, k.queue_update) == (1.0, 0.04, 0.10, "after")
    assert (b.kd_weight, b.weight, b.tau_s, b.tau_t, b.queue_update) == (0.0, 1.0, 0.1, 0.02, "before")
    assert RRD.needs == {"pooled"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="queue_update"):
        build(queue_update="during")
    with pytest.raises(ValueError, match="train_teacher_embed"):
        build(train_teacher_embed=True)  # with "after", no key of the batch is ever in the graph


def test_hand_computed_cross_entropy_3x4():
    """3 samples, a queue of 4 known unit vectors, identity embeddings: the softmaxes written out by hand."""
    m = plane_rrd(queue_size=4)
    q = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)]
    m.queue.copy_(torch.tensor(q))
    m.queue_filled.fill_(4)
    m._filled = None  # buffers written by hand: forget the host-side mirror
    zs = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)]
    zt = [(0.0, 1.0), (1.0, 0.0), (0.8, 0.6)]
    loss = m.loss(plain([list(v) for v in zs]), plain([list(v) for v in zt]), make_batch(3), START)["rrd"]

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    total = 0.0
    for s, t in zip(zs, zt):
        ls = [dot(s, k) / 0.04 for k in q]
        lt = [dot(t, k) / 0.10 for k in q]
        zt_sum = sum(math.exp(x) for x in lt)
        log_zs = math.log(sum(math.exp(x) for x in ls))
        p_t = [math.exp(x) / zt_sum for x in lt]
        total += -sum(p * (x - log_zs) for p, x in zip(p_t, ls))
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    # "after": the batch's teacher keys were written once the loss was computed, at rows 0..2.
    assert torch.allclose(m.queue[:3], torch.tensor(zt)) and torch.equal(m.queue[3], torch.tensor(q[3]))
    assert int(m.queue_ptr) == 3 and int(m.queue_filled) == 4


def ids(*values: int) -> torch.Tensor:
    return torch.tensor([[float(v), 0.0] for v in values])


@pytest.mark.parametrize("sizes", [(3, 5, 3, 5, 3), (3, 3, 3, 3), (5, 5, 5), (10, 3)])
def test_queue_fifo_order_and_wrap_around(sizes: tuple[int, ...]):
    m = build(queue_size=8, feat_dim=2)
    written: list[int] = []
    for b in sizes:
        new = list(range(len(written), len(written) + b))
        rows = m.enqueue(ids(*new))
        written += new
        expected_rows = [(len(written) - min(b, 8) + j) % 8 for j in range(min(b, 8))]
        assert rows.tolist() == expected_rows  # consecutive rows from the pointer, wrapping around the end
        filled = min(len(written), 8)
        assert int(m.queue_ptr) == len(written) % 8 and int(m.queue_filled) == filled == m.filled()
        stored = m.queue[:, 0].long().tolist()
        if filled == 8:  # full: reading from the pointer gives the 8 newest keys, oldest first
            assert torch.roll(m.queue[:, 0], -int(m.queue_ptr)).long().tolist() == written[-8:]
        else:
            assert stored[:filled] == written


def test_queue_through_the_loss_with_batches_of_3_and_5():
    m = build(queue_size=8)
    gen = torch.Generator().manual_seed(0)
    keys: list[torch.Tensor] = []
    for step, b in enumerate((3, 5, 3, 5)):
        s, t = make_out(STUDENT, b, gen), make_out(TEACHER, b, gen)
        loss = m.loss(s, t, make_batch(b, 8 * step), START)["rrd"]
        assert torch.isfinite(loss)
        keys.append(embed(m.embed_t, t.pooled))
    newest = torch.cat(keys)[-8:]
    assert torch.allclose(torch.roll(m.queue, -int(m.queue_ptr), dims=0), newest, atol=1e-6)


def test_before_and_after_differ_as_described():
    gen = torch.Generator().manual_seed(7)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    prefill = F.normalize(torch.randn(5, 128, generator=gen), dim=1)
    losses, queues = {}, {}
    for mode in ("after", "before"):
        m = build(queue_size=16, queue_update=mode)  # same seed: same embeddings
        m.enqueue(prefill)
        z_s, z_t = embed(m.embed_s, s.pooled), embed(m.embed_t, t.pooled)
        keys = prefill if mode == "after" else torch.cat([prefill, z_t])
        expected = cross_entropy(z_s, z_t, keys, 0.04, 0.10)
        losses[mode] = m.loss(s, t, make_batch(4), START)["rrd"]
        assert losses[mode].item() == pytest.approx(expected.item(), rel=1e-5)
        queues[mode] = m.queue.clone()
    assert losses["after"].item() != pytest.approx(losses["before"].item(), rel=1e-3)
    assert torch.equal(queues["after"], queues["before"])  # both enqueue the same keys, at a different moment
    # From an empty queue, "after" has no key for its first step (zero loss); "before" sees the batch itself.
    first_after = build().loss(s, t, make_batch(4), START)["rrd"]
    first_before = build(RRD2025).loss(s, t, make_batch(4), START)["rrd"]
    assert first_after.item() == 0.0 and first_before.item() > 0


def test_state_round_trip_and_host_mirror():
    m = build(queue_size=8)
    gen = torch.Generator().manual_seed(3)
    for b in (3, 2):
        m.loss(make_out(STUDENT, b, gen), make_out(TEACHER, b, gen), make_batch(b), START)
    state = m.state_dict()
    assert {"queue", "queue_ptr", "queue_filled", "embed_t.linear.weight"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = build(queue_size=8)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("queue", "queue_ptr", "queue_filled"):
        assert torch.equal(getattr(fresh, name), getattr(m, name))
    assert fresh.filled() == 5  # the host-side mirror follows the loaded buffer
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m.eval(), fresh.eval()
    assert torch.equal(m.loss(s, t, make_batch(3), START)["rrd"], fresh.loss(s, t, make_batch(3), START)["rrd"])


def test_gradients_student_side_only_by_default():
    m = build(queue_size=16)
    gen = torch.Generator().manual_seed(5)
    m.enqueue(F.normalize(torch.randn(6, 128, generator=gen), dim=1))
    s, t = make_out(STUDENT, 4, gen, grad=True), make_out(TEACHER, 4, gen)
    m.loss(s, t, make_batch(4), START)["rrd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.embed_s.parameters())
    assert all(not p.requires_grad and p.grad is None for p in m.embed_t.parameters())  # fixed random projection
    assert s.pooled.grad.abs().sum() > 0
    # Our extension: with "before", the batch's fresh queue rows stay in the graph and train W_t.
    m2 = build(RRD2025, queue_size=16, train_teacher_embed=True)
    m2.loss(s, t, make_batch(4), START)["rrd"].backward()
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in m2.embed_t.parameters())


def test_eval_mode_leaves_the_queue_alone():
    for cls in (RRD, RRD2025):
        m = build(cls, queue_size=8).eval()
        gen = torch.Generator().manual_seed(6)
        m.loss(make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen), make_batch(3), START)
        assert int(m.queue_filled) == 0 and int(m.queue_ptr) == 0 and not m.queue.any()


# ---------------------------------------------------------------------------------------------- golden


def golden_values() -> dict[str, list[float]]:
    """Four steps of batch 6 on a queue of 16 (so it wraps), reference settings otherwise, for each variant."""
    values: dict[str, list[float]] = {}
    for cls in (RRD, RRDKD, RRD2025):
        m = build(cls, queue_size=16)
        gen = torch.Generator().manual_seed(1234)
        steps = []
        for step in range(4):
            s, t = make_out(STUDENT, 6, gen), make_out(TEACHER, 6, gen)
            steps.append(m.loss(s, t, make_batch(6, 6 * step), START)["rrd"].item())
        values[cls.name] = steps
    return values
