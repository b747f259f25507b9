"""The reward-model pipeline as one Prefect flow. Each stage is one task run in the UI, with its
own retries (network stages retry with backoff); stages hand each other URIs, never objects:

  collect → dataset → [strength ensemble] → [publish to the team's bucket] → train → register →
  evaluate → gate + promote → [re-annotate]

The label watermark (`rmcore.watermark`, a file in the dataset root) advances only at the end of
a successful run, so a failed run skips no label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel, Field, field_validator

from rmcore.config import GateConfig, RunConfig
from rmcore.contracts import EvaluationResult, LabelDataset, PromotionResult, TrainedModel
from rmcore.names import DEFAULT_MODEL, DEFAULT_PROJECT, check_name
from rmcore.paths import dataset_root, mlflow_tracking_uri
from rmcore.records import content_hash
from rmcore.sweep import PipelineTune
from rmcore.watermark import advance_watermark, read_watermark
from rmflow.infra.team import team_storage
from rmflow.tasks.collect import collect_task
from rmflow.tasks.dataset import dataset_task, publish_task
from rmflow.tasks.evaluate import evaluate_task
from rmflow.tasks.promote import promote_task
from rmflow.tasks.reannotate import reannotate_task
from rmflow.tasks.register import PENDING, find_version_task, register_task
from rmflow.tasks.strength import strength_task
from rmflow.tasks.train import default_model_dir, train_task
from rmflow.tasks.tune import tune_task


class PipelineParams(BaseModel):
    """The pipeline's one parameter model: Prefect renders it as the run form."""

    project: str = Field(DEFAULT_PROJECT, description="Label Studio project title.")
    model_name: str = Field(DEFAULT_MODEL, description="Registered model name in MLflow.")
    data_root: str | None = Field(None, description="Where snapshots and dataset versions go (default RMFLOW_HOME/datasets/<project>).")
    run: RunConfig = Field(default_factory=RunConfig, description="Training run: backbone, loss, optimiser, Ray workers.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion thresholds.")
    tune: PipelineTune = Field(default_factory=PipelineTune, description="Hyper-parameter sweep on Ray Tune before training "
                               "(off by default): trials, time budget, re-tune every R runs.")
    reannotate_max: int = Field(50, ge=0, description="Active labelling: with a strength ensemble (run.strength.ensemble "
                                "> 0), send at most this many of the most doubtful train pairs back to Label Studio for "
                                "re-annotation after training (0 = off). Their labels supersede the old ones.")

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)


def data_root(params: PipelineParams) -> Path:
    return dataset_root(params.project, params.data_root)


# The concurrency slot's lease. Prefect renews it every 3/4 of the lease (90 s here) and retries a
# failed renewal: a Prefect outage shorter than the 30 s the lease has left (a server restart here)
# is ridden out. A renewal that fails for good ends the run (raise_on_lease_renewal_failure): with
# the lease lapsed the slot is free, and a second run could train the same model beside this one.
# A crashed run's slot frees itself after LEASE_S, about when the zombie automation (90 s without a
# heartbeat) has marked it Crashed: a longer lease would hold the next labels' run back that long.
LEASE_S = 120


def pipeline_lock(model_name: str) -> str:
    """The name of a Prefect global concurrency limit of 1 per registered model, created if
    missing: two pipeline runs for one model (two sensor triggers, a UI click during a scheduled
    run) take turns, so the second finds the labels already trained and gated instead of training
    and registering them again."""
    name = f"rmflow-pipeline-{model_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # noqa: BLE001 — missing: create it (a concurrent creator may win; then it exists)
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # noqa: BLE001
                client.read_global_concurrency_limit_by_name(name)
    return name


