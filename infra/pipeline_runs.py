"""What the Prefect server says about the pipeline deployment's runs: which are in flight and when
the last one started. The webhook receiver and the label sensor both ask it before starting a run."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    Operator,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort

from rmcore.names import PIPELINE_DEPLOYMENT

# a run in one of these states will consume the labels that are new now; a run left RUNNING or
# PENDING by a dead runner stops counting once an automation marks it Crashed (flows/deploy.py)
IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
SOON_S = 60  # a run scheduled further ahead (a user's run for tomorrow) does not hold back today's labels


@dataclass(frozen=True)
class PipelineActivity:
    in_flight: list[str]  # "name (id)" of each run scheduled (to start soon), pending or running
    last_start: datetime | None  # when the most recent run started (None: no run ever started)
    created_since: bool = False  # whether a run was created after the `since` asked about


def pipeline_activity(deployment: str = PIPELINE_DEPLOYMENT, since: datetime | None = None) -> PipelineActivity:
    """The deployment's runs in flight and whether one was created after `since`, from one read: a
    run the trigger creates between two reads would look created but not in flight, that is over,
    and the receiver would ask for a second run (CANCEL_NEW cancels one of the two)."""
    with get_client(sync_client=True) as client:
        dep = DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(deployment).id]))
        in_flight = FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))
        # a run is expected to start when it is created (or later): none expected after `since`, none created
        after = None if since is None else FlowRunFilterExpectedStartTime(after_=since)
        runs = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(
            state=in_flight, expected_start_time=after, operator=Operator.or_))
        last = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    soon = datetime.now(timezone.utc) + timedelta(seconds=SOON_S)
    busy = [r for r in runs if r.state_type in IN_FLIGHT
            and (r.state_type != StateType.SCHEDULED or r.expected_start_time is None or r.expected_start_time <= soon)]
    created = since is not None and any(r.expected_start_time is not None and r.expected_start_time >= since for r in runs)
    return PipelineActivity([f"{r.name} ({r.id})" for r in busy], last[0].start_time if last else None, created)


def run_origin(run: FlowRun) -> str:
    """Which path started a pipeline run, as an operator reads it."""
    by = run.created_by
    if by is not None and str(by.type).upper() == "AUTOMATION":
        return f"the labels-ready trigger ({by.display_value or 'automation'})"
    if run.parent_task_run_id is not None:
        return "the label sensor"
    return "a user (UI, API or CLI)"
