"""The Prefect flows end to end, under prefect_test_harness, with the real Label Studio, a SQLite
MLflow registry and a local Ray runtime (no mocks)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.services]

PROJECT = "flow-test"


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def params(tiny_bert, tmp_path_factory):
    from rmflow.flows.pipeline import PipelineParams

    return PipelineParams(
        project=PROJECT, model_name="flow-test-reward", data_root=str(tmp_path_factory.mktemp("flow_data")),
        run={"model": {"backbone": str(tiny_bert), "max_length": 128}, "optim": {"lr": 3e-3, "epochs": 2},
             "scale": {"workers": 2}},
        gate={"min_accuracy": 0.55, "max_ece": 0.5, "max_length_bias": 0.95, "delta": 0.2, "bootstrap": 300},
    )


def label(n: int, seed: int, project: str = PROJECT) -> None:
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 4)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(n, 4, seed=seed)]
    assert lst.import_tasks(ls, project_id, items)["imported"] == n
    lst.simulate_annotators(project_id, annotators=2, noise=0.3, seed=seed)


def versions(name: str) -> int:
    from rmflow.infra.mlflow_client import configure_mlflow, model_versions

    return len(model_versions(configure_mlflow(), name))


def watermark(params) -> str | None:
    from rmcore.watermark import read_watermark
    from rmflow.flows.pipeline import data_root

    return read_watermark(data_root(params)).at


def exported_champion_scores_like_rmflow(name: str, tmp_path: Path) -> None:
    """`rmflow export` on a champion the pipeline promoted with the default head (what `rmflow demo`
    promotes: an encoder, so model.head=auto → seqcls): the folder loads in
    AutoModelForSequenceClassification with num_labels=1 and its logits are rmflow's rewards."""
    import json
    import subprocess
    import sys

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmcore.synthetic import synthetic_items
    from rmflow.infra.mlflow_client import configure_mlflow
    from rmflow.infra.model_uri import load_scorer

    uri, out = f"models:/{name}@champion", tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "rmflow", "export", "--model", uri, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["kind"] == "seqcls"
    assert configure_mlflow().get_model_version(name, "1").tags["hf_export"] == "hf_model"  # the pipeline's own export too
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.num_labels == 1 and hf.config.rmflow_input == "[CLS] prompt [SEP] response [SEP] (token_type_ids all 0)"
    items = synthetic_items(3, 2, seed=8)
    prompts, responses = [i.prompt for i in items for _ in i.responses], [r for i in items for r in i.responses]
    # rmflow_input: one sequence, no second segment (a text pair would set token_type_ids to 1)
    batch = tok([f"{p} {tok.sep_token} {r}" for p, r in zip(prompts, responses)], padding=True, return_tensors="pt")
    scorer = load_scorer(uri)
    assert [ids[:n] for ids, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(-1).tolist())] == \
        scorer.encode(prompts, responses)
    with torch.no_grad():
        logits = hf(**batch).logits[:, 0].numpy()
    rewards = scorer.score(prompts, responses)
    assert np.ptp(rewards) > 1e-3  # a trained model that tells responses apart, not a constant
    np.testing.assert_allclose(logits, rewards, atol=1e-4)


def test_pipeline_promotes_reuses_and_the_sensor_retrains_against_the_champion(label_studio, prefect_harness, params, tmp_path):
    from rmcore.retrain import RetrainPolicy
    from rmflow.flows.pipeline import reward_pipeline
    from rmflow.flows.sensor import label_sensor

    label(40, seed=21)
    first = reward_pipeline(params)
    assert first["passed"] and first["champion_version"] == first["version"] == "1", first
    assert first["total_rankings"] == 80 and first["workers"] == 2
    assert watermark(params) == first["watermark"]
    exported_champion_scores_like_rmflow(params.model_name, tmp_path)

    again = reward_pipeline(params)
    assert again["skipped"] and versions(params.model_name) == 1

    idle = label_sensor(params, RetrainPolicy(min_new_labels=30), use_deployment=False)
    assert (idle["triggered"], idle["new_annotations"]) == (False, 0)

    label(20, seed=22)
    sensed = label_sensor(params, RetrainPolicy(min_new_labels=30), use_deployment=False)
    assert sensed["triggered"] and sensed["new_annotations"] == 40 and sensed["reason"] == "threshold"
    retrain = sensed["pipeline"]
    assert retrain["version"] == "2" and retrain["total_rankings"] == 120
    assert "vs_champion" in retrain["gate_checks"]  # gated against version 1
    assert watermark(params) == retrain["watermark"] > first["watermark"]