@flow(name="reward-pipeline", log_prints=True)
def reward_pipeline(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """collect → dataset → [strength] → [publish to the team's bucket] → train on Ray → register →
    evaluate → gate + promote → [re-annotate]."""
    with concurrency(pipeline_lock(params.model_name), occupy=1, strict=True, lease_duration=LEASE_S,
                     raise_on_lease_renewal_failure=True):
        return _stages(params)


def _stages(params: PipelineParams) -> dict[str, Any]:
    logger = get_run_logger()
    root = data_root(params)
    watermark = read_watermark(root)
    snapshot = collect_task(params.project, root)
    labels = dataset_task(snapshot, root, watermark)
    create_table_artifact([{"what": k, "value": str(v)} for k, v in _labels_summary(labels).items()], key="labels",
                          description=f"labels of {params.project} in this run (dataset {labels.version})")
    if labels.dataset is None:
        raise ValueError(f"project {params.project!r} has no usable rankings yet")
    config_hash = content_hash(params.run.model_dump(mode="json") | ({"tune": params.tune.model_dump(mode="json")}
                                                                      if params.tune.enabled else {}))
    registered = find_version_task(params.model_name, labels.version, config_hash)
    if registered is not None and registered.status != PENDING:
        logger.info("dataset %s was already trained with this config and gated (version %s, %s): nothing to do",
                    labels.version, registered.version, registered.status)
        advance_watermark(root, labels.watermark)
        return {"skipped": True, "version": registered.version, "dataset_version": labels.version, **_labels_summary(labels)}

    trained = strength = tuned = uri = None
    eval_data = labels.dataset
    if registered is None:
        run, data = params.run, labels.dataset
        if params.tune.enabled:  # trials train without the strength ensemble; the tuned run keeps the base's
            base = run.model_copy(update={"strength": run.strength.model_copy(update={"ensemble": 0})})
            tuned = tune_task(base, data, params.tune.sweep, root / "tune" / params.model_name, params.tune.retune_every)
            run = tuned.run.model_copy(update={"strength": params.run.strength})
            logger.info("tune: %s config %s (best trial's accuracy on its selection set %s)", "tuned" if tuned.tuned else "reused",
                        tuned.config_file, tuned.best_val_accuracy)
        # with the team's bucket each version is kept there, and the ensemble's members and Ray
        # Train's workers read it there (on any node); in-process training, register and evaluate
        # read this machine's copy of it
        bucket = team_storage() is not None
        uri = publish_task(str(data), params.project, snapshot.snapshot) if bucket else None
        if run.strength.ensemble:
            strength = strength_task(run, data, track=True, source=uri)
            run, data = strength.run, strength.dataset  # what MLflow logs is what was trained
            uri = publish_task(str(data), params.project) if bucket else None
        trained = train_task(run, uri if uri and run.scale.on_ray_train else data, default_model_dir(Path(data), run))
        create_table_artifact([{"what": k, "value": str(v)} for k, v in _training_summary(trained, uri).items()], key="training",
                              description=f"where and how {params.model_name} trained")
        trained = trained.model_copy(update={"dataset": str(data)})
        registered = register_task(params.model_name, trained.model_dir, trained, labels.watermark.at, config_hash)
        eval_data = trained.dataset  # a strength version has the same held-out labels, plus strengths for the report
    else:
        logger.info("version %s of %s was registered but never gated: evaluating and gating it now", registered.version, params.model_name)
    evaluation = evaluate_task(registered, eval_data)
    promoted = promote_task(evaluation, params.gate)
    _publish(evaluation, promoted)
    reannotation = {}
    if strength is not None and params.reannotate_max:
        reannotation = reannotate_task(params.project, strength.dataset, params.reannotate_max)
    advance_watermark(root, labels.watermark)
    out: dict[str, Any] = {"skipped": False, "dataset_version": labels.version, **_labels_summary(labels)}
    if trained is not None:
        summary = trained.summary
        out |= {"model_dir": trained.model_dir, "trained_on": trained.dataset, "val_accuracy": summary["val_accuracy"],
                "pairs_trained": summary["pairs_trained"], **_training_summary(trained, uri)}
    if strength is not None:
        out["strength"] = strength.summary
    if tuned is not None:
        out["tune"] = tuned.model_dump(mode="json", include={"config_file", "tuned", "parent_run_id", "best_val_accuracy", "best_val_loss",
                                                              "selected_by", "selection_pairs"})
    out |= {"run_id": registered.run_id, "version": promoted.version, "passed": promoted.passed, "reasons": promoted.reasons,
            "champion_version": promoted.champion_version, "metrics": promoted.metrics,
            "gate_checks": [c["check"] for c in promoted.gate]}
    if reannotation:
        out["reannotation"] = reannotation
    return out


def _publish(evaluation: EvaluationResult, promoted: PromotionResult) -> None:
    """The evaluation report, the gate table and a link to the version, as Prefect artifacts."""
    name, version = promoted.name, promoted.version
    create_markdown_artifact((Path(evaluation.eval_dir) / "evaluation_report.md").read_text(), key="evaluation-report",
                             description=f"{name} v{version}")
    create_table_artifact([{**c, "value": round(c["value"], 4)} for c in promoted.gate], key="gate",
                          description="passed" if promoted.passed else "; ".join(promoted.reasons))
    if mlflow_tracking_uri().startswith("http"):
        create_link_artifact(f"{mlflow_tracking_uri().rstrip('/')}/#/models/{name}/versions/{version}",
                             link_text=f"{name} v{version} in MLflow", key="mlflow-model")


@flow(name="request-reannotation")
def request_reannotation(project: str, strength_dataset: str, max_tasks: int = 50) -> dict[str, Any]:
    """Active labelling: the strength ensemble's most doubtful train pairs go back to annotators."""
    return reannotate_task(project, strength_dataset, max_tasks)


def _training_summary(trained: TrainedModel, uri: str | None) -> dict[str, Any]:
    """Where the run trained: the workers read the version from `uri` (the team's bucket) or this
    machine's disk; how many workers on how many nodes; the Ray Train run (checkpoints) if any."""
    summary = trained.summary
    return {"read_from": uri or trained.dataset, "workers": summary["workers"],
            "worker_nodes": len(set(summary.get("worker_nodes") or [None])), "restarts": summary["restarts"],
            "ray_run": summary.get("ray_run")}


def _labels_summary(labels: LabelDataset) -> dict[str, Any]:
    return {**labels.model_dump(include={"new_rankings", "total_rankings", "quarantined"}), "watermark": labels.watermark.at}
