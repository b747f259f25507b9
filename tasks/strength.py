"""Training the preference-strength ensemble and writing the strength-annotated dataset version.

Members differ in seed and data order and train on the same train split for the run's budget
(as in Secrets of RLHF, Part II). With `scale.workers > 1` each member trains on Ray Train; the
members themselves run one after another, which is what a 2-core machine allows.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rmcore.config import RunConfig
from rmcore.dataset import load_groups, read_manifest, write_derived_dataset
from rmcore.records import content_hash
from rmcore.report import evaluate_rows
from rmcore.scoring import RewardScorer
from rmcore.strength import apply_strategy, strength_stats


def member_config(cfg: RunConfig, member: int) -> RunConfig:
    return cfg.model_copy(update={
        "optim": cfg.optim.model_copy(update={"seed": cfg.optim.seed + 1000 + member}),
        "strength": cfg.strength.model_copy(update={"ensemble": 0}),
    })


def train_pair_diffs(model_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """r_chosen - r_rejected of every train pair, in the rows' pair order."""
    ev = evaluate_rows(RewardScorer(model_dir), rows)
    return ev.chosen_rewards - ev.rejected_rewards


def ensemble_strengths(cfg: RunConfig, data_dir: Path, track: bool = False) -> dict[str, Any]:
    """Trains the M members and returns each train pair's strength (mean, std over members)."""
    from tasks.train import run_training

    rows = load_groups(data_dir)["train"].to_list()
    diffs, run_ids = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for m in range(cfg.strength.ensemble):
            member_cfg = member_config(cfg, m)
            model_dir = Path(tmp) / f"member{m}"
            summary = run_training(member_cfg, data_dir, model_dir)
            if track:
                from tasks.registry import log_training_run

                run_ids.append(log_training_run(member_cfg, summary, data_dir, model_dir))
            diffs.append(train_pair_diffs(model_dir, rows))
    mean, std = strength_stats(diffs)
    return {"rows": rows, "mean": mean, "std": std, "mlflow_runs": run_ids,
            "members": [member_config(cfg, m).model_dump(mode="json") for m in range(cfg.strength.ensemble)]}


def write_strength_dataset(cfg: RunConfig, data_dir: Path, ensemble: dict[str, Any], out_root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Applies `cfg.strength.strategy` and writes the result as a new dataset version."""
    new_rows, counts = apply_strategy(ensemble["rows"], ensemble["mean"], ensemble["std"], cfg.strength)
    derivation = {"ensemble": cfg.strength.ensemble, "strength": cfg.strength.model_dump(mode="json"),
                  "members": ensemble["members"], "mlflow_runs": ensemble["mlflow_runs"]}
    out = Path(out_root or data_dir.parent) / f"{read_manifest(data_dir)['version']}-strength-{content_hash(derivation)[:8]}"
    manifest = write_derived_dataset(data_dir, out, new_rows, derivation)
    mean = ensemble["mean"]
    return out, {**counts, "dataset_version": manifest["version"], "mean_strength": float(mean.mean()),
                 "negative_fraction": float((mean < 0).mean()), "mlflow_runs": ensemble["mlflow_runs"]}


def build_strength_dataset(cfg: RunConfig, data_dir: Path, out_root: Path | None = None, track: bool = False) -> tuple[Path, dict[str, Any]]:
    data_dir = Path(data_dir)
    return write_strength_dataset(cfg, data_dir, ensemble_strengths(cfg, data_dir, track), out_root)