def test_label_studio_down_fails_the_flow_and_keeps_the_watermark(prefect_harness, params, monkeypatch):
    from rmflow.flows.pipeline import reward_pipeline
    from rmflow.infra.process import free_port

    before = watermark(params)
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port(1)}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x" * 40)
    state = reward_pipeline(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="unreachable"):
        state.result()
    assert watermark(params) == before


def test_active_labelling_round_trips_through_label_studio(label_studio, prefect_harness, tmp_path):
    """Doubtful pairs go to the real Label Studio as tagged two-response tasks (capped by the flow
    parameter, never sent twice); a person's new labels replace the old judgements of those pairs."""
    import numpy as np

    from rmcore.config import RunConfig
    from rmcore.dataset import SPLITS, load_groups, load_pairs, split_of
    from rmflow.flows.pipeline import request_reannotation
    from rmflow.infra import labelstudio as local
    from rmflow.infra import labelstudio_api as lst
    from rmflow.tasks.collect import pull_snapshot
    from rmflow.tasks.dataset import build_dataset
    from rmflow.tasks.strength import write_strength_dataset

    project = "reannotation-test"
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 3)
    # training prompts: only train pairs are ever sent back to annotators
    questions = [q for q in (f"Question {i}: how?" for i in range(100)) if split_of(q, (0.8, 0.1, 0.1)) == "train"][:6]
    items = [{"prompt": q, "responses": [f"best {i}", f"middle {i}", f"worst {i}"], "order": [0, 1, 2]}
             for i, q in enumerate(questions)]
    lst.import_tasks(ls, project_id, items)
    lst.simulate_annotators(project_id, annotators=1)
    root = tmp_path / "labels"
    labels = build_dataset(pull_snapshot(project, root), root, None)
    data = Path(labels.dataset)

    # an ensemble that doubts exactly the (best, worst) pair of every prompt
    groups = load_groups(data)
    splits = {}
    for split in SPLITS:
        rows = groups[split].to_list()
        doubted = np.array([r["completions"][w].startswith("best") and r["completions"][l].startswith("worst")
                            for r in rows for w, l in r["pairs"]], dtype=bool)
        splits[split] = {"rows": rows, "mean": np.where(doubted, -1.0, 2.0), "std": np.where(doubted, 0.5, 0.1)}
    cfg = RunConfig.model_validate({"strength": {"ensemble": 3, "strategy": "flip"}})
    strength = write_strength_dataset(cfg, data, {"splits": splits, "members": [], "mlflow_runs": []}, tmp_path)
    strength_dir, counts = Path(strength.dataset), strength.summary
    assert counts["reannotation_candidates"] == 6

    assert request_reannotation(project, str(strength_dir), max_tasks=4)["sent"] == 4
    assert request_reannotation(project, str(strength_dir), max_tasks=4)["sent"] == 2  # the first 4 are not sent again
    tasks = [t for t in ls.tasks.list(project=project_id, fields="all") if t.data.get("rmflow_reannotate")]
    assert len(tasks) == 6 and all(len(t.data["items"]) == 2 for t in tasks)

    # a person re-labels five of them through the API: worst over best, as the ensemble suspected
    person = lst.connect(token=local.create_user("sim-0@rmflow.local"))
    relabelled = []
    for task in tasks[:5]:
        ids = {item["body"].split()[0]: item["id"] for item in task.data["items"]}
        person.annotations.create(id=task.id, result=lst.ranker_result([ids["worst"], ids["best"]]))
        relabelled.append(task.data["prompt"])
    after = build_dataset(pull_snapshot(project, root), root, labels.watermark)
    assert after.new_rankings == 5 and after.relabelled == 5 and after.version != labels.version
    pairs = [p for split in load_pairs(Path(after.dataset)).values() for p in split.to_list()]
    for prompt in questions:
        extremes = [(p["chosen"].split()[0], p["rejected"].split()[0]) for p in pairs
                    if p["prompt"] == prompt and {p["chosen"].split()[0], p["rejected"].split()[0]} == {"best", "worst"}]
        assert extremes == ([("worst", "best")] if prompt in relabelled else [("best", "worst")]), prompt
        assert sum(p["prompt"] == prompt for p in pairs) == 3  # the other two judgements stay


