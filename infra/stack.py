"""The local stack: Prefect server (SQLite), MLflow server (the same SQLite store rmflow writes, plus
local artifacts), Label Studio, the webhook receiver and the served deployments, all bound to
127.0.0.1, state and logs under RMFLOW_HOME/<service>/.

To use existing services instead, set PREFECT_API_URL, MLFLOW_TRACKING_URI, LABEL_STUDIO_URL +
LABEL_STUDIO_API_KEY and RAY_ADDRESS: flows and CLI commands then talk to those. `up` still starts
the local Prefect server and Label Studio; the MLflow server is skipped when MLFLOW_TRACKING_URI
names a server.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rmcore.names import HEARTBEAT_S, SENSOR_INTERVAL_S
from rmcore.paths import dataset_root, mlflow_artifact_root, mlflow_tracking_uri, rmflow_home
from rmcore.retrain import RetrainPolicy
from rmflow.infra import labelstudio
from rmflow.infra.process import ManagedService, free_port, wait_healthy

PREFECT_PORT, MLFLOW_PORT, RECEIVER_PORT, RUNNER_PORT = 4200, 5000, 8765, 8766


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the rmflow venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def prefect_service() -> ManagedService:
    return ManagedService("prefect", rmflow_home() / "prefect")


def mlflow_service() -> ManagedService:
    return ManagedService("mlflow", rmflow_home() / "mlflow")


def receiver_service() -> ManagedService:
    return ManagedService("receiver", rmflow_home() / "receiver")


def deployments_service() -> ManagedService:
    return ManagedService("deployments", rmflow_home() / "deployments")


def prefect_env() -> dict[str, str]:
    """The Prefect server's environment; `{port}` is the port it really gets. The UI calls the API
    at PREFECT_UI_API_URL, which must follow the server when 4200 is taken."""
    return {"PREFECT_HOME": str(rmflow_home() / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": "http://127.0.0.1:{port}/api",
            # concurrency-slot leases on disk, not in memory: after a server restart a dead run's slot
            # still expires instead of staying taken for good (the pipeline takes one per model)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            # a (re)registered label-sensor schedule gets its runs within 15 s, not the default 60
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "15"}


def _start_http(svc: ManagedService, port: int, cmd: list[str], env: dict[str, str], health: str, timeout_s: float) -> dict[str, Any]:
    """Starts `cmd` (with {port} filled in) unless rmflow already runs it, then waits for `health`."""
    state = svc.state()
    if state and state.get("url"):
        return {"url": state["url"], "started": False}
    port = free_port(port)
    url = f"http://127.0.0.1:{port}"
    proc = svc.spawn([part.format(port=port) for part in cmd], {k: v.format(port=port) for k, v in env.items()}, marker=svc.name)
    wait_healthy(url + health, timeout_s, alive=lambda: proc.poll() is None)
    svc.record(url=url)
    return {"url": url, "started": True}


def prefect_up(port: int = PREFECT_PORT, timeout_s: float = 120) -> dict[str, Any]:
    cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", "{port}"]
    result = _start_http(prefect_service(), port, cmd, prefect_env(), "/api/health", timeout_s)
    return {**result, "api_url": f"{result['url']}/api"}


def mlflow_up(port: int = MLFLOW_PORT, timeout_s: float = 120) -> dict[str, Any]:
    store = mlflow_tracking_uri()
    if not store.startswith("sqlite"):
        return {"url": store, "started": False, "note": "MLFLOW_TRACKING_URI points at an existing server"}
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", store, "--default-artifact-root",
           Path(mlflow_artifact_root()).as_uri(), "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]
    return _start_http(mlflow_service(), port, cmd, {}, "/health", timeout_s)


def receiver_up(prefect_api: str, port: int = RECEIVER_PORT, timeout_s: float = 60) -> dict[str, Any]:
    """The webhook receiver (`rmflow receiver`), emitting to `prefect_api`; the shared secret
    reaches it through its own file or the environment, never its command line."""
    cmd = [_bin("rmflow"), "receiver", "--host", "127.0.0.1", "--port", "{port}"]
    return _start_http(receiver_service(), port, cmd, {"PREFECT_API_URL": prefect_api}, "/health", timeout_s)


def deployments_up(prefect_api: str, params_file: Path, policy: RetrainPolicy, interval_s: int,
                   port: int = RUNNER_PORT, timeout_s: float = 120) -> dict[str, Any]:
    """`rmflow serve` in the background: registers the deployments (and the labels-ready trigger)
    and runs their flow runs. Healthy once the runner's own webserver answers /health, which it does
    only after the deployments are registered and while it keeps polling for runs. Its flow runs
    send heartbeats every HEARTBEAT_S, which the zombie automation watches."""
    cmd = [_bin("rmflow"), "serve", "--params", str(params_file), "--interval", str(interval_s),
           *[arg for name, value in policy.model_dump().items() for arg in (f"--{name.replace('_', '-')}", str(value))]]
    env = {"PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_SERVER_ENABLE": "true", "PREFECT_RUNNER_SERVER_HOST": "127.0.0.1",
           "PREFECT_RUNNER_SERVER_PORT": "{port}", "PREFECT_RUNNER_POLL_FREQUENCY": "5",
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    return _start_http(deployments_service(), port, cmd, env, "/health", timeout_s)


def up(label_studio: bool = True, serve: dict[str, Any] | None = None) -> dict[str, Any]:
    """Starts what is not running yet. With `serve` (the keyword arguments of `serve_settings`),
    also the receiver (watching the project with its retrain rule), the project's webhook to it and
    the deployments."""
    out = {"prefect": prefect_up(), "mlflow": mlflow_up()}
    if label_studio:
        out["labelstudio"] = labelstudio.up()
    if serve is not None:
        api = out["prefect"]["api_url"]
        settings = serve_settings(**serve)
        if settings["watches_changed"]:  # the receiver reads what it watches when it starts
            receiver_service().stop()
        out["receiver"] = receiver_up(api)
        if settings["changed"]:  # served with other settings: the deployments re-register with these
            deployments_service().stop()
        if serve.get("webhook", True) and (label_studio or os.environ.get("LABEL_STUDIO_URL")):
            out["webhook"] = register_webhook(settings["params"]["project"], serve.get("webhook_url") or out["receiver"]["url"])
        out["deployments"] = deployments_up(api, settings["file"], settings["policy"], settings["interval_s"])
    return out


def serve_settings(params: dict[str, Any], policy: RetrainPolicy | dict[str, Any] | None = None,
                   interval_s: int = SENSOR_INTERVAL_S, **_: Any) -> dict[str, Any]:
    """Writes the deployments' default parameters (PipelineParams as JSON, validated by the caller)
    where the serve process reads them, and the project's retrain rule where the receiver reads it."""
    from rmflow.infra.receiver import ProjectWatch, read_watches, write_watches

    checked = dict(params)
    policy = RetrainPolicy.model_validate(policy or {})
    settings = {"params": checked, "policy": policy.model_dump(mode="json"), "interval_s": interval_s}
    path = deployments_service().home / "settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=1, sort_keys=True)
    changed = not path.is_file() or path.read_text() != text
    path.write_text(text)
    params_file = path.with_name("params.json")
    params_file.write_text(json.dumps(checked, indent=1))
    # one watched project: the deployments serve one project's parameters, and a labels-ready event
    # for another project would train this one
    watch = ProjectWatch(project=checked["project"], data_root=str(dataset_root(checked["project"], checked.get("data_root"))), policy=policy)
    watches_changed = read_watches() != {watch.project: watch}
    if watches_changed:
        write_watches([watch])
    return {**settings, "policy": policy, "file": params_file, "changed": changed, "watches_changed": watches_changed}


