"""The Prefect flows end to end, under prefect_test_harness, with the real Label Studio, a SQLite
MLflow registry and a local Ray runtime (no mocks)."""
from __future__ import annotations

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
    from flows.pipeline import PipelineParams

    return PipelineParams(
        project=PROJECT, model_name="flow-test-reward", data_root=str(tmp_path_factory.mktemp("flow_data")),
        run={"model": {"backbone": str(tiny_bert), "max_length": 128}, "optim": {"lr": 3e-3, "epochs": 2},
             "scale": {"workers": 2}},
        gate={"min_accuracy": 0.55, "max_ece": 0.5, "max_length_bias": 0.95, "delta": 0.2, "bootstrap": 300},
    )


def label(n: int, seed: int) -> None:
    from rmcore.synthetic import synthetic_items
    from tasks import labelstudio as lst

    ls = lst.connect()
    project_id = lst.ensure_project(ls, PROJECT, 4)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(n, 4, seed=seed)]
    assert lst.import_tasks(ls, project_id, items)["imported"] == n
    lst.simulate_annotators(project_id, annotators=2, noise=0.3, seed=seed)


def versions(name: str) -> int:
    from tasks.registry import configure_mlflow

    client = configure_mlflow()
    return len(client.search_model_versions(f"name='{name}'")) if client.search_registered_models(filter_string=f"name='{name}'") else 0


def test_pipeline_promotes_reuses_and_the_sensor_retrains_against_the_champion(label_studio, prefect_harness, params):
    from prefect.variables import Variable

    from flows.pipeline import reward_pipeline, watermark_variable
    from flows.sensor import label_sensor

    label(40, seed=21)
    first = reward_pipeline(params)
    assert first["passed"] and first["champion_version"] == first["version"] == "1", first
    assert first["total_rankings"] == 80 and first["workers"] == 2
    assert Variable.get(watermark_variable(PROJECT)) == first["watermark"]

    again = reward_pipeline(params)
    assert again["skipped"] and versions(params.model_name) == 1

    idle = label_sensor(params, min_new_labels=30, use_deployment=False)
    assert idle == {"triggered": False, "new_annotations": 0}

    label(20, seed=22)
    sensed = label_sensor(params, min_new_labels=30, use_deployment=False)
    assert sensed["triggered"] and sensed["new_annotations"] == 40
    retrain = sensed["pipeline"]
    assert retrain["version"] == "2" and retrain["total_rankings"] == 120
    assert "vs_champion" in retrain["gate_checks"]  # gated against version 1
    assert Variable.get(watermark_variable(PROJECT)) == retrain["watermark"] > first["watermark"]


def test_label_studio_down_fails_the_flow_and_keeps_the_watermark(prefect_harness, params, monkeypatch):
    from prefect.variables import Variable

    from flows.pipeline import reward_pipeline, watermark_variable
    from infra.process import free_port

    before = Variable.get(watermark_variable(PROJECT), default=None)
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port(1)}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x" * 40)
    state = reward_pipeline(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="unreachable"):
        state.result()
    assert Variable.get(watermark_variable(PROJECT), default=None) == before
