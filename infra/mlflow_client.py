"""Pointing at MLflow (MLFLOW_TRACKING_URI, else the SQLite store under RMFLOW_HOME) and the
registry look-ups every stage shares. Model names are checked before they enter a search filter."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from rmcore.config import RunConfig
from rmcore.dataset import read_manifest
from rmcore.names import CHAMPION, EXPERIMENT, check_name
from rmcore.paths import mlflow_artifact_root, mlflow_tracking_uri


def configure_mlflow() -> MlflowClient:
    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        location = None if uri.startswith("http") else Path(mlflow_artifact_root()).as_uri()
        client.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return client


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model `name` (none when it is not registered)."""
    check_name(name)
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        return []
    return list(client.search_model_versions(f"name='{name}'"))


def alias_version(client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    try:
        return str(client.get_model_version_by_alias(check_name(name), alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def log_run(cfg: RunConfig, summary: dict[str, Any], data_dir: Path, tags: dict[str, str], run_name: str) -> str:
    """One MLflow run for one trained model: the config it trained with as params, its metrics and
    history, the dataset as an input. Returns the run id (the run is closed)."""
    configure_mlflow()
    manifest = read_manifest(data_dir)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(cfg.flat_params())
        mlflow.set_tags({"dataset_version": manifest["version"], "git_commit": git_commit(), **tags})
        for point in summary.get("history", []):
            mlflow.log_metrics({k: v for k, v in point.items() if isinstance(v, (int, float)) and k != "step"}, step=point["step"])
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        counts = pd.DataFrame({k: manifest[k] for k in ("pairs", "ties", "groups", "prompts")}, index=[0])
        dataset = mlflow.data.from_pandas(counts, source=str(Path(data_dir).resolve()), name=f"preferences-{manifest['version']}",
                                          digest=manifest["version"])
        mlflow.log_input(dataset, context="training")
        return run.info.run_id
