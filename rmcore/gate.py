"""Promotion gate: absolute thresholds plus a paired comparison against the current champion."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rmcore.config import GateConfig


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    checks: list[dict] = field(default_factory=list)


def paired_bootstrap_diff(challenger_correct: np.ndarray, champion_correct: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference (challenger - champion) on the same pairs, with a 95% percentile CI
    from resampling pairs jointly — the pairing removes the variance both models share."""
    a = np.asarray(challenger_correct, dtype=np.float64)
    b = np.asarray(champion_correct, dtype=np.float64)
    if a.shape != b.shape or not len(a):
        raise ValueError("challenger and champion must be scored on the same non-empty set of pairs")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    return float(a.mean() - b.mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def evaluate_gate(
    metrics: dict[str, float], cfg: GateConfig, challenger_correct: np.ndarray | None = None,
    champion_correct: np.ndarray | None = None,
) -> GateResult:
    checks = [
        {"check": "accuracy", "value": metrics["accuracy"], "threshold": f">= {cfg.min_accuracy}",
         "passed": metrics["accuracy"] >= cfg.min_accuracy},
        {"check": "ece", "value": metrics["ece"], "threshold": f"<= {cfg.max_ece}", "passed": metrics["ece"] <= cfg.max_ece},
        {"check": "length_bias", "value": metrics["length_bias"], "threshold": f"|x| <= {cfg.max_length_bias}",
         "passed": abs(metrics["length_bias"]) <= cfg.max_length_bias},
    ]
    if champion_correct is not None and challenger_correct is not None:
        diff, low, high = paired_bootstrap_diff(challenger_correct, champion_correct, cfg.bootstrap)
        checks.append({"check": "vs_champion", "value": diff, "ci95": [low, high], "threshold": f"CI low >= -{cfg.delta}",
                       "passed": low >= -cfg.delta})
    reasons = [f"{c['check']} {c['value']:.4f} fails {c['threshold']}" + (f" (95% CI {c['ci95'][0]:.4f}..{c['ci95'][1]:.4f})" if "ci95" in c else "")
               for c in checks if not c["passed"]]
    return GateResult(passed=not reasons, reasons=reasons, checks=checks)
