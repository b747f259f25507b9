"""The deployments rmflow serves (`rmflow serve`, run in the background by `rmflow up`):

- `reward-pipeline`: runnable from the UI (its run form is `PipelineParams`), and started by an event
  trigger on `rmflow.labels.ready` (threshold 1): the webhook receiver emits that event once the
  project's retrain rule (`rmcore.retrain`: N new labels since the last successful run, at most one
  run per T, at least every D when any label waits) says so. At most one run at a time: a run
  created while one is in flight is cancelled (CANCEL_NEW), not queued; the labels it would have
  consumed count toward the next run.
- `label-sensor`: polling, the backstop for webhooks that never arrive (and the only path for a
  Label Studio that cannot reach the receiver); every `interval_s` seconds (0: no schedule) it
  applies the same rule and starts the pipeline.
- `request-reannotation`: active labelling, from the UI with a strength dataset folder.

Flow runs send heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set by `rmflow up`), and an
automation marks a run Crashed when they stop (Prefect's recipe for zombie runs): a run left
RUNNING by a killed runner, a reboot or an OOM kill then stops counting as in flight and frees the
deployment's concurrency slot, so the next labels retrain.

Served deployments (one `serve` process) rather than a work pool and worker: nothing to provision,
the runner starts each flow run as its own subprocess, and the whole service is one process that
`rmflow up/down/status` manage like the servers.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from rmcore.names import HEARTBEAT_S, LABELS_READY_EVENT, SENSOR_INTERVAL_S, project_resource
from rmcore.retrain import RetrainPolicy
from rmflow.flows.pipeline import PipelineParams, request_reannotation, reward_pipeline
from rmflow.flows.sensor import label_sensor

ZOMBIE_AFTER_S = 3 * HEARTBEAT_S
ZOMBIE_AUTOMATION = "rmflow: crash zombie flow runs"
STUCK_PENDING_S = 300  # a flow process that has not started running by then never will
STUCK_PENDING_AUTOMATION = "rmflow: crash flow runs stuck in Pending"


def labels_ready_trigger(project: str, policy: RetrainPolicy) -> DeploymentEventTrigger:
    """One run per `rmflow.labels.ready` event of `project` (the receiver decides when)."""
    return DeploymentEventTrigger(
        name=f"labels ready in {project} ({policy.min_new_labels} new since the last training)",
        expect={LABELS_READY_EVENT}, match={"prefect.resource.id": project_resource(project), "prefect.resource.name": project},
        posture="Reactive", threshold=1, within=timedelta(0))


def deployments(params: PipelineParams, policy: RetrainPolicy, interval_s: int = SENSOR_INTERVAL_S) -> list[RunnerDeployment]:
    defaults = {"params": params.model_dump(mode="json")}
    pipeline = reward_pipeline.to_deployment(
        name="reward-pipeline", parameters=defaults, tags=["rmflow"],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        triggers=[labels_ready_trigger(params.project, policy)],
        description=f"Train, register, gate and promote {params.model_name} from the labels of {params.project}.")
    sensor = label_sensor.to_deployment(
        name="label-sensor", interval=interval_s or None, tags=["rmflow"],
        parameters={**defaults, "policy": policy.model_dump(mode="json")},
        description=f"Starts reward-pipeline when {policy.min_new_labels} annotations are newer than its watermark "
                    "(the backstop for lost webhooks).")
    reannotation = request_reannotation.to_deployment(
        name="request-reannotation", tags=["rmflow"], parameters={"project": params.project, "max_tasks": params.reannotate_max},
        description="Send the strength ensemble's most doubtful pairs back to Label Studio.")
    return [pipeline, sensor, reannotation]


FINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}


def ensure_zombie_automations() -> None:
    """Prefect's documented automation for zombie runs (a heartbeat followed by neither another
    heartbeat nor a final state within ZOMBIE_AFTER_S → Crashed), and its twin for runs that die
    before their first heartbeat: Pending (the runner is starting the flow process) not followed by
    Running or a final state within STUCK_PENDING_S. Either would otherwise count as in flight and
    hold retraining back for good. Created once; left alone when they exist (an operator may have
    tuned them in the UI)."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    def crash_when(name: str, after: str, expect: set[str], within_s: int, why: str) -> None:
        from prefect.automations import Automation

        try:
            Automation.read(name=name)
            return
        except ValueError:  # not found
            pass
        Automation(name=name, description=why, trigger=EventTrigger(
            after={after}, expect=expect, match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=timedelta(seconds=within_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=why)]).create()

    crash_when(ZOMBIE_AUTOMATION, "prefect.flow-run.heartbeat", {"prefect.flow-run.heartbeat", *FINAL}, ZOMBIE_AFTER_S,
               f"No heartbeat for {ZOMBIE_AFTER_S} s: the process running this flow run died (killed runner, reboot or OOM kill).")
    crash_when(STUCK_PENDING_AUTOMATION, "prefect.flow-run.Pending", {"prefect.flow-run.Running", *FINAL}, STUCK_PENDING_S,
               f"Pending for {STUCK_PENDING_S} s: the flow process never started (its runner died while starting it).")


def serve_deployments(params: PipelineParams, policy: RetrainPolicy, interval_s: int = SENSOR_INTERVAL_S) -> None:
    ensure_zombie_automations()
    serve(*deployments(params, policy, interval_s))
