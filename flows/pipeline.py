"""The reward-model pipeline as Prefect flows: collect → build dataset → train (Ray) → evaluate and
promote (MLflow) → with a strength ensemble, send doubtful pairs back for re-annotation. Tasks pass
URIs (snapshot file, dataset folder, model folder, `models:/`), never objects, and network tasks
retry with backoff.

The label watermark lives in the Prefect Variable `rmflow-watermark-<project>` and advances only
at the end of a successful pipeline run, so a failed run skips no label.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.variables import Variable
from pydantic import BaseModel, Field

from rmcore.config import GateConfig, RunConfig
from rmcore.paths import mlflow_tracking_uri, rmflow_home
from rmcore.records import content_hash


class PipelineParams(BaseModel):
    """The pipeline's one parameter model: Prefect renders it as the run form."""

    project: str = Field("rmflow-rankings", description="Label Studio project title.")
    model_name: str = Field("rmflow-reward", description="Registered model name in MLflow.")
    data_root: str | None = Field(None, description="Where snapshots and dataset versions go (default RMFLOW_HOME/datasets).")
    run: RunConfig = Field(default_factory=RunConfig, description="Training run: backbone, loss, optimiser, Ray workers.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion thresholds.")
    reannotate_max: int = Field(50, ge=0, description="Active labelling: with a strength ensemble (run.strength.ensemble "
                                "> 0), send at most this many of the most doubtful pairs back to Label Studio for "
                                "re-annotation after training (0 = off). Their labels supersede the old ones.")


def watermark_variable(project: str) -> str:
    return "rmflow-watermark-" + re.sub(r"[^a-z0-9_-]", "-", project.lower())


def data_root(params: PipelineParams) -> Path:
    return Path(params.data_root) if params.data_root else rmflow_home() / "datasets" / params.project


@task(retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
def pull_labels(project: str, root: str) -> dict[str, Any]:
    from tasks.labelstudio import pull_snapshot

    return pull_snapshot(project, Path(root))


@task
def dataset_from_labels(snapshot: str, root: str, watermark: str | None) -> dict[str, Any]:
    from tasks.labelstudio import dataset_from_snapshot

    return dataset_from_snapshot(Path(snapshot), Path(root), watermark)


@task(tags=["rmflow-training"])
def train_model(run: RunConfig, dataset: str, watermark: str | None) -> dict[str, Any]:
    from tasks.registry import log_training_run
    from tasks.train import run_training

    model_dir = Path(dataset).parent / "models" / f"{Path(dataset).name}-{content_hash(run.model_dump(mode='json'))[:8]}"
    summary = run_training(run, Path(dataset), model_dir, track_members=True)
    trained_on = summary.get("data_dir", dataset)  # the strength-annotated version when an ensemble ran
    run_id = log_training_run(run, summary, Path(trained_on), model_dir, watermark)
    strength = {k: v for k, v in summary.get("strength", {}).items() if k != "report_dir"}
    return {"model_dir": str(model_dir), "run_id": run_id, "val_accuracy": summary["val_accuracy"], "trained_on": str(trained_on),
            "pairs_trained": summary["pairs_trained"], "workers": summary["workers"], "restarts": summary["restarts"],
            **({"strength": strength} if strength else {})}


@task(retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
def send_for_reannotation(project: str, strength_dataset: str, max_tasks: int) -> dict[str, Any]:
    from tasks.labelstudio import request_reannotation

    return request_reannotation(project, Path(strength_dataset), max_tasks)


@task(retries=2, retry_delay_seconds=[5, 15])
def promote_model(model_dir: str, name: str, dataset: str, gate: GateConfig) -> dict[str, Any]:
    from tasks.registry import promote

    return promote(Path(model_dir), name, Path(dataset), gate)


@task
def find_trained_version(name: str, label_dataset_version: str, run: RunConfig) -> str | None:
    from tasks.registry import find_version

    return find_version(name, label_dataset_version, content_hash(run.model_dump(mode="json")))


@flow(name="collect-labels")
def collect_labels(project: str, root: str) -> dict[str, Any]:
    return pull_labels(project, root)


@flow(name="build-dataset")
def build_dataset(snapshot: str, root: str, watermark: str | None = None) -> dict[str, Any]:
    return dataset_from_labels(snapshot, root, watermark)


@flow(name="train-reward-model")
def train_reward_model(run: RunConfig, dataset: str, watermark: str | None = None) -> dict[str, Any]:
    return train_model(run, dataset, watermark)


@flow(name="evaluate-and-promote")
def evaluate_and_promote(model_dir: str, name: str, dataset: str, gate: GateConfig) -> dict[str, Any]:
    result = promote_model(model_dir, name, dataset, gate)
    create_markdown_artifact(result.pop("report_markdown"), key="evaluation-report", description=f"{name} v{result['version']}")
    create_table_artifact([{**c, "value": round(c["value"], 4)} for c in result["gate"]], key="gate",
                          description="passed" if result["passed"] else "; ".join(result["reasons"]))
    if mlflow_tracking_uri().startswith("http"):
        create_link_artifact(f"{mlflow_tracking_uri().rstrip('/')}/#/models/{name}/versions/{result['version']}",
                             link_text=f"{name} v{result['version']} in MLflow", key="mlflow-model")
    return result


@flow(name="request-reannotation")
def request_reannotation(project: str, strength_dataset: str, max_tasks: int = 50) -> dict[str, Any]:
    """Active labelling: the strength ensemble's most doubtful pairs go back to annotators."""
    return send_for_reannotation(project, strength_dataset, max_tasks)


@flow(name="reward-pipeline", log_prints=True)
def reward_pipeline(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """collect → build dataset → train on Ray → register, evaluate, gate, promote."""
    logger = get_run_logger()
    root = str(data_root(params))
    watermark = Variable.get(watermark_variable(params.project), default=None)
    snapshot = collect_labels(params.project, root)
    labels = build_dataset(snapshot["snapshot"], root, watermark)
    if not labels["dataset"]:
        raise ValueError(f"project {params.project!r} has no usable rankings yet")
    existing = find_trained_version(params.model_name, labels["version"], params.run)
    if existing:
        logger.info("dataset %s was already trained with this config (model version %s): nothing to do", labels["version"], existing)
        Variable.set(watermark_variable(params.project), labels["watermark"], overwrite=True)
        return {"skipped": True, "version": existing, "dataset_version": labels["version"], **_labels_summary(labels)}
    trained = train_reward_model(params.run, labels["dataset"], labels["watermark"])
    # the strength-annotated version has the same held-out labels, plus strengths for the report
    promoted = evaluate_and_promote(trained["model_dir"], params.model_name, trained["trained_on"], params.gate)
    reannotation = {}
    if "strength" in trained and params.reannotate_max:
        reannotation = request_reannotation(params.project, trained["trained_on"], params.reannotate_max)
    Variable.set(watermark_variable(params.project), labels["watermark"], overwrite=True)
    return {"skipped": False, "dataset_version": labels["version"], **_labels_summary(labels), **trained,
            **{k: promoted[k] for k in ("version", "passed", "reasons", "champion_version", "metrics")},
            "gate_checks": [c["check"] for c in promoted["gate"]], **({"reannotation": reannotation} if reannotation else {})}


def _labels_summary(labels: dict[str, Any]) -> dict[str, Any]:
    return {k: labels[k] for k in ("new_rankings", "total_rankings", "quarantined", "watermark")}
