"""Reward-model quality: TRL's RewardTrainer with its defaults vs rmflow with its defaults vs rmflow
tuned (a Ray Tune sweep of --trials configurations, selected on its selection set: the validation split and
the training prompts set aside by selection_fraction, never the test split), in one
run, on the shared hh-rlhf and qa-feedback data; test-split accuracy with a 95% Wilson interval.

TRL's defaults are the installed RewardConfig's (TRL 1.16: 8 pairs a step, 3 epochs, lr 1e-4, no warm-up; the
summary records the version), with the backbone, data, max length and seed shared with rmflow, fp32 on CPU and no
gradient checkpointing (time only); `trl-matched` is TRL's trainer given rmflow's default budget instead (its pairs a
step, epochs and lr: 16, one, 5e-5), the row labelled "TRL" in bench/RESULTS.md tables before 2026-12-06.

With --seeds, every system trains once per seed (the tuned system sweeps once, then trains its best
configuration per seed) and the summary gives each system's mean over the seeds: one seed's test accuracy
moves by several points with the initialisation and data order alone (bench/RESULTS.md).
The test split is read once per (system, seed), after training and selection are over: nothing selects on it.
The run keeps its state (sweeps, their MLflow runs, models) in a temporary RMFLOW_HOME deleted at the
end: a benchmark leaves nothing in the user's ~/.rmflow or MLflow.
Prints one JSON line per (dataset, system, seed) and a summary line.

Run: `rmflow bench quality` or `python -m rmflow.bench.quality --help`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmcore.config import OptimConfig, RunConfig
from rmcore.evaluate import evaluate_saved_model
from rmcore.sweep import load_sweep_config
from rmcore.train import train_reward_model
from rmflow.bench.train_vs_trl import DATASETS, common_args, emit, matched_trl_settings, prepare, run_trl


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of an accuracy `p` over `n` pairs."""
    if not n:
        return [math.nan, math.nan]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def default_config(kind: str, args: argparse.Namespace, head: str = "auto") -> RunConfig:
    """rmflow's defaults, with the dataset's natural loss and the shared backbone/max length."""
    return RunConfig.model_validate({"model": {"backbone": args.backbone, "max_length": args.max_length, "head": head},
                                     "loss": {"name": DATASETS[kind][1]}, "optim": {"seed": args.seed}, "device": "cpu"})


