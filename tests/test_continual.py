"""Continual strategies: replay buffer statistics and exact resume, regularizers checked by hand."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from streamssl.config import Config
from streamssl.continual.cassle import CaSSLe
from streamssl.continual.context import SegmentContext, StepContext
from streamssl.continual.lump import LUMP, mixup_views
from streamssl.ssl.base import SSLMethod, StepClock, StepOutput
from streamssl.continual import (
    EWC,
    L2SP,
    MAS,
    FifoBuffer,
    Joint,
    ReplayBuffer,
    ReplayPlugin,
    SegmentData,
    Strategy,
    balanced_quotas,
    build_strategy,
)

# --------------------------------------------------------------------------- replay helpers


def _rows(start: int, n: int, segment: int | None = None) -> pa.Table:
    """``n`` stream rows with global indices ``start..start+n-1`` (``idx`` is an extra column)."""
    idx = np.arange(start, start + n, dtype=np.int64)
    cols = {"image_id": pa.array([f"img-{i:07d}" for i in idx]), "idx": pa.array(idx)}
    if segment is not None:
        cols["segment"] = pa.array(np.full(n, segment, np.int32))
    return pa.table(cols)


def _idx(buf: ReplayBuffer) -> np.ndarray:
    return buf.rows()["idx"].to_numpy()


SEGMENTS = [_rows(0, 120, 0), _rows(120, 300, 1), _rows(420, 80, 2)]


def _feed(buf: ReplayBuffer, segments: list[pa.Table], first: int = 0) -> ReplayBuffer:
    for s, t in enumerate(segments, start=first):
        buf.update(t, s)
    return buf


# --------------------------------------------------------------------------- replay: reservoir


def test_reservoir_fills_first_then_never_exceeds_capacity():
    buf = ReplayBuffer(50, "reservoir", seed=0)
    buf.update(_rows(0, 30), 0)  # no segment column: it is added
    assert len(buf) == 30 and sorted(_idx(buf)) == list(range(30))
    assert buf.rows().column_names == ["image_id", "segment", "idx"]
    assert buf.rows()["segment"].type == pa.int32()
    sizes = []
    for s, n in enumerate([40, 100, 1, 500], start=1):
        buf.update(_rows(buf.seen, n, s), s)
        sizes.append(len(buf))
        assert len(set(_idx(buf))) == len(buf)  # no duplicates
    assert sizes == [50, 50, 50, 50] and buf.seen == 671
    assert buf.seen_per_segment == {0: 30, 1: 40, 2: 100, 3: 1, 4: 500}
    assert sum(buf.segment_counts().values()) == 50


def test_reservoir_inclusion_is_uniform_over_the_stream():
    trials, n, k = 200, 1000, 100
    segs = [_rows(i, 250, s) for s, i in enumerate(range(0, n, 250))]
    counts = np.zeros(n)
    for seed in range(trials):
        buf = _feed(ReplayBuffer(k, "reservoir", seed=seed), segs)
        assert len(buf) == k
        counts[_idx(buf)] += 1
    freq = counts / trials
    # Each item's frequency: mean 0.1, sd ~0.021 over 200 trials.
    assert abs(freq.mean() - 0.1) < 1e-12
    assert np.abs(freq - 0.1).max() < 0.11
    # Blocks of 100 items (sd ~0.002): early, middle and late parts of the stream are equally kept.
    blocks = freq.reshape(10, 100).mean(axis=1)
    assert np.abs(blocks - 0.1).max() < 0.012, blocks
    # Chi-square of the per-item counts against uniform (999 dof: mean <= 999, sd ~45).
    expected = trials * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert 700 < chi2 < 1250, chi2


def test_reservoir_processes_a_million_rows_quickly():
    big = pa.table({"image_id": pa.array(np.char.add("id", np.arange(1_000_000).astype(str)))})
    buf = ReplayBuffer(5000, "reservoir", seed=0)
    buf.update(_rows(0, 10, 0), 0)
    t0 = time.perf_counter()
    buf.update(big, 1)
    assert time.perf_counter() - t0 < 5.0
    assert len(buf) == 5000 and buf.seen == 1_000_010
    # ~5000 * 1e6 / (1e6 + 10) of the rows come from the big segment.
    assert buf.segment_counts()[1] > 4980


# --------------------------------------------------------------------------- replay: balanced


def test_balanced_quotas_water_filling():
    assert balanced_quotas(90, {0: 100, 1: 100, 2: 100}) == {0: 30, 1: 30, 2: 30}
    assert balanced_quotas(100, {0: 100, 1: 100, 2: 100}) == {0: 34, 1: 33, 2: 33}
    assert balanced_quotas(100, {0: 90, 1: 10, 2: 1000}) == {0: 45, 1: 10, 2: 45}
    assert balanced_quotas(100, {0: 20, 1: 30}) == {0: 20, 1: 30}
    assert balanced_quotas(10, {0: 0, 1: 50}) == {0: 0, 1: 10}


def test_balanced_gives_each_segment_an_equal_share():
    buf = ReplayBuffer(90, "balanced", seed=3)
    kept_before: set[int] = set()
    for s in range(3):
        buf.update(_rows(1000 * s, 200, s), s)
        counts = buf.segment_counts()
        assert counts == {t: 90 // (s + 1) for t in range(s + 1)}
        now = set(_idx(buf))
        # Past segments only shrink: no row of theirs reappears after being dropped.
        assert {i for i in now if i < 1000 * s} <= kept_before
        kept_before = now
    rows = buf.rows()
    assert rows["segment"].to_pylist() == sorted(rows["segment"].to_pylist())  # deterministic order
    # A small segment keeps all its rows; the others split the rest.
    buf.update(_rows(5000, 4, 3), 3)
    assert buf.segment_counts() == {0: 29, 1: 29, 2: 28, 3: 4}
    assert len(buf) == 90


def test_balanced_subsets_are_uniform_within_a_segment():
    counts = np.zeros(200)
    for seed in range(100):
        buf = ReplayBuffer(40, "balanced", seed=seed)
        buf.update(_rows(0, 200, 0), 0)
        buf.update(_rows(200, 200, 1), 1)  # segment 0 shrinks from 40 to 20 rows
        counts[_idx(buf)[_idx(buf) < 200]] += 1
    freq = counts / 100  # expected 20/200 = 0.1 for every row of segment 0
    assert np.abs(freq.reshape(4, 50).mean(axis=1) - 0.1).max() < 0.02


# --------------------------------------------------------------------------- replay: determinism, resume


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_replay_is_deterministic_for_a_seed_and_differs_across_seeds(policy):
    a = _feed(ReplayBuffer(60, policy, seed=7), SEGMENTS).rows()
    b = _feed(ReplayBuffer(60, policy, seed=7), SEGMENTS).rows()
    c = _feed(ReplayBuffer(60, policy, seed=8), SEGMENTS).rows()
    assert a.equals(b)
    assert not a.equals(c)


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_save_load_round_trip_and_resumed_future_choices(tmp_path, policy):
    continuous = _feed(ReplayBuffer(60, policy, seed=5), SEGMENTS)

    first = _feed(ReplayBuffer(60, policy, seed=5), SEGMENTS[:2])
    first.sample_for_segment(500, seed=1)  # sampling must not perturb the buffer's own RNG
    first.save(tmp_path / "replay")
    assert sorted(p.name for p in (tmp_path / "replay").iterdir()) == ["replay.parquet", "replay_state.json"]
    state = json.loads((tmp_path / "replay" / "replay_state.json").read_text())
    assert state["policy"] == policy and state["capacity"] == 60 and state["seen"] == 420
    assert state["seen_per_segment"] == {"0": 120, "1": 300}

    restored = ReplayBuffer.load(tmp_path / "replay")
    assert restored.rows().equals(first.rows())
    assert restored.state_dict() == first.state_dict()
    assert restored.sample_for_segment(77, seed=3).equals(first.sample_for_segment(77, seed=3))
    restored.update(SEGMENTS[2], 2)
    assert restored.rows().equals(continuous.rows())
    assert restored.state_dict() == continuous.state_dict()


def test_load_rejects_files_from_different_saves(tmp_path):
    a = _feed(ReplayBuffer(30, "reservoir", seed=0), SEGMENTS[:1])
    b = _feed(ReplayBuffer(30, "reservoir", seed=1), SEGMENTS[:1])
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    (tmp_path / "a" / "replay.parquet").write_bytes((tmp_path / "b" / "replay.parquet").read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        ReplayBuffer.load(tmp_path / "a")


def test_sample_for_segment():
    buf = _feed(ReplayBuffer(50, "reservoir", seed=0), SEGMENTS[:1])
    few = buf.sample_for_segment(20, seed=1)
    assert few.num_rows == 20 and len(set(few["image_id"].to_pylist())) == 20
    assert set(few["image_id"].to_pylist()) <= set(buf.rows()["image_id"].to_pylist())
    assert few.equals(buf.sample_for_segment(20, seed=1))
    assert not few.equals(buf.sample_for_segment(20, seed=2))
    many = buf.sample_for_segment(130, seed=1)  # with replacement: every row 2 or 3 times
    _, reps = np.unique(many["image_id"].to_numpy(zero_copy_only=False), return_counts=True)
    assert many.num_rows == 130 and reps.size == 50 and set(reps) == {2, 3}
    assert buf.sample_for_segment(0, seed=1).num_rows == 0
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(5).sample_for_segment(3, seed=0)


def test_update_validates_rows():
    buf = ReplayBuffer(10, seed=0)
    with pytest.raises(ValueError, match="image_id"):
        buf.update(pa.table({"id": ["a"]}), 0)
    with pytest.raises(ValueError, match="other segment"):
        buf.update(_rows(0, 5, segment=1), 0)
    with_bytes = _rows(0, 5, 0).append_column("image", pa.array([b"\x89PNG"] * 5, pa.binary()))
    buf.update(with_bytes, 0)
    assert "image" not in buf.rows().column_names  # ids only, never image bytes
    with pytest.raises(ValueError, match="already"):
        buf.update(_rows(5, 5, 0), 0)


# --------------------------------------------------------------------------- regularizers: helpers


class Tiny(nn.Module):
    """f(x) = W x (the encoder), a head, a frozen EMA copy, and a buffer the forward mutates."""

    def __init__(self, w: torch.Tensor | None = None) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 2, bias=False)
        self.head = nn.Linear(2, 2)
        self.target = nn.Linear(3, 2, bias=False)
        self.target.requires_grad_(False)
        self.register_buffer("calls", torch.zeros(()))
        with torch.no_grad():
            self.backbone.weight.copy_(w if w is not None else torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]]))
            self.head.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 2.0]]))
            self.head.bias.zero_()
            self.target.weight.copy_(self.backbone.weight)

    def ssl_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """L = Σ_i (W a_i)·(W b_i): simple enough to differentiate by hand."""
        self.calls += 1
        return (self.backbone(v1) * self.backbone(v2)).sum()


def _x(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def _mas_by_hand(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """mean_i |2 (W x_i) x_iᵀ|, the MAS importance of W for f(x) = W x."""
    return torch.stack([(2 * torch.outer(w @ x, x)).abs() for x in xs]).mean(0)


def _ewc_by_hand(w: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """mean_batches (∂L/∂W)² with ∂L/∂W = W Σ_i (a_i b_iᵀ + b_i a_iᵀ)."""
    grads = [w @ (a.T @ b + b.T @ a) for a, b in pairs]
    return torch.stack([g**2 for g in grads]).mean(0)


def _no_loss(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    raise AssertionError("this regularizer must not evaluate the SSL loss")


def _no_batches():
    raise AssertionError("this regularizer must not read data")
    yield  # pragma: no cover  (makes this a generator: it fails only when iterated)


# --------------------------------------------------------------------------- MAS / EWC / L2SP


def test_mas_importance_matches_the_hand_computation():
    m = Tiny()
    w = m.backbone.weight.detach().clone()
    b1, b2, b3 = (_x(1, 4), _x(2, 4)), (_x(3, 2), _x(4, 2)), (_x(5, 3), _x(6, 3))
    reg = MAS(lambda_=1.0)
    assert reg.quadratic_penalty(m).item() == 0.0  # nothing learned yet
    reg.estimate(m, iter([b1, b2, b3]), _no_loss, max_batches=2)  # b3 is beyond max_batches
    expected = _mas_by_hand(w, torch.cat([b1[0], b2[0]]))
    assert set(reg.omega) == {"backbone.weight"} == set(reg.anchor)  # heads and EMA target excluded
    assert torch.allclose(reg.omega["backbone.weight"], expected, atol=1e-6)
    # Per-sample absolute values, not |mean gradient| (which would cancel signs).
    batch_level = (2 * (w @ torch.cat([b1[0], b2[0]]).T) @ torch.cat([b1[0], b2[0]]) / 6).abs()
    assert not torch.allclose(expected, batch_level, atol=1e-3)
    assert torch.equal(reg.anchor["backbone.weight"], w)


def _two_mas_segments(reg: MAS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run two segments with different weights and data; return (Ω_a, Ω_b, final weights)."""
    m = Tiny()
    xa, xb = _x(10, 5), _x(11, 5)
    w1 = m.backbone.weight.detach().clone()
    reg.estimate(m, [(xa, xa)], _no_loss, 1)
    with torch.no_grad():
        m.backbone.weight.mul_(-1.5).add_(0.2)
    w2 = m.backbone.weight.detach().clone()
    reg.estimate(m, [(xb, xb)], _no_loss, 1)
    return _mas_by_hand(w1, xa), _mas_by_hand(w2, xb), w2


