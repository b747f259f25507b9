from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rmcore.config import RunConfig, StrengthConfig
from rmcore.converters.common import ConversionResult
from rmcore.dataset import load_groups, write_preference_dataset
from rmcore.records import Ranking
from rmcore.strength import (
    apply_strategy,
    final_run_config,
    low_strength_mask,
    reannotation_candidates,
    strategy_counts,
    strength_stats,
)
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


def test_reannotation_candidates_most_doubtful_first_one_per_pair():
    row = {**ROWS[0], "prompt_id": "p1"}
    twin = {**row, "group_id": "second annotator"}  # same prompt and texts, labelled by someone else
    mean = {"train": (np.array([2.0, -1.0, 0.5, 2.0, -3.0, 0.4]), np.array([0.1, 1.0, 0.1, 0.1, 1.0, 3.0])),
            "test": (np.array([-0.2]), np.array([0.1]))}
    test_row = {"prompt_id": "p2", "prompt": "q", "completions": ["x", "y"], "pairs": [[0, 1]]}
    found = reannotation_candidates({"train": [row, twin], "test": [test_row]}, mean, std_quantile=0.9)
    # (a,c): -3/1 beats -1/1 for the same pair; (b,c): std 3.0 ≥ the 90% quantile; the doubtful
    # test pair (x,y) is never sent back: its label is what registered versions were gated on
    assert [(c.chosen, c.rejected, c.mean_strength, c.split) for c in found] == [
        ("a", "c", -3.0, "train"), ("b", "c", 0.4, "train")]
    everywhere = reannotation_candidates({"train": [row, twin], "test": [test_row]}, mean, 0.9, splits=("train", "test"))
    assert ("x", "y", "test") in [(c.chosen, c.rejected, c.split) for c in everywhere]
    counts = strategy_counts(np.array([1.5, -2.0, 0.4, -0.1]), StrengthConfig())
    assert counts == {"flip": 2, "soft": 2, "margin": 2, "flip+margin": 4, "soft+margin": 4}


def test_ensemble_ranks_planted_flipped_pairs_lowest(tiny_bert, tmp_path):
    """Planted reversed rankings: the ensemble (members as parallel Ray tasks) ranks them lowest,
    flips and re-annotation requests land on them, and the report reaches the MLflow run."""
    import json

    import mlflow
    from scipy.stats import mannwhitneyu

    from rmcore.dataset import read_manifest
    from rmcore.strength import read_reannotation_candidates
    from rmflow.infra.mlflow_client import configure_mlflow
    from rmflow.tasks.register import register_model
    from rmflow.tasks.strength import build_strength_dataset
    from rmflow.tasks.train import train_model

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
    strength = build_strength_dataset(cfg, data, track=True)
    trained = train_model(strength.run, strength.dataset, tmp_path / "model")
    out, counts = Path(strength.dataset), strength.summary
    before = load_groups(data)["train"].to_list()
    after = load_groups(out)["train"].to_list()
    is_planted = np.array([r["prompt"] in planted_prompts for r in before for _ in r["pairs"]])
    original = np.array(json.loads((out / "strength.json").read_text())["train"]["mean"])  # the ensemble's view of the labels
    assert mannwhitneyu(original[is_planted], original[~is_planted], alternative="less").pvalue < 1e-3
    flipped = np.array([pa != pb for a, b in zip(after, before) for pa, pb in zip(a["pairs"], b["pairs"])])
    assert flipped.sum() == counts["flipped"] > 0
    precision = (flipped & is_planted).sum() / flipped.sum()
    assert precision > 2.5 * is_planted.mean()  # flips land on planted noise far above its base rate
    assert read_manifest(out)["parent_version"] == read_manifest(data)["version"] != counts["dataset_version"]
    assert len(counts["mlflow_runs"]) == 3

    candidates = read_reannotation_candidates(out)
    top = candidates[:20]
    assert len(candidates) == counts["reannotation_candidates"] > 20
    assert np.mean([c.prompt in planted_prompts for c in top]) > 2.5 * is_planted.mean()

    report = Path(trained.strength_report) / "strength_report.md"
    assert "flip (this run) | " + str(counts["flipped"]) in report.read_text() and "d10" in report.read_text()
    assert trained.run == final_run_config(cfg) and trained.dataset == strength.dataset  # logged = trained
    run_id = register_model("strength-test", trained.model_dir, trained.model_copy(update={"summary": {**trained.summary, "strength": counts}})).run_id
    configure_mlflow()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "strength_report")}
    assert {"strength_report/strength_report.md", "strength_report/strength_histogram.png",
            "strength_report/accuracy_by_strength_decile.png"} <= logged
    assert mlflow.get_run(run_id).data.metrics["strength.flipped"] == counts["flipped"]