def test_row(model_dir: Path, data: Path, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    metrics = evaluate_saved_model(model_dir, data, "test", device="cpu").metrics
    return {"test_accuracy": round(metrics["accuracy"], 4), "test_ci95": wilson(metrics["accuracy"], metrics["n"]),
            "test_pairs": metrics["n"], "wall_s": round(time.perf_counter() - started, 1), **extra}


def run_default(kind: str, data: Path, args: argparse.Namespace, head: str = "auto") -> dict[str, Any]:
    """rmflow's defaults; `head` scalar or seqcls: the same run with that head (model.head=auto's choice measured)."""
    started = time.perf_counter()
    out = data.parent / f"default-{head}-{kind}-{args.seed}"
    summary = train_reward_model(default_config(kind, args, head), data, out)
    return test_row(out, data, started, {
        "val_accuracy": summary["val_accuracy"], "val_loss": summary["val_loss"], "best_step": summary["best_step"],
        "steps": summary["steps"], "stopped_early_at": summary["stopped_early_at"]})


def run_sweep_once(kind: str, data: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The tuned system's sweep (its configurations sampled with the sweep's own seed, whatever --seeds says);
    returns its result and what the rows report of it."""
    from rmflow.infra.ray_tune import run_sweep

    started = time.perf_counter()
    sweep = load_sweep_config(args.sweep, {"trials": args.trials, "time_budget_s": args.time_budget_s,
                                           "selection_fraction": args.selection_fraction})
    base = default_config(kind, args)
    base = base.model_copy(update={"optim": base.optim.model_copy(update={"select_by": args.tuned_select_by})})
    result = run_sweep(base, data, sweep, name=f"quality-{kind}-{os.getpid()}")
    changed = {k: v for k, v in result.best.flat_params().items() if base.flat_params()[k] != v}
    return result, {
        "sweep_s": round(time.perf_counter() - started, 1), "trials": len(result.trials),
        "trials_finished": sum(t["finished"] for t in result.trials), "time_budget_s": sweep.time_budget_s,
        "space": sweep.space, "best": changed, "select_by": base.optim.select_by,
        "selection_fraction": sweep.selection_fraction, "selection_pairs": result.selection_pairs,
        "best_trial_val_accuracy": result.best_val_accuracy, "best_trial_val_loss": result.best_val_loss}


def run_tuned(kind: str, data: Path, args: argparse.Namespace, result: Any, swept: dict[str, Any]) -> dict[str, Any]:
    """The sweep's best configuration trained on the whole training split with --seed."""
    started = time.perf_counter()
    best = result.best.model_copy(update={"optim": result.best.optim.model_copy(update={"seed": args.seed})})
    out = data.parent / f"tuned-{kind}-{args.seed}"
    summary = train_reward_model(best, data, out)
    return test_row(out, data, started, swept | {
        "val_accuracy": summary["val_accuracy"], "val_loss": summary["val_loss"], "best_step": summary["best_step"],
        "steps": summary["steps"]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(__doc__, "hh-rlhf,qa-feedback")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds: every system trains once per seed (TRL's "
                        "and rmflow's initialisation and data order; the tuned system sweeps once and trains its best "
                        "configuration once per seed); the summary reports each system's mean test accuracy over them.")
    parser.add_argument("--trials", type=int, default=6, help="The tuned system's trial budget (configurations tried).")
    parser.add_argument("--time-budget-s", type=float, default=None, help="Wall-clock budget of each sweep.")
    parser.add_argument("--sweep", type=Path, default=None, help="YAML SweepConfig (space etc.); --trials overrides it.")
    parser.add_argument("--tuned-select-by", choices=["accuracy", "loss"], default="accuracy",
                        help="The tuned system's optim.select_by: what ASHA, the best trial and each run's best state go by.")
    parser.add_argument("--selection-fraction", type=float, default=None,
                        help="The sweep's selection_fraction (overrides the --sweep file; default the SweepConfig's).")
    parser.add_argument("--systems", default="trl,default,tuned", help="Which of trl (RewardConfig's defaults), "
                        "trl-matched (TRL given rmflow's budget), default, tuned, scalar, seqcls (rmflow's defaults with "
                        "model.head forced) to run.")
    args = parser.parse_args(argv)
    if args.lr != parser.get_default("lr"):
        parser.error("--lr: this benchmark compares each system's own settings (trl-matched takes rmflow's default lr)")
    # these feed trl-matched only; default and tuned read OptimConfig themselves
    defaults = OptimConfig()
    args.pairs_per_step, args.lr, args.device = defaults.pairs_per_step, defaults.lr, "cpu"
    if not args.shared.is_dir():
        raise SystemExit(f"shared data not found at {args.shared}; pass --shared")
    systems = args.systems.split(",")
    summary: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "trials": args.trials}
    if any(s.startswith("trl") for s in systems):  # only then is TRL needed (it is the `bench` extra)
        summary["machine"] += f", trl {importlib.metadata.version('trl')}"
    saved = {k: os.environ.get(k) for k in ("RMFLOW_HOME", "MLFLOW_TRACKING_URI")}
    with tempfile.TemporaryDirectory() as work:
        os.environ["RMFLOW_HOME"] = str(Path(work) / "home")
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # the sweep's MLflow runs go to that home's SQLite store
        seeds = [int(s) for s in args.seeds.split(",")]
        for kind in args.datasets.split(","):
            data = prepare(kind, args.shared, Path(work), args.limit)
            args.seed = seeds[0]  # the sweep's base config (trials train with the base seed)
            swept = run_sweep_once(kind, data, args) if "tuned" in systems else None
            accuracies: dict[str, list[float]] = {}
            for seed in seeds:
                args.seed = seed
                rows = {}
                for system, settings in (("trl", {}), ("trl-matched", matched_trl_settings(args, defaults.epochs))):
                    if system in systems:  # the last state, as TRL keeps it
                        trl = run_trl(kind, data, args, settings)
                        rows[system] = {"test_accuracy": round(trl["test_accuracy"], 4),
                                        "test_ci95": wilson(trl["test_accuracy"], trl["test_pairs"]), "test_pairs": trl["test_pairs"],
                                        **{k: trl[k] for k in ("train_s", "steps", "learning_rate", "epochs", "pairs_per_step",
                                                               "pairs_trained")}}
                if "default" in systems:
                    rows["default"] = run_default(kind, data, args)
                for head in ("scalar", "seqcls"):
                    if head in systems:
                        rows[head] = run_default(kind, data, args, head)
                if swept is not None:
                    rows["tuned"] = run_tuned(kind, data, args, *swept)
                for system, row in rows.items():
                    emit({"dataset": kind, "system": system, "seed": seed, **row})
                    accuracies.setdefault(system, []).append(row["test_accuracy"])
            summary[kind] = {f"{s}_mean_test_accuracy": round(float(np.mean(a)), 4) for s, a in accuracies.items()}
            summary[kind] |= {f"{s}_test_accuracies": a for s, a in accuracies.items()}
            for ref in ("trl", "trl-matched"):  # per seed, then averaged: the same seeds on both sides
                if ref in accuracies:
                    summary[kind] |= {f"{s}_minus_{ref}": round(float(np.mean(np.subtract(a, accuracies[ref]))), 4)
                                      for s, a in accuracies.items() if s != ref and not (s == "trl" and ref == "trl-matched")}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
