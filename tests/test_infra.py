"""The team-stack files cannot run here (no Docker, no Kubernetes); check they parse and agree
with what rmflow expects."""
from __future__ import annotations

from pathlib import Path

import yaml

from rmflow.infra import labelstudio, stack, team

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
    # the team backends as natively (infra/team.py): every service on PostgreSQL, artifacts proxied from
    # the bucket, and no secret on any command line (only in environments and mounted files)
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_NAME"] == "labelstudio"
    for name, service in services.items():
        command = service.get("command", "")
        assert not any(secret in command for secret in ("PASSWORD", "SECRET", "API_KEY", "postgresql://")), name
    init = (INFRA / "postgres-init.sql").read_text()
    assert all(f"CREATE DATABASE {db};" in init for db in team.SERVICE_DATABASES)
    # the same settings rmflow's managed servers get
    prefect_env = stack.prefect_env()
    for key in ("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"):
        assert services["prefect"]["environment"][key] == prefect_env[key]
    assert env["LABEL_STUDIO_SENTRY_DSN"] == labelstudio._env({"password": "", "token": ""})["LABEL_STUDIO_SENTRY_DSN"] == ""


def test_kuberay_job_runs_rmflow_train_on_shared_storage():
    job = next(d for d in yaml.safe_load_all((INFRA / "kuberay-rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("rmflow train")
    assert "--workers" in job["spec"]["entrypoint"] and "/shared/" in job["spec"]["entrypoint"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["volumes"][0]["persistentVolumeClaim"]["claimName"] == "rmflow-shared"


def test_kuberay_head_ports_only_admit_the_jobs_own_pods():
    """The Ray Jobs API has no auth: the dashboard host is only open behind a NetworkPolicy."""
    docs = list(yaml.safe_load_all((INFRA / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/originated-from-cr-name": job["metadata"]["name"]}}}]
    assert {p["port"] for p in rule["ports"]} == {8265, 6379, 10001}


def test_a_managed_service_never_signals_a_process_it_did_not_start(tmp_path):
    """A reused pid (same number, another program, another start time) is not ours: stop() leaves
    it alone even when its command line happens to contain the marker."""
    import json
    import subprocess
    import sys

    from rmflow.infra.process import ManagedService

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # prefect"])
    try:
        svc = ManagedService("prefect", tmp_path)
        tmp_path.mkdir(exist_ok=True)
        svc.state_file.write_text(json.dumps({"pid": stranger.pid, "started": 1.0, "marker": "prefect", "url": "http://x"}))
        assert svc.state() is None and svc.stop() is False
        assert stranger.poll() is None  # still running
        mine = svc.spawn([sys.executable, "-c", "import time; time.sleep(60)  # prefect"], {}, marker="prefect")
        assert svc.state()["pid"] == mine.pid and svc.stop() is True
        assert mine.wait(10) is not None and stranger.poll() is None
    finally:
        stranger.kill()


def test_ray_trains_storage_filesystem_carries_no_keys_each_node_reads_its_own(monkeypatch):
    """Ray Train pickles storage_filesystem to its controller and every worker, on any node: the one
    rmflow gives it names the endpoint only, so the keys each process uses are its own environment's
    (the driver's never travel); a filesystem built with the keys would carry them."""
    import pickle

    from rmflow.infra.ray_train import _storage

    secret = "s3-secret-" + "z" * 20
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rmflow")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    filesystem, path = _storage("s3://bucket/prefix/ray")
    assert path == "bucket/prefix/ray"
    assert secret.encode() not in pickle.dumps(filesystem)
    assert secret.encode() in pickle.dumps(team.storage_for("s3://bucket/prefix/ray").pyarrow_fs())
