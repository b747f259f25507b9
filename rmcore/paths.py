"""Where local state lives and which services to talk to. Environment variables override the
embedded defaults: RMFLOW_HOME, MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS."""
from __future__ import annotations

import os
from pathlib import Path


def rmflow_home() -> Path:
    """RMFLOW_HOME (default ~/.rmflow), made absolute: services get paths under it on their command
    lines and as file URIs, which a relative path cannot be."""
    home = Path(os.path.abspath(Path(os.environ.get("RMFLOW_HOME", Path.home() / ".rmflow")).expanduser()))
    home.mkdir(parents=True, exist_ok=True)
    return home


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else an embedded SQLite store (the model registry needs a database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{rmflow_home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return str(rmflow_home() / "mlartifacts")


def dataset_root(project: str, data_root: str | None = None) -> Path:
    """Where a project's snapshots, dataset versions and label watermark live: `data_root` when
    given, else RMFLOW_HOME/datasets/<project>."""
    return Path(data_root) if data_root else rmflow_home() / "datasets" / project
