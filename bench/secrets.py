"""`rmflow bench secrets`: preference-strength strategies on real human data, held-out accuracy.

Per dataset (qa-feedback K=4, hh-rlhf), same backbone and per-model budget, test split:
  bt · margin · flip+margin · soft+margin   (strategies use one ensemble of M models)
One JSON line per (dataset, strategy) with accuracy and its 95% bootstrap CI over test pairs.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.train_vs_trl import common_args, prepare
from rmcore.config import RunConfig
from rmcore.evaluate import evaluate_saved_model
from tasks.strength import ensemble_strengths, write_strength_dataset
from tasks.train import run_training

STRATEGIES = ("bt", "margin", "flip+margin", "soft+margin")


def bootstrap_ci(correct: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(resamples, len(correct)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def held_out(model_dir: Path, data: Path) -> dict[str, Any]:
    metrics, diffs = evaluate_saved_model(model_dir, data, "test")
    low, high = bootstrap_ci((diffs > 0).astype(float))
    return {"accuracy": metrics["accuracy"], "ci95": [round(low, 4), round(high, 4)], "test_pairs": metrics["n"]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common_args(__doc__, "qa-feedback,hh-rlhf")
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--epochs", type=float, default=1.0)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for kind in args.datasets.split(","):
            data = prepare(kind, args.shared, Path(work), args.limit)
            base = {"model": {"backbone": args.backbone, "max_length": args.max_length},
                    "optim": {"lr": args.lr, "epochs": args.epochs}}
            ensemble = ensemble_strengths(RunConfig.model_validate({**base, "strength": {"ensemble": args.ensemble}}), data)
            for strategy in STRATEGIES:
                loss = "margin" if strategy == "margin" else "bt"
                cfg = RunConfig.model_validate({**base, "loss": {"name": loss}, "strength": {
                    "ensemble": args.ensemble, "strategy": strategy if "+" in strategy else "none"}})
                train_dir, counts = data, {}
                if "+" in strategy:
                    from rmcore.strength import final_run_config

                    train_dir, counts = write_strength_dataset(cfg, data, ensemble, Path(work))
                    cfg = final_run_config(cfg)
                cfg = cfg.model_copy(update={"strength": cfg.strength.model_copy(update={"ensemble": 0})})
                model_dir = Path(work) / f"{kind}-{strategy}"
                run_training(cfg, train_dir, model_dir)
                row = {"dataset": kind, "strategy": strategy, "ensemble": args.ensemble, **held_out(model_dir, data),
                       **{k: counts[k] for k in ("low_strength", "flipped", "smoothed", "negative_mean") if k in counts}}
                if strategy == "bt":
                    row["negative_strength_fraction"] = round(float((ensemble["mean"] < 0).mean()), 4)
                print(json.dumps(row), flush=True)
                rows.append(row)
    best = {k: max((r for r in rows if r["dataset"] == k), key=lambda r: r["accuracy"]) for k in {r["dataset"] for r in rows}}
    bt = {r["dataset"]: r["accuracy"] for r in rows if r["strategy"] == "bt"}
    print(json.dumps({k: {"best": v["strategy"], "gain_over_bt": round(v["accuracy"] - bt[k], 4)} for k, v in best.items()}))
    return rows


if __name__ == "__main__":
    main()
