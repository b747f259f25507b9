from __future__ import annotations

import numpy as np
import pytest

from rmcore.config import RunConfig, StrengthConfig
from rmcore.converters.common import ConversionResult
from rmcore.dataset import load_groups, write_preference_dataset
from rmcore.records import Ranking
from rmcore.strength import apply_strategy, final_run_config, low_strength_mask, strength_stats
from rmcore.synthetic import synthetic_items, synthetic_rankings

ROWS = [{"prompt": "p", "completions": ["a", "b", "c"], "blocks": [0, 1, 2], "pairs": [[0, 1], [0, 2], [1, 2]],
         "margins": [1.0, 2.0, 1.0], "ties": []}]


def test_strategies_on_constructed_pairs():
    mean, std = strength_stats([np.array([2.0, -1.0, 0.5]), np.array([1.0, -3.0, 0.3])])
    assert mean.tolist() == [1.5, -2.0, 0.4] and std.tolist() == pytest.approx([0.5, 1.0, 0.1])
    flipped, counts = apply_strategy(ROWS, mean, std, StrengthConfig(strategy="flip+margin"))
    assert flipped[0]["pairs"] == [[0, 1], [2, 0], [1, 2]] and counts["flipped"] == 1
    assert flipped[0]["strengths"] == [1.5, 2.0, 0.4]  # the flipped pair's strength as now oriented
    soft, counts = apply_strategy(ROWS, mean, std, StrengthConfig(strategy="soft", soft_alpha=0.25))
    assert soft[0]["pairs"] == ROWS[0]["pairs"] and soft[0]["smoothing"] == [0.0, 0.25, 0.0] and counts["smoothed"] == 1
    assert low_strength_mask(mean, StrengthConfig(flip_fraction=0.34)).tolist() == [False, True, False]
    cfg = RunConfig.model_validate({"strength": {"ensemble": 3, "strategy": "soft+margin", "margin_coef": 0.5}})
    assert final_run_config(cfg).loss.adaptive_margin == 0.5
    assert final_run_config(cfg.model_copy(update={"strength": StrengthConfig(strategy="flip")})).loss.adaptive_margin == 0


def test_ensemble_ranks_planted_flipped_pairs_lowest(tiny_bert, tmp_path):
    from scipy.stats import mannwhitneyu

    from tasks.strength import build_strength_dataset

    rankings = synthetic_rankings(synthetic_items(300, k=4, seed=4), annotators=1, noise=0.0, seed=5)
    planted = set(range(0, len(rankings), 7))  # ~14% of rankings reversed on purpose
    noisy = [Ranking(r.prompt_id, r.prompt, r.completions, list(reversed(r.order)), r.annotator, r.source)
             if i in planted else r for i, r in enumerate(rankings)]
    data = tmp_path / "ds"
    write_preference_dataset(ConversionResult(rankings=noisy), data, {"kind": "planted"})
    planted_prompts = {noisy[i].prompt for i in planted}
    # one epoch, as in the paper: members trained longer memorise the planted flips
    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 96},
                                    "optim": {"lr": 3e-3, "epochs": 1},
                                    "strength": {"ensemble": 3, "strategy": "flip", "flip_fraction": 0.14}})
    out, counts = build_strength_dataset(cfg, data, tmp_path)
    before = load_groups(data)["train"].to_list()
    after = load_groups(out)["train"].to_list()
    is_planted = np.array([r["prompt"] in planted_prompts for r in before for _ in r["pairs"]])
    # strengths are stored as now oriented; recover the ensemble's view of the original labels
    original = np.array([s if pa == pb else -s for a, b in zip(after, before)
                         for s, pa, pb in zip(a["strengths"], a["pairs"], b["pairs"])])
    assert mannwhitneyu(original[is_planted], original[~is_planted], alternative="less").pvalue < 1e-3
    flipped = np.array([pa != pb for a, b in zip(after, before) for pa, pb in zip(a["pairs"], b["pairs"])])
    assert flipped.sum() == counts["flipped"] > 0
    precision = (flipped & is_planted).sum() / flipped.sum()
    assert precision > 2.5 * is_planted.mean()  # flips land on planted noise far above its base rate
    from rmcore.dataset import read_manifest

    assert read_manifest(out)["parent_version"] == read_manifest(data)["version"] != counts["dataset_version"]