def test_mas_accumulates_the_sum_over_segments_as_in_the_paper():
    reg = MAS()
    a, b, w2 = _two_mas_segments(reg)
    assert torch.allclose(reg.omega["backbone.weight"], a + b, atol=1e-5)  # Ω ← Ω_prev + Ω_new
    assert not torch.allclose(reg.omega["backbone.weight"], (a + b) / 2, atol=1e-3)
    assert torch.equal(reg.anchor["backbone.weight"], w2) and reg.segments == 2
    # A third segment with the same importance as the first adds it once more.
    assert torch.allclose(reg.accumulate(reg.omega, {"backbone.weight": a})["backbone.weight"], 2 * a + b, atol=1e-5)


def test_mas_running_mean_is_an_explicit_opt_in():
    reg = MAS(accumulate="mean")
    a, b, _ = _two_mas_segments(reg)
    assert torch.allclose(reg.omega["backbone.weight"], (a + b) / 2, atol=1e-5)
    assert reg.describe() == "mas(lambda=1,accumulate=mean)" and MAS().describe() == "mas(lambda=1)"
    with pytest.raises(ValueError, match="'sum', 'mean'"):
        MAS(accumulate="max")


def test_mas_sum_treats_a_parameter_missing_on_one_side_as_zero():
    reg = MAS()
    one, two = torch.ones(2), torch.full((3,), 2.0)
    out = reg.accumulate({"old": one}, {"new": two})
    assert torch.equal(out["old"], one) and torch.equal(out["new"], two)


