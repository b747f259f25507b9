from __future__ import annotations

import math

import pytest
import torch

from rmcore.config import LossConfig, RunConfig
from rmcore.losses import PairIndex, compute_loss


def nll(d: float) -> float:
    """-log σ(d), written out."""
    return math.log(1 + math.exp(-d))


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def index(pairs, groups, margins=None, strengths=None, smoothing=0.0, rank=None, blocks=None) -> PairIndex:
    n = len(pairs)
    rank = rank or [[0, 1, 2]]
    return PairIndex(
        chosen=torch.tensor([c for c, _ in pairs]), rejected=torch.tensor([r for _, r in pairs]),
        margin=torch.tensor(margins or [1.0] * n), weight=torch.ones(n),
        strength=torch.tensor(strengths or [0.0] * n), smoothing=torch.full((n,), smoothing),
        group=torch.tensor(groups), rank_seq=torch.tensor(rank), rank_block=torch.tensor(blocks or [[0, 1, 2]]),
    )


R = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
THREE = [(0, 1), (0, 2), (1, 2)]  # a strict K=3 ranking: diffs 1.5, 3.0, 1.5


def loss(name: str, idx: PairIndex, rewards=R, **kw) -> float:
    return compute_loss(rewards, idx, LossConfig(name=name, **kw)).item()


def test_bt_matches_hand_value():
    assert loss("bt", index(THREE, [0, 0, 0])) == pytest.approx((2 * nll(1.5) + nll(3.0)) / 3, rel=1e-6)


def test_bt_logexp_equals_bt_and_is_stable_at_extremes():
    idx = index(THREE, [0, 0, 0])
    assert loss("bt_logexp", idx) == pytest.approx(loss("bt", idx), rel=1e-6)
    extreme = torch.tensor([100.0, -100.0, 0.0])
    value = loss("bt_logexp", index([(1, 0)], [0]), rewards=extreme)
    assert math.isfinite(value) and value == pytest.approx(200.0, rel=1e-6)


def test_margin_subtracts_the_data_margin():
    idx = index(THREE, [0, 0, 0], margins=[1.0, 2.0, 1.0])
    assert loss("margin", idx) == pytest.approx((2 * nll(0.5) + nll(1.0)) / 3, rel=1e-6)
    assert loss("margin", idx, margin_scale=0.5) == pytest.approx((2 * nll(1.0) + nll(2.0)) / 3, rel=1e-6)


def test_kwise_weights_each_prompt_once():
    idx = index(THREE + [(3, 4)], [0, 0, 0, 1], rank=[[0, 1, 2], [3, 4, -1]], blocks=[[0, 1, 2], [0, 1, -1]])
    group0 = (2 * nll(1.5) + nll(3.0)) / 3
    assert loss("kwise", idx) == pytest.approx((group0 + nll(-1.0)) / 2, rel=1e-6)
    assert loss("bt", idx) == pytest.approx((2 * nll(1.5) + nll(3.0) + nll(-1.0)) / 4, rel=1e-6)


def test_plackett_luce_strict_and_with_ties():
    strict = index(THREE, [0, 0, 0])
    expected = -((2.0 - lse(2.0, 0.5, -1.0)) + (0.5 - lse(0.5, -1.0))) / 2
    assert loss("plackett_luce", strict) == pytest.approx(expected, rel=1e-6)
    tied = index([(0, 2), (1, 2)], [0, 0], blocks=[[0, 0, 1]])
    expected_tied = -((2.0 - lse(2.0, 0.5, -1.0)) + (0.5 - lse(2.0, 0.5, -1.0)) + 0.0) / 2
    assert loss("plackett_luce", tied) == pytest.approx(expected_tied, rel=1e-6)


def test_label_smoothing_adaptive_margin_and_centering():
    idx = index(THREE, [0, 0, 0], smoothing=0.1)
    smoothed = sum(0.9 * nll(d) + 0.1 * nll(-d) for d in (1.5, 3.0, 1.5)) / 3
    assert loss("bt", idx) == pytest.approx(smoothed, rel=1e-6)
    idx = index(THREE, [0, 0, 0], strengths=[1.0, 0.0, 2.0])
    assert loss("bt", idx, adaptive_margin=0.5) == pytest.approx((nll(1.0) + nll(3.0) + nll(0.5)) / 3, rel=1e-6)
    centering = (2.5 ** 2 + 1.0 ** 2 + (-0.5) ** 2) / 3
    plain = (2 * nll(1.5) + nll(3.0)) / 3
    assert loss("bt", index(THREE, [0, 0, 0]), center_rewards=0.01) == pytest.approx(plain + 0.01 * centering, rel=1e-6)


def test_losses_push_rewards_the_right_way():
    for name in ("bt", "bt_logexp", "margin", "kwise", "plackett_luce"):
        r = torch.zeros(3, requires_grad=True)
        compute_loss(r, index(THREE, [0, 0, 0]), LossConfig(name=name)).backward()
        assert r.grad[0] < 0 < r.grad[2], name  # descending the loss raises the best and lowers the worst


def test_config_rejects_label_smoothing_for_plackett_luce():
    with pytest.raises(ValueError, match="label_smoothing"):
        RunConfig.model_validate({"loss": {"name": "plackett_luce", "label_smoothing": 0.1}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"loss": {"name": "nope"}})
