"""Where local state lives and which services to talk to. Environment variables override the
embedded defaults: RMFLOW_HOME, MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS."""
from __future__ import annotations

import json
import os
from pathlib import Path

# written by `rmflow up --team`: the team MLflow server's URL, which clients use (see mlflow_tracking_uri)
TEAM_FILE = "team.json"


def rmflow_home() -> Path:
    """RMFLOW_HOME (default ~/.rmflow), made absolute: services get paths under it on their command
    lines and as file URIs, which a relative path cannot be."""
    home = Path(os.path.abspath(Path(os.environ.get("RMFLOW_HOME", Path.home() / ".rmflow")).expanduser()))
    home.mkdir(parents=True, exist_ok=True)
    return home


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the MLflow server `rmflow up --team` started (its URL in TEAM_FILE:
    its store is the team's PostgreSQL, so a client never falls back to SQLite), else the embedded
    SQLite store (the model registry needs a database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or team_mlflow_server() or embedded_mlflow_store()


def team_mlflow_server() -> str | None:
    """The URL of the MLflow server `rmflow up --team` started (RMFLOW_HOME's TEAM_FILE), if any."""
    try:
        return json.loads((rmflow_home() / TEAM_FILE).read_text())["mlflow_tracking_uri"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedded_mlflow_store() -> str:
    return f"sqlite:///{rmflow_home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return str(rmflow_home() / "mlartifacts")


def dataset_root(project: str, data_root: str | None = None) -> Path:
    """Where a project's snapshots, dataset versions and label watermark live: `data_root` when
    given, else RMFLOW_HOME/datasets/<project>."""
    return Path(data_root) if data_root else rmflow_home() / "datasets" / project
