"""`rmflow bench secrets`: preference-strength strategies on real human data, held-out accuracy.

Per dataset (qa-feedback K=4, hh-rlhf), same backbone and per-model budget, test split:
  bt · margin · flip+margin · soft+margin   (strategies use one ensemble of M models, loss bt;
  `margin` is the adaptive margin = mean strength; `margin-loss`, not run by default, is Llama 2's
  margin loss with the rank-distance margin, for comparison; `flip`, `soft` also accepted)
One JSON line per (dataset, strategy): accuracy and its 95% bootstrap CI over the test pairs, the
same over validation+test pooled (no model selection uses validation, so both are held out), and
test accuracy per decile of the ensemble's held-out strength. One line per dataset for the ensemble
itself (negative-strength share, its own held-out accuracy).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rmcore.config import RunConfig, StrengthConfig
from rmcore.evaluate import evaluate_rows
from rmcore.metrics import Evaluation
from rmcore.scoring import RewardScorer
from rmflow.bench.train_vs_trl import common_args, emit, prepare
from rmflow.tasks.strength import ensemble_strengths, strength_rows, write_strength_dataset
from rmflow.tasks.train import train_model

STRATEGIES = ("bt", "margin", "flip+margin", "soft+margin")


def bootstrap_ci(correct: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(resamples, len(correct)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def accuracy_with_ci(ev: Evaluation) -> dict[str, Any]:
    """Strict accuracy and its 95% bootstrap CI over the evaluated pairs (NaN when there are none)."""
    if not len(ev.correct):
        return {"accuracy": float("nan"), "ci95": [float("nan"), float("nan")], "pairs": 0}
    low, high = bootstrap_ci(ev.correct.astype(float))
    return {"accuracy": round(ev.metrics["accuracy"], 4), "ci95": [round(low, 4), round(high, 4)], "pairs": ev.metrics["n"]}


def held_out(scorer: RewardScorer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ev = evaluate_rows(scorer, rows)
    return {**accuracy_with_ci(ev),
            "by_strength_decile": {k: round(v["accuracy"], 3) for k, v in ev.metrics.get("accuracy_by_strength_decile", {}).items()}}


def ensemble_row(kind: str, ensemble: dict[str, Any]) -> dict[str, Any]:
    """What the ensemble itself says: the share of train pairs it disagrees with, and its own
    held-out accuracy as a reward model (mean strength > 0)."""
    train, test = ensemble["splits"]["train"]["mean"], ensemble["splits"]["test"]["mean"]
    return {"dataset": kind, "strategy": "ensemble-mean", "members": len(ensemble["members"]),
            "member_val_accuracy": [round(a, 4) for a in ensemble["member_val_accuracy"]],
            "negative_strength_fraction": round(float((train < 0).mean()), 4), "test_accuracy": round(float((test > 0).mean()), 4)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common_args(__doc__, "qa-feedback,hh-rlhf")
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--sequential", action="store_true", help="Train ensemble members one after another in-process.")
    p.add_argument("--flip-fraction", type=float, default=0.0, help="Select the bottom fraction by mean strength "
                   "instead of every pair with a negative mean.")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for kind in args.datasets.split(","):
            data = prepare(kind, args.shared, Path(work), args.limit)
            base = {"model": {"backbone": args.backbone, "max_length": args.max_length},
                    "optim": {"lr": args.lr, "epochs": args.epochs}}
            strength = {"ensemble": args.ensemble, "parallel": not args.sequential, "flip_fraction": args.flip_fraction}
            ensemble = ensemble_strengths(RunConfig.model_validate({**base, "strength": strength}), data)
            emit(ensemble_row(kind, ensemble))
            annotated, _ = strength_rows(ensemble, StrengthConfig())
            for strategy in args.strategies.split(","):
                uses_strength = strategy not in ("bt", "margin-loss")
                cfg = RunConfig.model_validate({**base, "loss": {"name": "margin" if strategy == "margin-loss" else "bt"},
                                                "strength": {**strength, "strategy": strategy if uses_strength else "none"}})
                train_dir, counts = data, {}
                if uses_strength:  # the strength stage's output, from this one ensemble
                    strength = write_strength_dataset(cfg, data, ensemble, Path(work))
                    cfg, train_dir, counts = strength.run, Path(strength.dataset), strength.summary
                model_dir = Path(work) / f"{kind}-{strategy}"
                train_model(cfg, train_dir, model_dir)
                scorer = RewardScorer(model_dir)
                test = held_out(scorer, annotated["test"])
                pooled = held_out(scorer, annotated["validation"] + annotated["test"])
                row = {"dataset": kind, "strategy": strategy, "ensemble": args.ensemble, **{f"test_{k}": v for k, v in test.items()},
                       **{f"heldout_{k}": v for k, v in pooled.items() if k != "by_strength_decile"},
                       **{k: counts[k] for k in ("low_strength", "flipped", "smoothed") if k in counts}}
                emit(row)
                rows.append(row)
    best = {k: max((r for r in rows if r["dataset"] == k), key=lambda r: r["test_accuracy"]) for k in {r["dataset"] for r in rows}}
    bt = {r["dataset"]: r for r in rows if r["strategy"] == "bt"}
    emit({k: {"best": v["strategy"], "test_gain_over_bt": round(v["test_accuracy"] - bt[k]["test_accuracy"], 4),
              "heldout_gain_over_bt": round(v["heldout_accuracy"] - bt[k]["heldout_accuracy"], 4)} for k, v in best.items()})
    return rows


if __name__ == "__main__":
    main()
