"""Retraining as labels arrive, by polling: a flow on an interval schedule counts Label Studio
annotations newer than the pipeline's watermark and starts the pipeline when at least N arrived."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from rmcore.names import MIN_NEW_LABELS, PIPELINE_DEPLOYMENT
from rmcore.watermark import read_watermark
from rmflow.flows.pipeline import PipelineParams, data_root, reward_pipeline
from rmflow.tasks.collect import count_task

IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


@task(name="pipeline-runs-in-flight", retries=2, retry_delay_seconds=[2, 5])
def pipeline_runs_in_flight(deployment: str = PIPELINE_DEPLOYMENT) -> list[str]:
    """Runs of the pipeline deployment that are scheduled, pending or running: while one is, the
    labels it will consume must not start another."""
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                     flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))))
    return [str(r.id) for r in runs]


@flow(name="label-sensor")
def label_sensor(params: PipelineParams = PipelineParams(), min_new_labels: int = MIN_NEW_LABELS, use_deployment: bool = True) -> dict[str, Any]:
    """Starts the pipeline when ≥ `min_new_labels` annotations arrived since its watermark. On a
    served stack it starts a `reward-pipeline` deployment run, unless one is already scheduled or
    running (it will consume these labels); `use_deployment=False` runs it as a subflow (tests)."""
    logger = get_run_logger()
    watermark = read_watermark(data_root(params))
    new = count_task(params.project, watermark)
    if new < min_new_labels:
        logger.info("%d new annotations since %s; waiting for %d", new, watermark, min_new_labels)
        return {"triggered": False, "new_annotations": new}
    if use_deployment:
        busy = pipeline_runs_in_flight()
        if busy:
            logger.info("%d new annotations, but pipeline run(s) %s are in flight: not starting another", new, ", ".join(busy))
            return {"triggered": False, "new_annotations": new, "in_flight": busy}
        logger.info("%d new annotations since %s: starting the pipeline", new, watermark)
        # start it and return: the pipeline advances the watermark itself when it succeeds, and the
        # next sensor runs see it in flight until then
        run = run_deployment(PIPELINE_DEPLOYMENT, parameters={"params": params.model_dump(mode="json")}, timeout=0)
        return {"triggered": True, "new_annotations": new, "pipeline_run": str(run.id)}
    logger.info("%d new annotations since %s: running the pipeline", new, watermark)
    return {"triggered": True, "new_annotations": new, "pipeline": reward_pipeline(params)}
