"""`rmflow demo`: the whole reward-model stage on a fresh machine, with synthetic prompts whose
gold reward is known and simulated annotators who are real Label Studio users."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rmflow.flows.pipeline import PipelineParams, reward_pipeline
from rmflow.flows.sensor import label_sensor

PROJECT, MODEL = "rmflow-demo", "rmflow-demo-reward"


def demo_params(workers: int) -> PipelineParams:
    return PipelineParams(
        project=PROJECT, model_name=MODEL,
        run={"model": {"backbone": "minilm", "max_length": 128}, "optim": {"lr": 1e-4, "epochs": 2, "pairs_per_step": 16},
             "scale": {"workers": workers}},
        gate={"min_accuracy": 0.55, "max_ece": 0.3, "max_length_bias": 0.9, "delta": 0.1},
    )


def run_demo(first: int = 60, more: int = 30, annotators: int = 2, workers: int = 2,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    from rmflow.infra import stack

    say("starting the local stack (Prefect server, MLflow UI, Label Studio) …")
    services = stack.up()
    with stack.using_prefect(stack.prefect_api_url()):
        return _demo_steps(services, first, more, annotators, workers, say)


def _demo_steps(services: dict[str, Any], first: int, more: int, annotators: int, workers: int,
                say: Callable[[str], None]) -> dict[str, Any]:
    from rmcore.names import DEFAULT_RESPONSES as K
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect(services["labelstudio"]["url"])
    project_id = lst.ensure_project(ls, PROJECT, K)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(first + more, K, seed=11)]
    say(f"seeding {first} prompts × {K} responses; {annotators} simulated annotators rank them in Label Studio …")
    lst.import_tasks(ls, project_id, items[:first])
    lst.simulate_annotators(project_id, annotators, noise=0.5, seed=1)
    params = demo_params(workers)
    say("running reward-pipeline: collect → dataset → train on Ray → register → gate → promote …")
    first_run = reward_pipeline(params)
    say(f"first model: version {first_run.get('version')} passed={first_run.get('passed')}; champion v{first_run.get('champion_version')}")
    say(f"{more} new prompts get labelled; the label sensor decides whether to retrain …")
    lst.import_tasks(ls, project_id, items[first:])
    lst.simulate_annotators(project_id, annotators, noise=0.5, seed=2)
    sensed = label_sensor(params, min_new_labels=more, use_deployment=False)
    retrain = sensed.get("pipeline") or {}
    champion = retrain.get("champion_version") or first_run.get("champion_version")
    return {
        "champion_version": champion, "model_uri": f"models:/{MODEL}@champion",
        "metrics": retrain.get("metrics") or first_run.get("metrics"),
        "first_run": {k: first_run.get(k) for k in ("version", "passed", "reasons", "total_rankings")},
        "retrain": {"triggered": sensed["triggered"], "new_annotations": sensed["new_annotations"],
                    **{k: retrain.get(k) for k in ("version", "passed", "reasons", "total_rankings")}},
        "urls": {"label_studio": services["labelstudio"]["url"], "prefect": services["prefect"]["url"],
                 "mlflow": services["mlflow"]["url"]},
        "label_studio_user": labelstudio.ADMIN,
    }
