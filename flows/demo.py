"""`rmflow demo`: the whole reward-model stage on a fresh machine, operated as a user runs it.

`rmflow up` starts the stack and serves the deployments; synthetic prompts (whose gold reward is
known) go to Label Studio, where simulated annotators — real Label Studio users — rank them through
its API. Their annotations reach the webhook receiver, which emits Prefect events; the label trigger
starts a `reward-pipeline` deployment run (train on Ray → register → gate → promote). A second batch
of labels starts a second run, gated against the first champion. Everything stays running.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rmcore.names import CHAMPION, PIPELINE_DEPLOYMENT
from rmflow.flows.pipeline import PipelineParams

PROJECT, MODEL = "rmflow-demo", "rmflow-demo-reward"
WINDOW_S = 90  # the trigger counts one batch of labels within this; a batch takes ~20 s to annotate
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def demo_params(workers: int) -> PipelineParams:
    return PipelineParams(
        project=PROJECT, model_name=MODEL,
        run={"model": {"backbone": "minilm", "max_length": 128}, "optim": {"lr": 1e-4, "epochs": 2, "pairs_per_step": 16},
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


def wait_for_pipeline_run(since: datetime, project: str, timeout_s: float, say: Callable[[str], None]) -> Any:
    """The first pipeline run created after `since` that ran (not cancelled by the one-at-a-time
    rule), once it has finished."""
    end = time.monotonic() + timeout_s
    announced = None
    while time.monotonic() < end:
        ran = [r for r in pipeline_runs(since, project) if r.state_type.value != "CANCELLED"]
        if ran:
            run = ran[0]
            if announced != run.id:
                say(f"the label trigger started flow run {run.name!r} ({run.state_name})")
                announced = run.id
            if run.state_type.value in TERMINAL:
                return run
        time.sleep(2)
    raise TimeoutError(f"no reward-pipeline run for {project} finished within {timeout_s:.0f}s; see the Prefect UI and "
                       "RMFLOW_HOME/deployments/deployments.log")


def run_demo(first: int = 60, more: int = 60, annotators: int = 2, workers: int = 2,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    from rmflow.infra import stack

    if more > first:
        raise ValueError("the retrain batch (more) cannot be larger than the first batch (prompts)")
    threshold = more * annotators
    say("starting the stack (Prefect server, MLflow, Label Studio, webhook receiver, served deployments) …")
    services = stack.up(True, serve={"params": demo_params(workers).model_dump(mode="json"), "min_new_labels": threshold,
                                     "interval_s": 600, "window_s": WINDOW_S})
    say(f"reward-pipeline starts when {threshold} annotations of {PROJECT} arrive within {WINDOW_S} s")
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

    ls = lst.connect(services["labelstudio"]["url"])
    project_id = lst.ensure_project(ls, PROJECT, K)
    done = len(list(ls.tasks.list(project=project_id)))  # a rerun labels prompts it has not used yet
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold}
             for i in synthetic_items(done + first + more, K, seed=11)][done:]
    runs = []
    for n, (batch, seed) in enumerate(((items[:first], 1), (items[first:], 2))):
        if n:  # after firing, Prefect ignores the rest of the window and pre-opens the next one, which a
            # batch could straddle: start after both closed
            time.sleep(max(0.0, 2 * WINDOW_S - (datetime.now(timezone.utc) - runs[-1]["labels_started"]).total_seconds()))
        say(f"{len(batch)} prompts × {K} responses go to Label Studio; {annotators} simulated annotators rank them …")
        labels_started, labelled = _label(project_id, batch, annotators, seed)
        run = wait_for_pipeline_run(labels_started, PROJECT, 900, say)
        latency = (run.start_time - labelled).total_seconds() if run.start_time else None
        client = configure_mlflow()
        champion = alias_version(client, MODEL, CHAMPION)
        say(f"flow run {run.name!r}: {run.state_name}; champion is now version {champion}")
        if run.state_type.value != "COMPLETED":
            raise RuntimeError(f"reward-pipeline run {run.name} ended {run.state_name}; see the Prefect UI")
        runs.append({"flow_run": run.name, "state": run.state_name, "champion_version": champion,
                     "annotations": len(batch) * annotators, "labels_started": labels_started,
                     "trigger_to_start_s": latency})
    urls = {"prefect": services["prefect"]["url"], "mlflow": services["mlflow"]["url"], "label_studio": services["labelstudio"]["url"]}
    return {"champion_version": runs[-1]["champion_version"], "model_uri": f"models:/{MODEL}@champion",
            "runs": [{k: v for k, v in r.items() if k != "labels_started"} for r in runs],
            "deployment": PIPELINE_DEPLOYMENT, "urls": urls, "label_studio_user": labelstudio.ADMIN}
