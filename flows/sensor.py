"""Retraining by polling, the backstop for webhooks that never arrive: a flow on an interval
schedule counts the Label Studio annotations the pipeline's watermark has not consumed and applies
the same retrain rule as the webhook receiver (`rmcore.retrain`)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment

from rmcore.names import PIPELINE_DEPLOYMENT
from rmcore.retrain import RetrainPolicy, retrain_reason
from rmcore.watermark import read_watermark
from rmflow.flows.pipeline import PipelineParams, data_root, reward_pipeline
from rmflow.infra.pipeline_runs import PipelineActivity, pipeline_activity
from rmflow.tasks.collect import new_annotations_task

pipeline_activity_task = task(pipeline_activity, name="pipeline-activity", retries=2, retry_delay_seconds=[2, 5])


@flow(name="label-sensor")
def label_sensor(params: PipelineParams = PipelineParams(), policy: RetrainPolicy = RetrainPolicy(),
                 use_deployment: bool = True) -> dict[str, Any]:
    """Starts the pipeline when the retrain rule says so. On a served stack it starts a
    `reward-pipeline` deployment run unless one is in flight (it will consume these labels);
    `use_deployment=False` runs it as a subflow (tests)."""
    logger = get_run_logger()
    # runs first, watermark second: a run advances the watermark before it leaves the in-flight
    # states, so a run that ended since is never missed with its labels still counted as new
    activity = pipeline_activity_task() if use_deployment else PipelineActivity([], None)
    watermark = read_watermark(data_root(params))
    pending = new_annotations_task(params.project, watermark)
    reason = retrain_reason(policy, pending, datetime.now(timezone.utc), bool(activity.in_flight), activity.last_start)
    summary = {"triggered": reason is not None, "new_annotations": len(pending), "reason": reason}
    if reason is None:
        logger.info("%d new annotations since %s (rule: %d%s); not starting a run", len(pending), watermark.at,
                    policy.min_new_labels, f"; in flight: {', '.join(activity.in_flight)}" if activity.in_flight else "")
        return {**summary, "in_flight": activity.in_flight}
    if use_deployment:
        logger.info("%d new annotations since %s (%s): starting the pipeline", len(pending), watermark.at, reason)
        # start it and return: the pipeline advances the watermark itself when it succeeds, and the
        # next sensor runs see it in flight until then
        run = run_deployment(PIPELINE_DEPLOYMENT, parameters={"params": params.model_dump(mode="json")}, timeout=0)
        return {**summary, "pipeline_run": str(run.id)}
    logger.info("%d new annotations since %s (%s): running the pipeline", len(pending), watermark.at, reason)
    return {**summary, "pipeline": reward_pipeline(params)}
