"""Stage 6, evaluate: the registered challenger — loaded from the registry, so what is gated is
what was registered — and the current champion, on the same evaluation pairs. The report goes to
the challenger's MLflow run; per-pair correctness of both goes to `evaluation.json` for the gate."""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
from prefect import task

from rmcore.contracts import EvaluationResult, RegisteredModel
from rmcore.evaluate import evaluate_rows, group_rows
from rmcore.metrics import scalar_metrics
from rmcore.names import CHAMPION
from rmcore.paths import rmflow_home
from rmcore.report import write_report
from rmflow.infra.mlflow_client import alias_version, configure_mlflow
from rmflow.infra.model_uri import load_scorer


def evaluate_version(registered: RegisteredModel, eval_data: Path, split: str = "test", eval_format: str | None = None) -> EvaluationResult:
    client = configure_mlflow()
    name, version = registered.name, registered.version
    rows = group_rows(Path(eval_data), split, eval_format)
    if not any(r["pairs"] for r in rows):
        raise ValueError(f"{eval_data} ({split}) holds no strict preference pairs to evaluate on")
    challenger_scorer = load_scorer(f"models:/{name}/{version}")
    challenger = evaluate_rows(challenger_scorer, rows, probes=True)
    champion = alias_version(client, name, CHAMPION)
    champion_correct = None
    if champion is not None and champion != version:
        champion_correct = evaluate_rows(load_scorer(f"models:/{name}/{champion}"), rows).correct.tolist()
    out = rmflow_home() / "evaluations" / name / f"v{version}-{time.strftime('%Y%m%dT%H%M%S')}"
    files = write_report(challenger, out, f"{name} v{version} evaluation")
    evaluation_file = out / "evaluation.json"
    evaluation_file.write_text(json.dumps({"metrics": challenger.metrics, "correct": challenger.correct.tolist(),
                                                   "champion_version": champion, "champion_correct": champion_correct}, default=float))
    with mlflow.start_run(run_id=registered.run_id):
        mlflow.log_metrics({f"eval_{k}": v for k, v in scalar_metrics(challenger.metrics).items() if isinstance(v, (int, float))})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluation")
    return EvaluationResult(name=name, version=version, eval_dir=str(out), evaluation_file=str(evaluation_file), metrics=scalar_metrics(challenger.metrics),
                            champion_version=champion)


evaluate_task = task(evaluate_version, name="evaluate", retries=2, retry_delay_seconds=[5, 15], tags=["mlflow"])
