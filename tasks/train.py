"""Stage 4, train: one reward model on a dataset version, in-process or on Ray Train
(`scale.workers` > 1), saved to a model folder with the mean/std of its rewards over the training
completions. On a strength-annotated version it also writes
the strength report (with the model's held-out accuracy per strength decile)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from rmcore.config import RunConfig, StrengthConfig
from rmcore.contracts import TrainedModel
from rmcore.dataset import load_groups, read_manifest
from rmcore.evaluate import evaluate_rows
from rmcore.model import write_reward_stats
from rmcore.records import content_hash
from rmcore.report import write_strength_report
from rmcore.scoring import RewardScorer, reward_stats
from rmcore.strength import read_strengths, strategy_counts
from rmflow.infra.ray_train import fit, local_dataset
from rmflow.infra.team import is_bucket_uri


def default_model_dir(data_dir: Path, cfg: RunConfig) -> Path:
    """Where the pipeline keeps the model of (dataset version, config)."""
    return Path(data_dir).parent / "models" / f"{Path(data_dir).name}-{content_hash(cfg.model_dump(mode='json'))[:8]}"


def train_model(cfg: RunConfig, data_dir: Path | str, out_dir: Path | None = None, run_name: str | None = None) -> TrainedModel:
    """`data_dir`: a dataset folder, or a dataset version in the team's bucket (s3://…), which the
    training workers copy for themselves and the driver copies for the reward statistics.
    `run_name`: the Ray Train run (the same name resumes a failed one, infra/ray_train.py)."""
    remote = is_bucket_uri(data_dir)
    if remote and out_dir is None:
        raise ValueError(f"training from {data_dir} needs an output folder (--out)")
    with local_dataset(str(data_dir)) as local:
        out_dir = Path(out_dir) if out_dir else default_model_dir(local, cfg)
        summary = fit(cfg, str(data_dir) if remote else local, out_dir, run_name)
        # the reward scale consumers normalise with (OpenRLHF's config mean/std, rmflow's normalize=True)
        scorer = RewardScorer(out_dir)
        stats = reward_stats(scorer, load_groups(local)["train"].to_list())
        write_reward_stats(out_dir, stats["mean"], stats["std"], stats["n"])
        summary = {**summary, "reward_mean": stats["mean"], "reward_std": stats["std"]}
        report = None
        strengths = read_strengths(local)
        if strengths is not None:
            report = out_dir.parent / f"{out_dir.name}-strength-report"
            strength_report(local, scorer, report, strengths)
    return TrainedModel(model_dir=str(out_dir), dataset=str(data_dir) if remote else str(local), run=cfg, summary=summary,
                        strength_report=str(report) if report else None)


def strength_report(strength_dir: Path, scorer: RewardScorer, out_dir: Path, strengths: dict) -> list[Path]:
    """The strength report of a model trained on `strength_dir`, with its held-out accuracy per
    decile of the ensemble's strength."""
    cfg = StrengthConfig.model_validate(read_manifest(strength_dir)["derivation"]["strength"])
    groups = load_groups(strength_dir)
    heldout = groups["validation"].to_list() + groups["test"].to_list()
    deciles = evaluate_rows(scorer, heldout).metrics.get("accuracy_by_strength_decile") if heldout else None
    return write_strength_report(Path(out_dir), strengths, strategy_counts(np.array(strengths["train"]["mean"]), cfg), cfg.strategy, deciles)


train_task = task(train_model, name="train", tags=["rmflow-training"])
