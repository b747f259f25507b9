"""Stage 7, gate and promote: the gate's checks on the evaluation (absolute thresholds, and the
paired bootstrap against the champion it was evaluated against), the version's validation tags,
and the aliases: `champion` moves to a version that passed, the old champion becomes `previous`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from prefect import task

from rmcore.config import GateConfig
from rmcore.contracts import EvaluationResult, PromotionResult
from rmcore.gate import evaluate_gate
from rmcore.names import CHAMPION, PREVIOUS, check_name
from rmflow.infra.mlflow_client import alias_version, configure_mlflow

GATE_FILE = "gate.json"


class ChampionMoved(RuntimeError):
    """The champion changed between evaluation and gate (another run promoted meanwhile)."""


def gate_and_promote(evaluation: EvaluationResult, gate: GateConfig) -> PromotionResult:
    client = configure_mlflow()
    name, version = evaluation.name, evaluation.version
    saved = json.loads(Path(evaluation.evaluation_file).read_text())
    current = alias_version(client, name, CHAMPION)
    if current not in (evaluation.champion_version, version):
        raise ChampionMoved(f"{name}: the champion moved from v{evaluation.champion_version} to v{current} after v{version} "
                            "was evaluated; evaluate it again against the new champion")
    champion_correct = np.array(saved["champion_correct"]) if saved["champion_correct"] is not None else None
    result = evaluate_gate(saved["metrics"], gate, np.array(saved["correct"]), champion_correct)
    client.set_model_version_tag(name, version, "validation_status", "passed" if result.passed else "failed")
    client.set_model_version_tag(name, version, "validation_reasons", "; ".join(result.reasons) or "all checks passed")
    run_id = client.get_model_version(name, version).tags.get("run_id")
    (Path(evaluation.eval_dir) / GATE_FILE).write_text(json.dumps({"passed": result.passed, "checks": result.checks}, default=float))
    if run_id:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(Path(evaluation.eval_dir) / GATE_FILE), artifact_path="evaluation")
    if result.passed and current != version:
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionResult(name=name, version=version, passed=result.passed, reasons=result.reasons,
                           champion_version=alias_version(client, name, CHAMPION), metrics=evaluation.metrics,
                           gate=result.checks, run_id=run_id)


def rollback(name: str) -> dict[str, Any]:
    """Moves `champion` back to `previous`; the demoted version becomes `previous`."""
    client = configure_mlflow()
    check_name(name)
    current = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise ValueError(f"model {name!r} has no '{PREVIOUS}' version to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    return {"champion_version": previous, "previous_version": current}


promote_task = task(gate_and_promote, name="gate-and-promote", retries=2, retry_delay_seconds=[5, 15], tags=["mlflow"])
