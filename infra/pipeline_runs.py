"""What the Prefect server says about the pipeline deployment's runs: which are in flight and when
the last one started. The webhook receiver and the label sensor both ask it before starting a run."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort

from rmcore.names import PIPELINE_DEPLOYMENT

# a run in one of these states will consume the labels that are new now; a run left RUNNING by a
# dead runner stops counting once the zombie automation marks it Crashed (flows/deploy.py)
IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


@dataclass(frozen=True)
class PipelineActivity:
    in_flight: list[str]  # "name (id)" of each run scheduled, pending or running
    last_start: datetime | None  # when the most recent run started (None: no run ever started)


def pipeline_activity(deployment: str = PIPELINE_DEPLOYMENT) -> PipelineActivity:
    with get_client(sync_client=True) as client:
        dep = DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(deployment).id]))
        busy = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))))
        last = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return PipelineActivity([f"{r.name} ({r.id})" for r in busy], last[0].start_time if last else None)


def run_origin(run: FlowRun) -> str:
    """Which path started a pipeline run, as an operator reads it."""
    by = run.created_by
    if by is not None and str(by.type).upper() == "AUTOMATION":
        return f"the labels-ready trigger ({by.display_value or 'automation'})"
    if run.parent_task_run_id is not None:
        return "the label sensor"
    return "a user (UI, API or CLI)"
