"""Reward-model metrics. `evaluate_rewards` is the one evaluation every caller uses — training
validation, `rmflow evaluate`, the promotion gate, the strength ensemble and the benchmarks: it
takes the groups (rows of the dataset's groups view) and one reward per completion, and derives
every metric from those.

Beyond accuracy it measures what bites reward models in RL: calibration (ECE + reliability),
length bias (Spearman between reward and response length; accuracy when the chosen response is
the shorter one), accuracy per rank distance and per preference-strength decile.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr


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


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    correct: np.ndarray  # per strict pair, in a fixed order: the unit of the paired bootstrap
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    reliability: list[dict[str, float]]
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def diffs(self) -> np.ndarray:
        return self.chosen_rewards - self.rejected_rewards


def evaluate_rewards(rows: list[dict[str, Any]], rewards: np.ndarray) -> Evaluation:
    """Every metric of `rows` (groups: completions, pairs, ties, blocks, optional strengths) from
    `rewards`, one per completion in the rows' order."""
    rewards = np.asarray(rewards, dtype=np.float64)
    texts = [c for r in rows for c in r["completions"]]
    if len(texts) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards for {len(texts)} completions")
    w, l, tie_a, tie_b = flat_pair_indices((len(r["completions"]), r["pairs"], r["ties"]) for r in rows)
    d = rewards[w] - rewards[l]
    metrics: dict[str, Any] = pair_metrics(d, rewards[tie_a] - rewards[tie_b], rewards)
    lengths = np.array([len(t.split()) for t in texts])
    metrics["length_bias"] = float(spearmanr(rewards, lengths).statistic) if len(set(lengths.tolist())) > 1 else 0.0
    shorter = lengths[w] < lengths[l]
    metrics["accuracy_chosen_shorter"] = float((d[shorter] > 0).mean()) if shorter.any() else float("nan")
    blocks = np.array([b for r in rows for b in r["blocks"]], dtype=np.int64)
    metrics["accuracy_by_rank_distance"] = _bucketed(d, blocks[l] - blocks[w], lambda v: str(int(v)))
    s = np.array([x for r in rows for x in (r.get("strengths") or [np.nan] * len(r["pairs"]))], dtype=float)
    if np.isfinite(s).any():
        edges = np.nanquantile(s, np.linspace(0.1, 0.9, 9))
        metrics["accuracy_by_strength_decile"] = _bucketed(d, s, lambda v: f"d{int(np.searchsorted(edges, v)) + 1:02d}")
    return Evaluation(metrics, (d > 0).astype(np.int8), rewards[w], rewards[l], reliability_curve(d))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics that are single numbers (what goes to MLflow metrics and summaries)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def _bucketed(diffs: np.ndarray, keys: np.ndarray, name) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    labels = np.array([name(k) for k in keys]) if len(keys) else np.array([])
    for label in sorted(set(labels.tolist())):
        m = labels == label
        out[label] = {"accuracy": float((diffs[m] > 0).mean()), "n": int(m.sum())}
    return out
