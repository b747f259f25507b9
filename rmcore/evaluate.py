"""Evaluating a reward model on groups of completions: a dataset folder's split or a raw file.
Scores every completion once, then `rmcore.metrics.evaluate_rewards` derives every metric."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rmcore.converters import convert_file
from rmcore.converters.common import group_from_ranking
from rmcore.dataset import load_groups
from rmcore.metrics import Evaluation, evaluate_rewards
from rmcore.scoring import RewardScorer

PROBE_RESPONSES = 3


def group_rows(data: Path, split: str = "test", kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of the groups view: a dataset folder's split, or a whole raw file read through the
    converter of `kind` (malformed records are skipped, as `rmflow convert` quarantines them)."""
    data = Path(data)
    if data.is_dir():
        return load_groups(data)[split].to_list()
    if kind is None:
        raise ValueError(f"{data} is a file: say its format with --format (label-studio, hh-rlhf, qa-feedback, trl)")
    return [asdict(group_from_ranking(r)) for r in convert_file(kind, data).rankings]


def evaluate_rows(scorer: RewardScorer, rows: list[dict[str, Any]], probes: bool = False) -> Evaluation:
    """The evaluation of `rows` by `scorer`; with `probes`, per-token reward probes of the best
    completion of the first few prompts (a fixed choice, so successive versions see the same text)."""
    prompts = [r["prompt"] for r in rows for _ in r["completions"]]
    texts = [c for r in rows for c in r["completions"]]
    evaluation = evaluate_rewards(rows, scorer.score(prompts, texts))
    if probes:
        for r in rows[:PROBE_RESPONSES]:
            tokens, rewards = scorer.prefix_rewards(r["prompt"], r["completions"][0])
            evaluation.probes.append({"prompt": r["prompt"][-200:], "tokens": tokens, "rewards": rewards.tolist()})
    return evaluation


def evaluate_saved_model(model_dir: Path, data: Path, split: str = "test", kind: str | None = None,
                         device: str = "auto") -> Evaluation:
    return evaluate_rows(RewardScorer(model_dir, device), group_rows(data, split, kind))
