"""Retraining as labels arrive: a flow on an interval schedule counts Label Studio annotations
newer than the pipeline's watermark and starts the pipeline when at least N arrived.

Open-source Prefect has no inbound webhooks; polling is the supported path (see
infra/README.md for the optional Label Studio webhook → receiver → `emit_event` route).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.variables import Variable

from flows.pipeline import PipelineParams, reward_pipeline, watermark_variable

PIPELINE_DEPLOYMENT = "reward-pipeline/reward-pipeline"


@task(retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
def count_new_annotations(project: str, watermark: str | None) -> int:
    from tasks.labelstudio import connect, ensure_project, pull_tasks

    ls = connect()
    count = 0
    for t in pull_tasks(ls, ensure_project(ls, project, 4)):
        for a in t.get("annotations") or []:
            stamp = a.get("updated_at") or a.get("created_at") or ""
            if not a.get("was_cancelled") and (watermark is None or stamp > watermark):
                count += 1
    return count


@flow(name="label-sensor")
def label_sensor(params: PipelineParams = PipelineParams(), min_new_labels: int = 20, use_deployment: bool = True) -> dict[str, Any]:
    """Starts the pipeline when ≥ `min_new_labels` annotations arrived since its watermark. On a
    served stack it runs the `reward-pipeline` deployment (whose concurrency limit of 1 keeps two
    trainings from overlapping); `use_deployment=False` runs it as a subflow (tests, the demo)."""
    logger = get_run_logger()
    watermark = Variable.get(watermark_variable(params.project), default=None)
    new = count_new_annotations(params.project, watermark)
    if new < min_new_labels:
        logger.info("%d new annotations since %s; waiting for %d", new, watermark, min_new_labels)
        return {"triggered": False, "new_annotations": new}
    logger.info("%d new annotations since %s: starting the pipeline", new, watermark)
    if use_deployment:
        run = run_deployment(PIPELINE_DEPLOYMENT, parameters={"params": params.model_dump(mode="json")})
        if not run.state.is_completed():
            raise RuntimeError(f"pipeline run {run.id} ended {run.state.type.value}; the watermark stays at {watermark}")
        result = run.state.result()
    else:
        result = reward_pipeline(params)
    return {"triggered": True, "new_annotations": new, "pipeline": result}
