"""The deployments rmflow serves (`rmflow serve`, run in the background by `rmflow up`):

- `reward-pipeline`: runnable from the UI (its run form is `PipelineParams`), started by an event
  trigger when `min_new_labels` annotations of the project arrive within `window_s` (Label Studio
  webhook → `infra/receiver.py` → Prefect event). At most one run at a time: a run created while
  one is in flight is cancelled (CANCEL_NEW), not queued, so two runs never train the same labels;
  labels that arrived meanwhile are picked up by the label sensor or the next trigger.
- `label-sensor`: polling, for a Label Studio that cannot reach the receiver; every `interval_s`
  seconds (0: no schedule, run it by hand) it starts the pipeline when enough labels are new.
- `request-reannotation`: active labelling, from the UI with a strength dataset folder.

Served deployments (one `serve` process) rather than a work pool and worker: nothing to provision,
the runner starts each flow run as its own subprocess, and the whole service is one process that
`rmflow up/down/status` manage like the servers.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from rmcore.names import ANNOTATION_EVENT, MIN_NEW_LABELS, SENSOR_INTERVAL_S, TRIGGER_WINDOW_S, project_resource
from rmflow.flows.pipeline import PipelineParams, request_reannotation, reward_pipeline
from rmflow.flows.sensor import label_sensor


def label_trigger(project: str, min_new_labels: int, window_s: int) -> DeploymentEventTrigger:
    """Fires once per `min_new_labels` annotation events of `project` within `window_s`."""
    return DeploymentEventTrigger(
        name=f"{min_new_labels} new labels in {project}",
        expect={f"{ANNOTATION_EVENT}.created", f"{ANNOTATION_EVENT}.updated"},
        match={"prefect.resource.id": project_resource("*"), "prefect.resource.name": project},
        posture="Reactive", threshold=min_new_labels, within=timedelta(seconds=window_s))


def deployments(params: PipelineParams, min_new_labels: int = MIN_NEW_LABELS, interval_s: int = SENSOR_INTERVAL_S,
                window_s: int = TRIGGER_WINDOW_S) -> list[RunnerDeployment]:
    defaults = {"params": params.model_dump(mode="json")}
    pipeline = reward_pipeline.to_deployment(
        name="reward-pipeline", parameters=defaults, tags=["rmflow"],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        triggers=[label_trigger(params.project, min_new_labels, window_s)],
        description=f"Train, register, gate and promote {params.model_name} from the labels of {params.project}.")
    sensor = label_sensor.to_deployment(
        name="label-sensor", interval=interval_s or None, tags=["rmflow"],
        parameters={**defaults, "min_new_labels": min_new_labels},
        description=f"Starts reward-pipeline when {min_new_labels} annotations are newer than its watermark.")
    reannotation = request_reannotation.to_deployment(
        name="request-reannotation", tags=["rmflow"], parameters={"project": params.project, "max_tasks": params.reannotate_max},
        description="Send the strength ensemble's most doubtful pairs back to Label Studio.")
    return [pipeline, sensor, reannotation]


def serve_deployments(params: PipelineParams, min_new_labels: int = MIN_NEW_LABELS, interval_s: int = SENSOR_INTERVAL_S,
                      window_s: int = TRIGGER_WINDOW_S) -> None:
    serve(*deployments(params, min_new_labels, interval_s, window_s))