def test_pipeline_with_an_ensemble_trains_on_strengths_and_sends_doubtful_pairs(label_studio, prefect_harness, params):
    from rmflow.flows.pipeline import reward_pipeline
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra.mlflow_client import configure_mlflow

    project = "ensemble-flow-test"
    label(30, seed=31, project=project)
    run = params.run.model_copy(update={"scale": params.run.scale.model_copy(update={"workers": 1}),
                                        "strength": params.run.strength.model_copy(update={"ensemble": 2, "strategy": "flip+margin"})})
    ensemble_params = params.model_copy(update={"project": project, "model_name": "ensemble-reward", "run": run, "reannotate_max": 5})
    result = reward_pipeline(ensemble_params)
    assert Path(result["trained_on"]).name.startswith(result["dataset_version"] + "-strength-")
    assert len(result["strength"]["mlflow_runs"]) == 2 and result["strength"]["pairs"] > 0
    assert result["reannotation"]["sent"] == min(5, result["reannotation"]["candidates"]) > 0
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 4)
    sent = [t for t in ls.tasks.list(project=project_id, fields="all") if t.data.get("rmflow_reannotate")]
    assert len(sent) == result["reannotation"]["sent"]
    version = configure_mlflow().get_model_version("ensemble-reward", result["version"])
    assert version.tags["label_dataset_version"] == result["dataset_version"] != version.tags["dataset_version"]
    # unanswered re-annotation tasks add no label: the same labels and config are not trained again
    assert reward_pipeline(ensemble_params)["skipped"]


def test_pipeline_with_tune_on_registers_the_tuned_config(label_studio, prefect_harness, params):
    import yaml
    from mlflow import MlflowClient

    from rmcore.paths import mlflow_tracking_uri
    from rmcore.sweep import PipelineTune
    from rmflow.flows.pipeline import reward_pipeline

    project = "tune-flow-test"
    label(40, seed=31, project=project)
    run = params.run.model_copy(update={"scale": params.run.scale.model_copy(update={"workers": 1})})
    tune = PipelineTune.model_validate({"enabled": True, "retune_every": 2, "sweep": {"trials": 2, "concurrent": 2, "space": {
        "optim.lr": {"choice": [3e-3, 1e-4]}, "optim.epochs": {"choice": [1, 2]}, "optim.warmup_ratio": None, "optim.weight_decay": None}}})
    result = reward_pipeline(params.model_copy(update={"project": project, "model_name": "tune-reward", "run": run, "tune": tune}))
    assert result["tune"]["tuned"] and result["tune"]["parent_run_id"]
    best = yaml.safe_load(Path(result["tune"]["config_file"]).read_text())
    client = MlflowClient(mlflow_tracking_uri())
    logged = client.get_run(result["run_id"]).data.params  # what MLflow logs for the version is the tuned config
    assert float(logged["optim.lr"]) == best["optim"]["lr"] and float(logged["optim.epochs"]) == best["optim"]["epochs"]
    experiment = client.get_experiment_by_name("rmflow").experiment_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result['tune']['parent_run_id']}'")) == 2
    # new labels, the next run (retune_every 2): no sweep, the recorded best config is reused and trained
    sweeps = len(client.search_runs([experiment], "tags.`rmflow.kind` = 'tune'"))
    assert sweeps >= 1
    label(10, seed=32, project=project)
    again = reward_pipeline(params.model_copy(update={"project": project, "model_name": "tune-reward", "run": run, "tune": tune}))
    assert not again["tune"]["tuned"] and again["tune"]["config_file"] == result["tune"]["config_file"], again["tune"]
    assert again["version"] != result["version"] and again["total_rankings"] > result["total_rankings"]
    logged = client.get_run(again["run_id"]).data.params
    assert float(logged["optim.lr"]) == best["optim"]["lr"] and float(logged["optim.epochs"]) == best["optim"]["epochs"]
    assert len(client.search_runs([experiment], "tags.`rmflow.kind` = 'tune'")) == sweeps  # no new sweep's parent run
