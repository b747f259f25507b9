"""Reward-model metrics from per-pair reward differences d = r_chosen - r_rejected."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def strict_accuracy(diffs: np.ndarray) -> float:
    """Fraction of strict pairs with r_chosen > r_rejected (a tie in reward counts as wrong)."""
    return float((diffs > 0).mean()) if len(diffs) else float("nan")


def expected_calibration_error(diffs: np.ndarray, bins: int = 10) -> float:
    """ECE of p = σ(d) as the probability that the chosen response wins, with confidence
    max(p, 1-p) against whether the prediction was right."""
    if not len(diffs):
        return float("nan")
    conf, correct = _confidence(diffs)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_curve(diffs: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    conf, correct = _confidence(diffs)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return [
        {"bin_low": float(edges[b]), "confidence": float(conf[which == b].mean()),
         "accuracy": float(correct[which == b].mean()), "n": int((which == b).sum())}
        for b in range(bins) if (which == b).any()
    ]


def _confidence(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = 1 / (1 + np.exp(-np.asarray(diffs, dtype=np.float64)))
    return np.maximum(p, 1 - p), (diffs > 0).astype(np.float64)


def pair_metrics(diffs: np.ndarray, tie_diffs: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    """The metrics reported at every evaluation."""
    return {
        "accuracy": strict_accuracy(diffs),
        "n": int(len(diffs)),
        "ties": int(len(tie_diffs)),
        "tie_abs_diff": float(np.abs(tie_diffs).mean()) if len(tie_diffs) else float("nan"),
        "margin_mean": float(diffs.mean()) if len(diffs) else float("nan"),
        "ece": expected_calibration_error(diffs),
        "reward_mean": float(rewards.mean()) if len(rewards) else float("nan"),
        "reward_std": float(rewards.std()) if len(rewards) else float("nan"),
    }


def flat_pair_indices(groups: Iterable[tuple[int, Sequence, Sequence]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For groups given as (completion count, strict pairs, ties): indices into the concatenated
    completions of all groups of every strict pair's (chosen, rejected) and every tie's two sides.
    Every evaluation scores each completion once and reads pairs through these indices."""
    chosen, rejected, tie_a, tie_b = [], [], [], []
    base = 0
    for k, pairs, ties in groups:
        chosen += [base + w for w, _ in pairs]
        rejected += [base + l for _, l in pairs]
        tie_a += [base + a for a, _ in ties]
        tie_b += [base + b for _, b in ties]
        base += k
    return tuple(np.array(x, dtype=np.int64) for x in (chosen, rejected, tie_a, tie_b))