def test_ewc_fisher_matches_the_hand_computation_and_decays_online():
    m = Tiny()
    w1 = m.backbone.weight.detach().clone()
    pairs = [(_x(20, 4), _x(21, 4)), (_x(22, 4), _x(23, 4))]
    reg = EWC(lambda_=2.0, gamma=0.5)
    reg.estimate(m, iter(pairs), m.ssl_loss, max_batches=5)
    f1 = _ewc_by_hand(w1, pairs)
    assert torch.allclose(reg.omega["backbone.weight"], f1, rtol=1e-5, atol=1e-6)
    # The head does not enter this loss: zero Fisher; the frozen target is not regularized.
    assert torch.equal(reg.omega["head.weight"], torch.zeros(2, 2))
    assert "target.weight" not in reg.omega and "target.weight" not in reg.anchor
    assert int(m.calls) == 0  # the module's buffers are restored after the importance pass

    with torch.no_grad():
        m.backbone.weight.add_(0.3)
    w2 = m.backbone.weight.detach().clone()
    pairs2 = [(_x(30, 3), _x(31, 3))]
    reg.estimate(m, iter(pairs2), m.ssl_loss, max_batches=5)
    expected = 0.5 * f1 + _ewc_by_hand(w2, pairs2)
    assert torch.allclose(reg.omega["backbone.weight"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(reg.anchor["backbone.weight"], w2)


def test_penalty_is_zero_at_the_anchor_and_matches_the_hand_value_when_displaced():
    m = Tiny()
    pairs = [(_x(40, 4), _x(41, 4))]
    reg = EWC(lambda_=3.0)
    reg.estimate(m, pairs, m.ssl_loss, 1)
    assert reg.quadratic_penalty(m).item() == 0.0
    delta = torch.tensor([[0.1, -0.2, 0.3], [0.05, 0.0, -0.4]])
    with torch.no_grad():
        m.backbone.weight.add_(delta)
        m.head.bias.add_(torch.tensor([1.0, -1.0]))  # Ω = 0 there: no contribution
        m.target.weight.add_(5.0)  # frozen EMA network: not regularized
    omega = reg.omega["backbone.weight"]
    expected = 0.5 * 3.0 * (omega * delta**2).sum()
    pen = reg.quadratic_penalty(m)
    assert pen.dtype == torch.float32
    assert torch.allclose(pen, expected, rtol=1e-5)

    # The gradient is λ Ω (θ − θ*) and a gradient step moves the weights toward the anchor.
    pen.backward()
    assert torch.allclose(m.backbone.weight.grad, 3.0 * omega * delta, rtol=1e-5, atol=1e-7)
    before = (m.backbone.weight - reg.anchor["backbone.weight"]).abs().sum().item()
    with torch.no_grad():
        m.backbone.weight.sub_(0.01 * m.backbone.weight.grad)
    after = (m.backbone.weight - reg.anchor["backbone.weight"]).abs().sum().item()
    assert after < before and reg.quadratic_penalty(m).item() < pen.item()


def test_parameters_missing_from_the_anchor_are_skipped():
    m = Tiny()
    reg = L2SP(lambda_=1.0)
    reg.estimate(m, _no_batches(), _no_loss, 10)  # L2-SP needs no data
    assert set(reg.anchor) == {"backbone.weight", "head.weight", "head.bias"} and not reg.omega
    del reg.anchor["head.weight"]
    with torch.no_grad():
        m.head.weight.add_(1.0)
        m.backbone.weight.add_(0.5)
    assert torch.allclose(reg.quadratic_penalty(m), torch.tensor(0.5 * 6 * 0.25))


def test_l2sp_pulls_toward_the_previous_segment_weights():
    m = Tiny()
    reg = L2SP(lambda_=0.5)
    reg.estimate(m, [], _no_loss, 1)
    with torch.no_grad():
        m.backbone.weight.add_(1.0)
    reg.estimate(m, [], _no_loss, 1)  # anchor moves to the end of the latest segment
    assert reg.quadratic_penalty(m).item() == 0.0
    with torch.no_grad():
        m.head.bias.add_(torch.tensor([0.2, -0.4]))
    assert torch.allclose(reg.quadratic_penalty(m), torch.tensor(0.5 * 0.5 * (0.04 + 0.16)))


def test_bf16_module_keeps_float32_state_and_penalty():
    m = Tiny().to(torch.bfloat16)
    pairs = [(_x(50, 4).bfloat16(), _x(51, 4).bfloat16())]
    w = m.backbone.weight.detach().float()
    mas, ewc = MAS(lambda_=1.0), EWC(lambda_=1.0)
    for reg in (mas, ewc):
        reg.estimate(m, pairs, m.ssl_loss, 1)
        assert all(v.dtype == torch.float32 for v in [*reg.omega.values(), *reg.anchor.values()])
        assert torch.equal(reg.anchor["backbone.weight"], w)
    # MAS runs on a float32 copy: the same value as by hand from the (bf16-rounded) weights.
    assert torch.allclose(mas.omega["backbone.weight"], _mas_by_hand(w, pairs[0][0].float()), atol=1e-5)
    with torch.no_grad():
        m.backbone.weight.add_(0.25)
    for reg in (mas, ewc):
        pen = reg.quadratic_penalty(m)
        assert pen.dtype == torch.float32 and pen.item() > 0
        m.zero_grad()
        pen.backward()
        assert m.backbone.weight.grad is not None and m.backbone.weight.grad.dtype == torch.bfloat16


def test_state_dict_round_trip_through_weights_only_load(tmp_path):
    m = Tiny()
    pairs = [(_x(60, 4), _x(61, 4))]
    for reg, fresh in ((MAS(2.0), MAS(2.0)), (EWC(2.0), EWC(2.0)), (L2SP(2.0), L2SP(2.0))):
        reg.estimate(m, pairs, m.ssl_loss, 1)
        torch.save(reg.state_dict(), tmp_path / "s.pt")
        fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        assert fresh.segments == 1 and fresh.omega.keys() == reg.omega.keys()
        assert all(torch.equal(fresh.omega[k], reg.omega[k]) for k in reg.omega)
        assert all(torch.equal(fresh.anchor[k], reg.anchor[k]) for k in reg.anchor)
        with torch.no_grad():
            m.backbone.weight.add_(0.1)
        assert torch.equal(fresh.quadratic_penalty(m), reg.quadratic_penalty(m)) and reg.quadratic_penalty(m).item() > 0
        fresh.save(tmp_path / "plug")  # the plugin-level save/load goes through the same state
        again = type(reg)(2.0)
        again.load(tmp_path / "plug")
        assert torch.equal(again.quadratic_penalty(m), reg.quadratic_penalty(m))
    with pytest.raises(ValueError, match="not 'ewc'"):
        EWC().load_state_dict(MAS().state_dict())


def test_importance_on_a_real_ssl_method_restores_its_buffers():
    from streamssl.config import SSLConfig
    from streamssl.ssl import build_method

    torch.manual_seed(0)
    m = build_method(SSLConfig(method="mocov2", backbone="small_cnn", width=4, proj_hidden_dim=8,
                               proj_dim=8, queue_size=16), in_channels=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(4, 1, 12, 12)
    for reg in (MAS(), EWC()):
        reg.estimate(m, [(x, x.flip(-1))], lambda a, b: m(a, b)["loss"], 1)
        assert reg.omega and all(torch.isfinite(v).all() for v in reg.omega.values())
        assert not any(k.startswith("key_encoder") or k.startswith("target") for k in reg.anchor)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        assert reg.quadratic_penalty(m).item() == 0.0


# --------------------------------------------------------------------------- the composed strategy


def _cfg(**sections) -> Config:
    return Config.model_validate(sections)


def _step_context(model: nn.Module) -> StepContext:
    x = torch.zeros(2, 1, 4, 4)
    return StepContext(clock=StepClock(0, 0, 1, 0), views=[x, x], rows={"train": slice(0, 2)}, model=model,
                       rank=0, world=1, seed=0)


def test_build_strategy_composes_the_configured_plugins():
    naive = build_strategy(_cfg())
    assert naive.plugins == [] and naive.name == "naive"
    assert naive.loss_terms(_step_context(Tiny())) == {}
    assert naive.segment_data(3) == SegmentData(3, (3,), from_previous=True, extras=())
    joint = build_strategy(_cfg(strategy="joint"))
    assert [type(p) for p in joint.plugins] == [Joint] and joint.name == "joint"
    assert joint.segment_data(2) == SegmentData(2, (0, 1, 2), from_previous=False)
    assert build_strategy(_cfg(strategy="cumulative")).segment_data(2) == SegmentData(2, (0, 1, 2), from_previous=True)
    with pytest.raises(ValueError, match="joint"):
        build_strategy(_cfg(strategy="joint", regularization={"method": "mas"}))

    s = build_strategy(_cfg(replay={"size": 40, "policy": "balanced"},
                            regularization={"method": "mas", "lambda": 2.5}))
    assert [type(p) for p in s.driver_plugins] == [ReplayPlugin]
    assert [type(p) for p in s.worker_plugins] == [MAS] and s.worker_plugins[0].lambda_ == 2.5
    assert s.driver_plugins[0].buffer.policy == "balanced" and s.driver_plugins[0].buffer.capacity == 40
    for method, cls in (("ewc", EWC), ("l2sp", L2SP)):
        assert type(build_strategy(_cfg(regularization={"method": method})).worker_plugins[0]) is cls


def test_strategy_driver_and_worker_state_survive_a_resume(tmp_path):
    cfg = _cfg(replay={"size": 30}, regularization={"method": "l2sp", "lambda": 1.0})
    s = build_strategy(cfg)
    assert s.segment_data(0).extras == ()
    s.after_segment_driver(0, SEGMENTS[0])
    (extra,) = s.segment_data(1).extras
    assert (extra.name, extra.ratio, extra.mode) == ("replay", cfg.replay.ratio, cfg.replay.mode)
    replay = extra.sample(30, 0)
    assert replay.num_rows == 30 and set(replay["segment"].to_pylist()) == {0}
    with pytest.raises(RuntimeError, match="segment 0"):
        s.segment_data(0)  # rows of the segment being trained must never come back as replay
    s.save_driver_state(tmp_path)
    m = Tiny()
    s.after_segment(SegmentContext(segment=0, steps_in_segment=1, start_step=0, model=m, rank=0, world=1, seed=0,
                                   batches=[], loss_fn=_no_loss, max_batches=1))
    torch.save(s.worker_state(), tmp_path / "strategy.pt")

    resumed = build_strategy(cfg)
    resumed.load_driver_state(tmp_path)
    resumed.load_worker_state(torch.load(tmp_path / "strategy.pt", weights_only=True))
    assert resumed.segment_data(1).extras[0].sample(45, 4).equals(s.segment_data(1).extras[0].sample(45, 4))
    for strat in (s, resumed):
        strat.after_segment_driver(1, SEGMENTS[1])
    assert resumed.segment_data(2).extras[0].sample(30, 0).equals(s.segment_data(2).extras[0].sample(30, 0))
    with torch.no_grad():
        m.backbone.weight.add_(0.2)
    (term,) = s.loss_terms(_step_context(m)).values()
    assert torch.equal(resumed.loss_terms(_step_context(m))["l2sp"], term) and term.item() > 0

    with pytest.raises(ValueError, match="does not configure"):
        build_strategy(_cfg(regularization={"method": "mas"})).load_worker_state(s.worker_state())
    with pytest.raises(FileNotFoundError):
        build_strategy(cfg).load_driver_state(tmp_path / "nowhere")
    joint = build_strategy(_cfg(strategy="joint"))  # stateless: nothing saved, nothing expected
    joint.save_driver_state(tmp_path / "joint")
    joint.load_driver_state(tmp_path / "nowhere")
    assert not (tmp_path / "joint").exists()


def test_fifo_replay_keeps_the_most_recent_rows_and_resumes(tmp_path):
    """A data strategy added as one module + one registry line (continual/fifo_replay.py)."""
    s = build_strategy(_cfg(replay={"size": 100, "policy": "fifo", "ratio": 0.25, "mode": "replace"}))
    (plugin,) = s.driver_plugins
    assert isinstance(plugin.buffer, FifoBuffer) and plugin.describe() == "replay(fifo,100)"
    s.after_segment_driver(0, SEGMENTS[0])
    assert plugin.buffer.rows()["idx"].to_pylist() == list(range(20, 120))  # the last 100 of segment 0
    s.after_segment_driver(1, SEGMENTS[1])
    assert plugin.buffer.rows()["idx"].to_pylist() == list(range(320, 420))  # only the newest rows
    assert plugin.buffer.segment_counts() == {1: 100}
    (extra,) = s.segment_data(2).extras
    assert extra.mode == "replace" and set(extra.sample(250, 3)["idx"].to_pylist()) == set(range(320, 420))
    s.save_driver_state(tmp_path)
    resumed = build_strategy(_cfg(replay={"size": 100, "policy": "fifo", "ratio": 0.25, "mode": "replace"}))
    resumed.load_driver_state(tmp_path)
    assert resumed.segment_data(2).extras[0].sample(250, 3).equals(extra.sample(250, 3))
    with pytest.raises(ValueError, match="fifo"):  # a checkpoint of another policy is refused
        build_strategy(_cfg(replay={"size": 100})).load_driver_state(tmp_path)


# --------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SIZES = (3, 5)  # unequal batches: the average must weight workers by their sample counts


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = Tiny()
        n = _SIZES[rank]
        pairs = [(_x(100 + rank, n), _x(200 + rank, n))]
        for reg in (MAS(), EWC()):
            reg.estimate(m, pairs, m.ssl_loss, 1)
            torch.save(reg.state_dict(), Path(out_dir) / f"{reg.name}-{rank}.pt")
        # Both ranks done before either tears gloo down: a rank that exits while its peer is still
        # in a collective can abort the peer's process in gloo's C++ teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_importance_is_averaged_across_workers(tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w = Tiny().backbone.weight.detach()
    pairs = [(_x(100 + r, _SIZES[r]), _x(200 + r, _SIZES[r])) for r in range(2)]
    expected = {"mas": _mas_by_hand(w, torch.cat([a for a, _ in pairs])), "ewc": _ewc_by_hand(w, pairs)}
    for name in ("mas", "ewc"):
        s0, s1 = (torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in range(2))
        assert s0.keys() == s1.keys()
        assert all(torch.equal(s0[k], s1[k]) if torch.is_tensor(s0[k]) else s0[k] == s1[k] for k in s0)
        assert torch.allclose(s0["omega.backbone.weight"], expected[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- CaSSLe and LUMP


class _LinearMethod(SSLMethod):
    """A method whose projection is one linear map and whose own loss is the mean squared error:
    small enough to compute CaSSLe's loss by hand."""

    name = "linear"

    def __init__(self, weight: float) -> None:
        backbone = nn.Linear(2, 2, bias=False)
        backbone.out_dim = 2  # type: ignore[assignment]
        super().__init__(backbone)
        self.projection_dim = 2
        with torch.no_grad():
            backbone.weight.copy_(weight * torch.eye(2))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).float()

    def distill_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((prediction - target.detach()) ** 2).mean()


def _cassle_with_identity_predictor(weight: float, current: _LinearMethod, previous: _LinearMethod) -> CaSSLe:
    plugin = CaSSLe(weight=weight, hidden_dim=2)
    plugin.before_segment(SegmentContext(segment=1, steps_in_segment=4, start_step=0, model=current, rank=0, world=1,
                                         seed=0, previous_model=previous.state_dict()))
    pred = plugin.predictor
    assert pred is not None
    with torch.no_grad():  # Linear(I) -> BatchNorm (running mean 0, var 1) -> ReLU -> Linear(I)
        pred.net[0].weight.copy_(torch.eye(2))
        pred.net[3].weight.copy_(torch.eye(2))
        pred.net[3].bias.zero_()
    pred.eval()
    return plugin


def test_cassle_loss_matches_the_hand_computation():
    # Current model 2·I, frozen previous model I, predictor ~identity on positive inputs: for a
    # view x the prediction is 2x/sqrt(1 + eps) and the target x, the method's loss their MSE.
    # Views [[1, 2]] and [[3, 0]]: MSEs (1 + 4)/2 = 2.5 and (9 + 0)/2 = 4.5, mean 3.5; weight 2.
    current, previous = _LinearMethod(2.0), _LinearMethod(1.0)
    plugin = _cassle_with_identity_predictor(2.0, current, previous)
    assert set(plugin.trainable_modules()) == {"predictor"}
    views = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    ctx = StepContext(clock=StepClock(1, 0, 4, 4), views=views, rows={"train": slice(0, 1)}, model=current,
                      rank=0, world=1, seed=0)
    ctx.output = StepOutput(torch.zeros(()), projections=tuple(current.project(v) for v in views))
    scale = 1 / math.sqrt(1 + 1e-5)  # BatchNorm's eps
    by_hand = 2.0 * (((2 * scale - 1) ** 2 * (1 + 4)) / 2 + ((2 * scale - 1) ** 2 * 9) / 2) / 2
    (term,) = plugin.loss_terms(ctx).values()
    assert term.item() == pytest.approx(by_hand, rel=1e-6) and by_hand == pytest.approx(7.0, rel=1e-4)
    term.backward()  # the predictor is trained by this term
    assert plugin.predictor.net[0].weight.grad is not None
    # Segment 0 (no previous model): nothing to distill, no predictor to train.
    plugin.before_segment(SegmentContext(segment=0, steps_in_segment=4, start_step=0, model=current, rank=0, world=1,
                                         seed=0))
    assert plugin.loss_terms(ctx) == {} and plugin.trainable_modules() == {}


def test_cassle_frozen_model_and_predictor_survive_a_mid_segment_restart():
    current, previous = _LinearMethod(2.0), _LinearMethod(1.0)
    plugin = _cassle_with_identity_predictor(1.0, current, previous)
    state = plugin.state_dict()
    assert torch.equal(state["frozen.backbone.weight"], torch.eye(2))
    restarted = CaSSLe(weight=1.0, hidden_dim=2)
    restarted.load_state_dict(torch.load(_round_trip(state), weights_only=True))
    # The restarted worker rebuilds the model from the in-segment checkpoint (trained weights, here
    # 3·I): the frozen model must still be the previous segment's, not a copy of these.
    restarted.before_segment(SegmentContext(segment=1, steps_in_segment=4, start_step=2, model=_LinearMethod(3.0),
                                            rank=0, world=1, seed=0))
    assert restarted.frozen is not None and torch.equal(restarted.frozen.backbone.weight, torch.eye(2))
    for (k, a), b in zip(plugin.predictor.state_dict().items(), restarted.predictor.state_dict().values()):
        assert torch.equal(a, b), k
    restarted.after_segment(SegmentContext(segment=1, steps_in_segment=4, start_step=2, model=current, rank=0,
                                           world=1, seed=0))
    assert not any(k.startswith("frozen.") for k in restarted.state_dict())  # final checkpoints stay small


def _round_trip(state: dict) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "strategy.pt"
    torch.save(state, path)
    return path


def test_lump_mixup_matches_the_hand_computation():
    own = torch.tensor([[0.0], [4.0]])
    replay = torch.tensor([[8.0], [12.0]])
    view = torch.cat([own, replay])
    (mixed,) = mixup_views([view], slice(0, 2), slice(2, 4), 0.25, np.array([1, 0]))
    # row 0: 0.25·0 + 0.75·12 = 9; row 1: 0.25·4 + 0.75·8 = 7
    assert mixed.flatten().tolist() == [9.0, 7.0]


def test_lump_mixes_every_view_with_replayed_rows_and_leaves_segment_zero_alone():
    plugin = LUMP(alpha=0.1)
    plugin.before_segment(SegmentContext(segment=1, steps_in_segment=4, start_step=0, model=Tiny(), rank=0, world=1,
                                         seed=0))
    v1 = torch.arange(6.0).view(6, 1)
    v2 = 10 + v1
    ctx = StepContext(clock=StepClock(1, 0, 4, 4), views=[v1, v2], rows={"train": slice(0, 3), "replay": slice(3, 6)},
                      model=Tiny(), rank=0, world=1, seed=0)
    plugin.before_step(ctx)
    assert [v.shape[0] for v in ctx.views] == [3, 3] and ctx.rows == {"train": slice(0, 3)}
    # Both views mix the same pairs with the same λ: view 2 is view 1 + 10 exactly.
    assert torch.allclose(ctx.views[1], ctx.views[0] + 10)
    assert bool(((ctx.views[0] >= 0) & (ctx.views[0] <= 5)).all())  # between an own and a replayed row
    seg0 = StepContext(clock=StepClock(0, 0, 4, 0), views=[v1, v2], rows={"train": slice(0, 6)}, model=Tiny(),
                       rank=0, world=1, seed=0)
    plugin.before_step(seg0)
    assert seg0.views[0] is v1 and seg0.views[1] is v2
    # λ ~ Beta(0.1, 0.1): mostly near 0 or 1, mean 1/2.
    draws = np.array([plugin.rng.beta(0.1, 0.1) for _ in range(4000)])
    assert abs(draws.mean() - 0.5) < 0.03 and ((draws < 0.1) | (draws > 0.9)).mean() > 0.6


def test_strategy_registry_builds_cassle_and_lump():
    cassle = build_strategy(_cfg(strategy="cassle", continual={"cassle_weight": 0.5}))
    assert [type(p) for p in cassle.worker_plugins] == [CaSSLe] and cassle.name == "cassle(weight=0.5)"
    lump = build_strategy(_cfg(strategy="lump", replay={"size": 30}))
    assert [type(p) for p in lump.plugins] == [ReplayPlugin, LUMP] and lump.name == "lump+replay(reservoir,30)"
    with pytest.raises(Exception, match="replay.size"):
        build_strategy(_cfg(strategy="lump"))


def test_plugin_modules_reach_the_optimizer_beside_the_method():
    from streamssl.ssl import build_method
    from streamssl.train.worker import TrainedModules

    cfg = _cfg(strategy="cassle", ssl={"width": 4, "proj_hidden_dim": 16, "proj_dim": 8})
    method, strategy = build_method(cfg.ssl, 1), build_strategy(cfg)
    strategy.before_segment(SegmentContext(segment=1, steps_in_segment=2, start_step=0, model=method, rank=0, world=1,
                                           seed=0, previous_model=method.state_dict()))
    trained = TrainedModules(method, strategy.trainable_modules())
    predictor = strategy.worker_plugins[0].predictor
    ids = {id(p) for p in trained.trainable_parameters()}
    assert all(id(p) in ids for p in predictor.parameters())
    assert all(id(p) in ids for p in method.trainable_parameters())
    assert not any(id(p) in ids for p in strategy.worker_plugins[0].frozen.parameters())  # frozen stays out