def test_slice_by_strength_cuts_equal_parts_lowest_first():
    from rmcore.strength import slice_by_strength

    rows = [{**ROWS[0], "prompt_id": "p1", "ties": [[0, 1]]}, {**ROWS[0], "prompt_id": "p2"}]
    mean = np.array([0.5, -2.0, 3.0, 1.0, -1.0, 2.0])  # per pair, rows in order
    low, high = slice_by_strength(rows, mean, 2)
    assert [(r["prompt_id"], r["pairs"]) for r in low] == [("p1", [[0, 1], [0, 2]]), ("p2", [[0, 2]])]
    assert [(r["prompt_id"], r["pairs"], r["margins"]) for r in high] == [("p1", [[1, 2]], [1.0]), ("p2", [[0, 1], [1, 2]], [1.0, 1.0])]
    assert all(r["ties"] == [] for r in low + high)
    with pytest.raises(ValueError, match="7 slices"):
        slice_by_strength(rows, mean, 7)


@pytest.mark.slow
def test_strength_slices_planted_reversed_pairs_score_below_chance(tiny_bert, tmp_path):
    """Planted reversed rankings in the train split only: the model trained on the lowest strength
    slice alone learns them and scores below 0.5 on the clean validation split; the clean slices'
    models score above it. Members and slice models run as parallel Ray tasks."""
    from rmcore.dataset import split_of
    from rmflow.bench.slices import slice_experiment

    rankings = synthetic_rankings(synthetic_items(400, k=4, seed=14), annotators=1, noise=0.0, seed=15)
    train = [i for i, r in enumerate(rankings) if split_of(r.prompt, (0.8, 0.1, 0.1)) == "train"]
    planted = set(train[::6])  # ~17% of train rankings reversed; validation and test stay clean
    noisy = [Ranking(r.prompt_id, r.prompt, r.completions, list(reversed(r.order)), r.annotator, r.source)
             if i in planted else r for i, r in enumerate(rankings)]
    data = tmp_path / "ds"
    write_preference_dataset(ConversionResult(rankings=noisy), data, {"kind": "planted"})
    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 96},
                                    "optim": {"lr": 3e-3, "epochs": 1, "pairs_per_step": 8},
                                    "strength": {"ensemble": 3}})
    result = slice_experiment(cfg, data, 5, tmp_path, "planted", slice_epochs=1)
    accuracy = [s["validation"]["accuracy"] for s in result["slices"]]
    assert len(accuracy) == 5 and len({s["train_pairs"] for s in result["slices"]}) <= 2  # equal budgets (±1 pair)
    assert accuracy[0] < 0.5, accuracy
    assert all(a > 0.5 for a in accuracy[2:]), accuracy
    assert result["slices"][0]["strength_max"] <= result["slices"][-1]["strength_min"]


@pytest.mark.parametrize("strategy, flip_fraction", [("flip", 0.0), ("flip", 0.3), ("flip+margin", 0.0), ("soft", 0.0)])
def test_a_sweeps_selection_set_holds_flipped_training_pairs_as_annotated(tmp_path, strategy, flip_fraction):
    """Tuning on a strength dataset: the training prompts a sweep moves into its selection set are ranked
    against the human labels, not the ensemble's flips (their strengths negated back); the rows left to
    train on keep the strategy's changes; a strategy that flips nothing moves its rows as they are."""
    from rmcore.sweep import write_selection_dataset
    from rmflow.tasks.strength import write_strength_dataset

    rankings = synthetic_rankings(synthetic_items(80, k=3, seed=5), annotators=1, seed=1)
    write_preference_dataset(ConversionResult(rankings=rankings), tmp_path / "d", {"kind": "t"})
    groups = load_groups(tmp_path / "d")
    rng = np.random.default_rng(0)
    splits = {s: {"rows": groups[s].to_list(), "mean": rng.normal(size=sum(len(r["pairs"]) for r in groups[s])),
                  "std": np.ones(sum(len(r["pairs"]) for r in groups[s]))} for s in groups}
    cfg = RunConfig.model_validate({"strength": {"ensemble": 3, "strategy": strategy, "flip_fraction": flip_fraction}})
    strength = write_strength_dataset(cfg, tmp_path / "d", {"splits": splits, "members": [], "mlflow_runs": []}, tmp_path)
    changed = {r["group_id"]: r for r in load_groups(Path(strength.dataset))["train"].to_list()}
    annotated = {r["group_id"]: r for r in groups["train"].to_list()}
    flips = strategy.startswith("flip")
    assert any(changed[g]["pairs"] != annotated[g]["pairs"] for g in annotated) == flips

    write_selection_dataset(Path(strength.dataset), tmp_path / "s", 0.5)
    sel = load_groups(tmp_path / "s")
    moved = [r for r in sel["validation"].to_list() if r["group_id"] in annotated]
    assert moved and any(changed[r["group_id"]]["pairs"] != r["pairs"] for r in moved) == flips
    for r in moved:  # pairs and their strengths as annotated
        c = changed[r["group_id"]]
        assert r["pairs"] == annotated[r["group_id"]]["pairs"], r["group_id"]
        assert r["strengths"] == [x if p == q else -x for x, p, q in zip(c["strengths"], r["pairs"], c["pairs"])]
    for r in sel["train"].to_list():
        assert {k: r[k] for k in ("pairs", "strengths", "smoothing")} == {k: changed[r["group_id"]][k] for k in ("pairs", "strengths", "smoothing")}
