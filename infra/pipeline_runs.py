"""What the Prefect server says about the pipeline deployment's runs: which are in flight, whether
one was created since a run was asked for, and when the last one started. The webhook receiver and
the label sensor both ask it before starting a run."""
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
PAGE = 200  # runs per read (the server's default page)


@dataclass(frozen=True)
class PipelineActivity:
    in_flight: list[str]  # "name (id)" of each run scheduled to start soon, pending, running, paused or cancelling
    last_start: datetime | None  # when the most recent run started (None: no run ever started)
    created_since: bool = False  # whether a run to start soon was created after the `since` asked about


def pipeline_activity(deployment: str = PIPELINE_DEPLOYMENT, since: datetime | None = None) -> PipelineActivity:
    """The deployment's runs in flight and whether one was created after `since`, from one read: a
    run the trigger creates between two reads would look created but not in flight, that is over,
    and the receiver would ask for a second run (CANCEL_NEW cancels one of the two). A run scheduled
    further ahead than SOON_S (a user's run for tomorrow) is neither in flight nor the run asked for."""
    soon = datetime.now(timezone.utc) + timedelta(seconds=SOON_S)
    with get_client(sync_client=True) as client:
        dep = DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(deployment).id]))
        state = FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))
        # a run is expected to start when it is created (or later): the runs created since `since` that
        # start soon are among these
        window = None if since is None else FlowRunFilterExpectedStartTime(after_=since, before_=soon)
        runs = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(state=state, expected_start_time=window, operator=Operator.or_),
                                     limit=PAGE)
        if len(runs) == PAGE:  # cut (a long schedule booked ahead, or many runs since): the window's latest first, then the
            # in-flight runs on their own, read after, so a run created in between is seen in flight, never over
            runs = [] if window is None else client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(expected_start_time=window),
                                                                   sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=PAGE)
            runs += client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(state=state),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=PAGE)
        last = client.read_flow_runs(deployment_filter=dep, flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)

    def starts_soon(r: FlowRun) -> bool:
        return r.expected_start_time is None or r.expected_start_time <= soon

    busy = {r.id: r for r in runs if r.state_type in IN_FLIGHT and (r.state_type != StateType.SCHEDULED or starts_soon(r))}
    created = since is not None and any(r.created is not None and r.created >= since and starts_soon(r) for r in runs)
    return PipelineActivity([f"{r.name} ({r.id})" for r in busy.values()], last[0].start_time if last else None, created)


def run_origin(run: FlowRun) -> str:
    """Which path started a pipeline run, as an operator reads it."""
    by = run.created_by
    if by is not None and str(by.type).upper() == "AUTOMATION":
        return f"the labels-ready trigger ({by.display_value or 'automation'})"
    if run.parent_task_run_id is not None:
        return "the label sensor"
    return "a user (UI, API or CLI)"
