"""The team-stack files cannot run here (no Docker, no Kubernetes); check they parse and agree
with what rmflow expects."""
from __future__ import annotations

from pathlib import Path

import yaml

from infra import labelstudio, stack

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_compose_ports_and_environment_match_rmflow():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prefect", "mlflow", "postgres", "labelstudio", "ray-head"} <= set(services)
    assert f"127.0.0.1:{stack.PREFECT_PORT}:4200" in services["prefect"]["ports"]
    assert f"127.0.0.1:{stack.MLFLOW_PORT}:5000" in services["mlflow"]["ports"]
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    env = services["labelstudio"]["environment"]
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true" and env["LABEL_STUDIO_USERNAME"] == labelstudio.ADMIN
    assert services["labelstudio"]["image"].endswith(labelstudio.VERSION)
    assert "postgresql://" in services["mlflow"]["command"]


def test_kuberay_job_runs_rmflow_train_on_shared_storage():
    job = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("rmflow train")
    assert "--workers" in job["spec"]["entrypoint"] and "/shared/" in job["spec"]["entrypoint"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["volumes"][0]["persistentVolumeClaim"]["claimName"] == "rmflow-shared"
