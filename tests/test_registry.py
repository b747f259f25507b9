"""Registration, gated promotion and rollback on a real SQLite-backed MLflow registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmcore.config import GateConfig, RunConfig
from rmcore.converters.common import ConversionResult
from rmcore.dataset import write_preference_dataset
from rmcore.gate import evaluate_gate, paired_bootstrap_diff
from rmcore.records import Ranking
from rmcore.scoring import RewardScorer
from rmcore.synthetic import synthetic_items, synthetic_rankings
from rmcore.train import train_reward_model
from rmflow.infra.model_uri import load_scorer

pytestmark = pytest.mark.services

NAME = "test-reward"


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RMFLOW_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield home
    mp.undo()


def flipped(r: Ranking) -> Ranking:
    return Ranking(r.prompt_id, r.prompt, r.completions, list(reversed(r.order)), r.annotator, r.source)


@pytest.fixture(scope="module")
def models(tiny_bert, synthetic_dataset, tmp_path_factory):
    """Two good models (different seeds) and one trained on flipped labels."""
    root = tmp_path_factory.mktemp("models")
    bad_data = root / "flipped_ds"
    rankings = synthetic_rankings(synthetic_items(240, k=4, seed=1), annotators=1, noise=0.3, seed=2)
    write_preference_dataset(ConversionResult(rankings=[flipped(r) for r in rankings]), bad_data, {"kind": "flipped"})
    out = {}
    for key, data, seed in [("good", synthetic_dataset, 0), ("good2", synthetic_dataset, 1), ("bad", bad_data, 0)]:
        cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 128},
                                        "optim": {"lr": 3e-3, "epochs": 2, "seed": seed}})
        train_reward_model(cfg, data, root / key)
        out[key] = root / key
    return out


def promote(model_dir: Path, name: str, eval_data: Path, gate: GateConfig) -> dict:
    """The three stages `rmflow promote` and the pipeline run: register → evaluate → gate."""
    from rmflow.tasks.evaluate import evaluate_version
    from rmflow.tasks.promote import gate_and_promote
    from rmflow.tasks.register import register_model

    registered = register_model(name, model_dir)
    return {**gate_and_promote(evaluate_version(registered, eval_data), gate).model_dump(), "created": registered.created}


def test_promote_refuse_rollback_and_no_duplicate_versions(mlflow_home, models, synthetic_dataset):
    from rmflow.tasks.promote import rollback

    gate = GateConfig(min_accuracy=0.6, max_ece=0.5, max_length_bias=0.95, delta=0.1, bootstrap=300)
    first = promote(models["good"], NAME, synthetic_dataset, gate)
    assert first["passed"] and first["champion_version"] == first["version"] == "1"

    bad = promote(models["bad"], NAME, synthetic_dataset, gate)
    assert not bad["passed"] and bad["champion_version"] == "1"
    assert any(r.startswith("accuracy") for r in bad["reasons"]) and any(r.startswith("vs_champion") for r in bad["reasons"])

    again = promote(models["good"], NAME, synthetic_dataset, gate)
    assert again["version"] == "1" and not again["created"]

    second = promote(models["good2"], NAME, synthetic_dataset, gate)
    assert second["passed"] and second["champion_version"] == second["version"] == "3"

    from mlflow import MlflowClient

    from rmcore.paths import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri(), mlflow_tracking_uri())
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == "1"
    assert client.get_model_version(NAME, "2").tags["validation_status"] == "failed"
    assert client.get_model_version(NAME, "3").tags["validation_status"] == "passed"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3

    assert rollback(NAME)["champion_version"] == "1"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    artifacts = client.list_artifacts(second["run_id"], "evaluation")
    assert {"evaluation/evaluation_report.md", "evaluation/reliability.png", "evaluation/per_token_probe.png"} <= {a.path for a in artifacts}


def test_champion_pyfunc_scores_like_the_in_memory_model(mlflow_home, models):
    import mlflow

    from rmcore.paths import mlflow_tracking_uri

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    df = pd.DataFrame({"prompt": ["Question 1: what should I know about tea?"] * 2,
                       "response": ["Happy to help! Steep tea for three minutes.", "Figure it out yourself."]})
    local = RewardScorer(models["good"]).score(df["prompt"].tolist(), df["response"].tolist())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert np.allclose(pyfunc.predict(df)["reward"].to_numpy(), local, atol=1e-5)
    assert np.allclose(load_scorer(f"models:/{NAME}@champion").score(df["prompt"].tolist(), df["response"].tolist()), local, atol=1e-5)


def test_paired_bootstrap_and_gate_rules():
    rng = np.random.default_rng(0)
    champion = rng.random(400) < 0.75
    diff, low, high = paired_bootstrap_diff(champion, champion, 500)
    assert diff == low == high == 0.0
    worse = champion.copy()
    worse[:80] = False
    diff, low, high = paired_bootstrap_diff(worse, champion, 500)
    assert diff < 0 and high < 0
    metrics = {"accuracy": 0.7, "ece": 0.05, "length_bias": 0.1}
    result = evaluate_gate(metrics, GateConfig(delta=0.02, bootstrap=500), worse, champion)
    assert not result.passed and result.reasons[0].startswith("vs_champion")
    assert evaluate_gate(metrics, GateConfig(), None, None).passed
    assert evaluate_gate({**metrics, "length_bias": -0.9}, GateConfig(max_length_bias=0.5)).reasons == [
        "length_bias -0.9000 fails |x| <= 0.5"]
