"""Stage 3 (optional), strength: the preference-strength ensemble ("Secrets of RLHF", Part II)
and the strength-annotated dataset version the model then trains on.

Members differ in seed and data order and train on the same train split for the run's budget.
Every split's pairs are scored by every member: train strengths drive the strategy; held-out
strengths (pairs no member saw) only annotate validation/test, so reports can break accuracy
down by strength. With `strength.parallel` members are Ray tasks that run as many at once as the
cluster's resources allow, each in a temporary folder of the node it runs on; with the team's
bucket they read the dataset version there (`source`), so nodes need no shared disk.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from rmcore.config import RunConfig, StrengthConfig
from rmcore.contracts import StrengthDataset
from rmcore.dataset import SPLITS, load_groups, read_manifest, write_derived_dataset
from rmcore.evaluate import evaluate_rows
from rmcore.records import content_hash
from rmcore.scoring import RewardScorer
from rmcore.strength import REANNOTATION_FILE, STRENGTH_FILE, apply_strategy, final_run_config, reannotation_candidates, strength_stats
from rmflow.infra.ray_train import fit, local_dataset, map_on_ray


def member_config(cfg: RunConfig, member: int) -> RunConfig:
    return cfg.model_copy(update={
        "optim": cfg.optim.model_copy(update={"seed": cfg.optim.seed + 1000 + member}),
        "strength": cfg.strength.model_copy(update={"ensemble": 0}),
    })


def pair_diffs(model_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """r_chosen - r_rejected of every pair of `rows`, in the rows' pair order."""
    return evaluate_rows(RewardScorer(model_dir), rows).diffs if rows else np.zeros(0)


def train_member(cfg: RunConfig, data: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Trains one member and scores every split's pairs with it, in a temporary folder of the process
    it runs in (on any node). `data`: a dataset folder, or the version in the team's bucket (s3://…),
    which the member's training workers then read for themselves."""
    with tempfile.TemporaryDirectory(prefix="rmflow-member-") as tmp, local_dataset(data) as local:
        model_dir = Path(tmp) / "model"
        summary = fit(cfg, data if cfg.scale.on_ray_train else local, model_dir)
        groups = load_groups(local)
        return summary, {split: pair_diffs(model_dir, groups[split].to_list()) for split in SPLITS}


def train_members(cfg: RunConfig, data: str) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    configs = [member_config(cfg, m) for m in range(cfg.strength.ensemble)]
    if not cfg.strength.parallel or cfg.scale.on_ray_train:
        return [train_member(c, data) for c in configs]
    return map_on_ray(train_member, [(c, data) for c in configs], cfg.scale)


def ensemble_strengths(cfg: RunConfig, data_dir: Path, track: bool = False, source: str | None = None) -> dict[str, Any]:
    """Trains the M members; returns per split the rows and each pair's strength (mean, std).
    With `track`, each member is an MLflow run (kind `strength-member`). `source`: the same version
    in the team's bucket, which the members read instead of `data_dir` (on a cluster without shared disk)."""
    data_dir = Path(data_dir)
    groups = load_groups(data_dir)
    results = train_members(cfg, source or str(data_dir.resolve()))
    run_ids = []
    if track:
        from rmflow.infra.mlflow_client import log_run

        run_ids = [log_run(member_config(cfg, m), summary, data_dir, {"rmflow.kind": "strength-member"}, f"strength-member-{m}")
                   for m, (summary, _) in enumerate(results)]
    splits = {}
    for split in SPLITS:
        mean, std = strength_stats([diffs[split] for _, diffs in results])
        splits[split] = {"rows": groups[split].to_list(), "mean": mean, "std": std}
    return {"splits": splits, "mlflow_runs": run_ids,
            "members": [member_config(cfg, m).model_dump(mode="json") for m in range(cfg.strength.ensemble)],
            "member_val_accuracy": [float(s["val_accuracy"]) for s, _ in results]}


def strength_rows(ensemble: dict[str, Any], cfg: StrengthConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The strategy applied to the train split; held-out splits only gain strength columns."""
    rows, counts = {}, {}
    for split, s in ensemble["splits"].items():
        rows[split], split_counts = apply_strategy(s["rows"], s["mean"], s["std"], cfg if split == "train" else StrengthConfig())
        if split == "train":
            counts = split_counts
    return rows, counts


def write_strength_dataset(cfg: RunConfig, data_dir: Path, ensemble: dict[str, Any], out_root: Path | None = None) -> StrengthDataset:
    """Applies `cfg.strength.strategy` and writes the result as a new dataset version."""
    data_dir = Path(data_dir)
    rows, counts = strength_rows(ensemble, cfg.strength)
    derivation = {"ensemble": cfg.strength.ensemble, "strength": cfg.strength.model_dump(mode="json"),
                  "members": ensemble["members"], "mlflow_runs": ensemble["mlflow_runs"]}
    out = Path(out_root or data_dir.parent) / f"{read_manifest(data_dir)['version']}-strength-{content_hash(derivation)[:8]}"
    manifest = write_derived_dataset(data_dir, out, rows, derivation)
    # the ensemble's view in the parent's pair order and orientation (a flip rewrites the rows)
    (out / STRENGTH_FILE).write_text(json.dumps({split: {"mean": s["mean"].tolist(), "std": s["std"].tolist()}
                                                  for split, s in ensemble["splits"].items()}))
    candidates = reannotation_candidates({k: s["rows"] for k, s in ensemble["splits"].items()},
                                         {k: (s["mean"], s["std"]) for k, s in ensemble["splits"].items()},
                                         cfg.strength.reannotate_std_quantile)
    with open(out / REANNOTATION_FILE, "w") as f:
        f.writelines(json.dumps(asdict(c)) + "\n" for c in candidates)
    mean = ensemble["splits"]["train"]["mean"]
    summary = {**counts, "reannotation_candidates": len(candidates), "dataset_version": manifest["version"],
               "mean_strength": float(mean.mean()) if len(mean) else float("nan"),
               "negative_fraction": float((mean < 0).mean()) if len(mean) else float("nan"),
               "mlflow_runs": ensemble["mlflow_runs"], "member_val_accuracy": ensemble.get("member_val_accuracy", [])}
    return StrengthDataset(dataset=str(out), label_dataset=str(data_dir), run=final_run_config(cfg), summary=summary)


def build_strength_dataset(cfg: RunConfig, data_dir: Path, out_root: Path | None = None, track: bool = False,
                           source: str | None = None) -> StrengthDataset:
    """The ensemble, then the strength-annotated dataset version and the config to train on it.
    `source`: the version `data_dir` holds, in the team's bucket: the members train from there."""
    if not cfg.strength.ensemble:
        raise ValueError("strength.ensemble is 0: there is no ensemble to train")
    return write_strength_dataset(cfg, Path(data_dir), ensemble_strengths(cfg, Path(data_dir), track, source), out_root)


strength_task = task(build_strength_dataset, name="strength-ensemble", tags=["rmflow-training"])
