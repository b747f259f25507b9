"""The local stack: Prefect server (SQLite), MLflow server (the same SQLite store rmflow writes, plus
local artifacts) and Label Studio, all bound to 127.0.0.1, state and logs under RMFLOW_HOME.

To use existing services instead, set PREFECT_API_URL, MLFLOW_TRACKING_URI, LABEL_STUDIO_URL +
LABEL_STUDIO_API_KEY and RAY_ADDRESS: flows and CLI commands then talk to those. `up` still starts
the local Prefect server and Label Studio; the MLflow server is skipped when MLFLOW_TRACKING_URI
names a server.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rmcore.paths import mlflow_artifact_root, mlflow_tracking_uri, rmflow_home
from rmflow.infra import labelstudio
from rmflow.infra.process import ManagedService, free_port, wait_healthy

PREFECT_PORT, MLFLOW_PORT = 4200, 5000


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the rmflow venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def prefect_service() -> ManagedService:
    return ManagedService("prefect", rmflow_home() / "prefect")


def mlflow_service() -> ManagedService:
    return ManagedService("mlflow", rmflow_home() / "mlflow")


def prefect_env() -> dict[str, str]:
    """The Prefect server's environment; `{port}` is the port it really gets. The UI calls the API
    at PREFECT_UI_API_URL, which must follow the server when 4200 is taken."""
    return {"PREFECT_HOME": str(rmflow_home() / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": "http://127.0.0.1:{port}/api",
            # concurrency-slot leases on disk, not in memory: after a server restart a dead run's slot
            # still expires instead of staying taken for good (the pipeline takes one per model)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}


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


def up(label_studio: bool = True) -> dict[str, Any]:
    out = {"prefect": prefect_up(), "mlflow": mlflow_up()}
    if label_studio:
        out["labelstudio"] = labelstudio.up()
    return out


def down() -> dict[str, bool]:
    return {"prefect": prefect_service().stop(), "mlflow": mlflow_service().stop(), "labelstudio": labelstudio.down()}


def status() -> dict[str, Any]:
    out = {}
    for name, svc in (("prefect", prefect_service()), ("mlflow", mlflow_service())):
        state = svc.state()
        out[name] = {"running": bool(state), "url": state.get("url") if state else None}
    out["labelstudio"] = labelstudio.status()
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
