"""`rmflow demo`: the whole reward-model stage on a fresh machine, operated as a user runs it.

`rmflow up` starts the stack and serves the deployments; synthetic prompts (whose gold reward is
known) go to Label Studio, where simulated annotators — real Label Studio users — rank them through
its API. Their annotations reach the webhook receiver, which counts them against the watermark of the
last successful run and, at the threshold, emits `rmflow.labels.ready`; the trigger on it starts a
`reward-pipeline` deployment run (train on Ray → register → gate → promote). A second batch is
labelled while the first run trains: it counts toward the next run, which starts when the first one
lands and is gated against the first champion. Each run says which path started it. Everything
stays running.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from rmcore.names import CHAMPION, PIPELINE_DEPLOYMENT
from rmflow.flows.pipeline import PipelineParams

PROJECT, MODEL = "rmflow-demo", "rmflow-demo-reward"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def demo_params(workers: int) -> PipelineParams:
    return PipelineParams(
        project=PROJECT, model_name=MODEL,
        run={"model": {"backbone": "minilm", "max_length": 128}, "optim": {"lr": 1e-4, "epochs": 1, "pairs_per_step": 16},
             "scale": {"workers": workers}},
        gate={"min_accuracy": 0.55, "max_ece": 0.3, "max_length_bias": 0.9, "delta": 0.1},
    )


def pipeline_runs(since: datetime, project: str) -> list[Any]:
    """Runs of the reward-pipeline deployment for `project` created after `since`, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(PIPELINE_DEPLOYMENT)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                     flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return [r for r in runs if r.created >= since and (r.parameters.get("params") or {}).get("project", project) == project]


def wait_for_pipeline_run(since: datetime, project: str, timeout_s: float, say: Callable[[str], None], done: bool = True,
                          skip: tuple[Any, ...] = (), announced: set[Any] | None = None) -> Any:
    """The first pipeline run created after `since` that ran (not cancelled by the one-at-a-time
    rule) and is not in `skip`: once it started, or once it finished with `done`."""
    from rmflow.infra.pipeline_runs import run_origin

    end = time.monotonic() + timeout_s
    announced = set() if announced is None else announced
    while time.monotonic() < end:
        ran = [r for r in pipeline_runs(since, project) if r.state_type.value != "CANCELLED" and r.id not in skip]
        if ran:
            run = ran[0]
            if run.id not in announced:
                say(f"{run_origin(run)} started flow run {run.name!r}")
                announced.add(run.id)
            if run.state_type.value in TERMINAL or (not done and run.start_time is not None):
                return run
        time.sleep(2)
    raise TimeoutError(f"no reward-pipeline run for {project} {'finished' if done else 'started'} within {timeout_s:.0f}s; see the "
                       "Prefect UI and RMFLOW_HOME/deployments/deployments.log")


def wait_past_collection(flow_run_id: Any, timeout_s: float) -> None:
    """Until the run's collect task has finished (labels made later are not in its snapshot)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            run = client.read_flow_run(flow_run_id)
        if any(t.name.startswith("collect") and t.state_type and t.state_type.value == "COMPLETED" for t in tasks) \
                or run.state_type.value in TERMINAL:
            return
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not finish collecting within {timeout_s:.0f}s")


def run_demo(first: int = 60, more: int = 60, annotators: int = 2, workers: int = 2,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    from rmcore.retrain import RetrainPolicy
    from rmflow.infra import stack

    if more > first:
        raise ValueError("the retrain batch (more) cannot be larger than the first batch (prompts)")
    threshold = more * annotators
    say("starting the stack (Prefect server, MLflow, Label Studio, webhook receiver, served deployments) …")
    services = stack.up(True, serve={"params": demo_params(workers).model_dump(mode="json"),
                                     "policy": RetrainPolicy(min_new_labels=threshold), "interval_s": 600})
    say(f"reward-pipeline starts when {threshold} annotations of {PROJECT} are new since the last training")
    with stack.using_prefect(services["prefect"]["api_url"]):
        return _demo_steps(services, first, more, annotators, say)


def _label(project_id: int, items: list[dict[str, Any]], annotators: int, seed: int) -> tuple[datetime, datetime]:
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    before = {t.id for t in ls.tasks.list(project=project_id)}
    lst.import_tasks(ls, project_id, items, seed=seed)
    new = [t.id for t in ls.tasks.list(project=project_id) if t.id not in before]
    started = datetime.now(timezone.utc)
    lst.simulate_annotators(project_id, annotators, noise=0.5, seed=seed, task_ids=new)
    return started, datetime.now(timezone.utc)


def _demo_steps(services: dict[str, Any], first: int, more: int, annotators: int, say: Callable[[str], None]) -> dict[str, Any]:
    from rmcore.names import DEFAULT_RESPONSES as K
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra.mlflow_client import alias_version, configure_mlflow
    from rmflow.infra.pipeline_runs import run_origin

    ls = lst.connect(services["labelstudio"]["url"])
    project_id = lst.ensure_project(ls, PROJECT, K)
    done = len(list(ls.tasks.list(project=project_id)))  # a rerun labels prompts it has not used yet
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold}
             for i in synthetic_items(done + first + more, K, seed=11)][done:]
    say(f"{first} prompts × {K} responses go to Label Studio; {annotators} simulated annotators rank them …")
    since, labelled = _label(project_id, items[:first], annotators, seed=1)
    announced: set[Any] = set()
    started = [wait_for_pipeline_run(since, PROJECT, 300, say, done=False, announced=announced)]
    wait_past_collection(started[0].id, 300)
    # people keep labelling while the model trains: these count toward the next run, which starts
    # once this one has landed (never beside it)
    say(f"while it trains, {more} more prompts are ranked; they count toward the next run")
    since2, labelled2 = _label(project_id, items[first:], annotators, seed=2)
    runs = []
    for n, (run, at) in enumerate(((started[0], labelled), (None, labelled2))):
        if run is None:
            run = wait_for_pipeline_run(since2, PROJECT, 900, say, done=False, skip=tuple(r["id"] for r in runs), announced=announced)
        run = wait_for_pipeline_run(run.created - timedelta(seconds=1), PROJECT, 900, say, skip=tuple(r["id"] for r in runs),
                                    announced=announced)
        client = configure_mlflow()
        champion = alias_version(client, MODEL, CHAMPION)
        say(f"flow run {run.name!r}: {run.state_name}; champion is now version {champion}")
        if run.state_type.value != "COMPLETED":
            raise RuntimeError(f"reward-pipeline run {run.name} ended {run.state_name}; see the Prefect UI")
        runs.append({"id": run.id, "flow_run": run.name, "state": run.state_name, "champion_version": champion,
                     "started_by": run_origin(run), "annotations": (first if n == 0 else more) * annotators,
                     # the second run waits for the first to land: its number includes that wait
                     "last_label_to_start_s": round((run.start_time - at).total_seconds(), 1) if run.start_time else None})
    urls = {"prefect": services["prefect"]["url"], "mlflow": services["mlflow"]["url"], "label_studio": services["labelstudio"]["url"]}
    return {"champion_version": runs[-1]["champion_version"], "model_uri": f"models:/{MODEL}@champion",
            "runs": [{k: v for k, v in r.items() if k != "id"} for r in runs],
            "deployment": PIPELINE_DEPLOYMENT, "urls": urls, "label_studio_user": labelstudio.ADMIN}