def register_webhook(project: str, receiver_url: str) -> dict[str, Any]:
    """Project setup: the Label Studio project (created if missing) posts its annotations to the receiver."""
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra.receiver import HOOK_PATH, webhook_secret

    ls = lst.connect()
    project_id = lst.ensure_project(ls, project)
    url = receiver_url.rstrip("/") + HOOK_PATH
    return {"project": project, "project_id": project_id, "url": url,
            "id": lst.ensure_webhook(ls, project_id, url, webhook_secret())}


SERVICES = ("deployments", "receiver", "prefect", "mlflow", "labelstudio")


def _services() -> dict[str, ManagedService]:
    return {"deployments": deployments_service(), "receiver": receiver_service(), "prefect": prefect_service(),
            "mlflow": mlflow_service(), "labelstudio": labelstudio.service()}


def down(only: tuple[str, ...] = SERVICES) -> dict[str, bool]:
    """Stops the services rmflow started, the deployments first (their runs need the servers)."""
    services = _services()
    return {name: services[name].stop() for name in SERVICES if name in only}


HEALTH = {"deployments": "/health", "receiver": "/health", "prefect": "/api/health", "mlflow": "/health", "labelstudio": "/health"}


def status() -> dict[str, Any]:
    """Each service: running (our process alive), url, pid, healthy (its health endpoint answers)."""
    import urllib.request

    out = {}
    for name, svc in _services().items():
        state = svc.state()
        healthy = False
        if state and state.get("url"):
            try:
                with urllib.request.urlopen(state["url"] + HEALTH[name], timeout=3) as resp:
                    healthy = resp.status == 200
            except OSError:
                healthy = False
        out[name] = {"running": bool(state), "url": state.get("url") if state else None,
                     "pid": state.get("pid") if state else None, "healthy": healthy}
    return out


def prefect_api_url() -> str | None:
    """PREFECT_API_URL, else the API of the Prefect server `rmflow up` started, else None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    state = prefect_service().state()
    return f"{state['url']}/api" if state and state.get("url") else None


@contextmanager
def using_prefect(api_url: str | None) -> Iterator[None]:
    """Runs the block against `api_url`. Prefect caches its settings on first use, so setting the
    environment variable later has no effect; its own settings context does."""
    if not api_url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield
