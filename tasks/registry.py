"""MLflow: tracking training runs, the pyfunc reward model, registration, gated promotion, rollback.

The registry needs a database store: MLFLOW_TRACKING_URI when set, else SQLite under RMFLOW_HOME.
A model version carries tags `validation_status` (passed/failed), `validation_reasons`,
`model_sha256` (so re-promoting the same folder reuses its version), `dataset_version` (what it
trained on), `label_dataset_version` (the labels that dataset came from: a strength-annotated
version derives from one) and `label_watermark` (lineage from labels to champion).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from rmcore.config import GateConfig, RunConfig
from rmcore.dataset import read_manifest
from rmcore.evaluate import group_rows
from rmcore.gate import evaluate_gate
from rmcore.paths import mlflow_artifact_root, mlflow_tracking_uri
from rmcore.records import content_hash
from rmcore.report import add_probes, evaluate_rows, write_report
from rmcore.scoring import RewardScorer, resolve_model_uri

EXPERIMENT = "rmflow"
MODEL_ARTIFACT = "reward_model"
LINEAGE_FILE = "lineage.json"


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """`predict(DataFrame[prompt, response]) -> DataFrame[reward]` over a saved rmflow reward model
    (safetensors; no pickled torch module)."""

    def load_context(self, context) -> None:
        self.scorer = RewardScorer(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        missing = {"prompt", "response"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns prompt and response; missing {sorted(missing)}")
        rewards = self.scorer.score(model_input["prompt"].astype(str).tolist(), model_input["response"].astype(str).tolist())
        return pd.DataFrame({"reward": rewards.astype(np.float64)})


def configure_mlflow() -> MlflowClient:
    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        location = None if uri.startswith("http") else Path(mlflow_artifact_root()).as_uri()
        client.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return client


def model_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.name != LINEAGE_FILE):
        h.update(str(f.relative_to(model_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def log_training_run(cfg: RunConfig, summary: dict[str, Any], data_dir: Path, model_dir: Path, watermark: str | None = None) -> str:
    """One MLflow run per training: config as params, metrics, the dataset as an input, the model
    as a pyfunc. The run id is written into the model folder so promotion finds its lineage."""
    configure_mlflow()
    manifest = read_manifest(data_dir)
    label_version = manifest.get("parent_version", manifest["version"])
    with mlflow.start_run(run_name=f"train-{cfg.loss.name}") as run:
        mlflow.log_params(cfg.flat_params())
        mlflow.set_tags({"dataset_version": manifest["version"], "label_dataset_version": label_version,
                         "label_watermark": watermark or "none",
                         "git_commit": git_commit(), "rmflow.kind": "train"})
        for point in summary.get("history", []):
            mlflow.log_metrics({k: v for k, v in point.items() if isinstance(v, (int, float)) and k != "step"}, step=point["step"])
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        pairs = pd.DataFrame({k: manifest[k] for k in ("pairs", "ties", "groups", "prompts")}, index=[0])
        dataset = mlflow.data.from_pandas(pairs, source=str(Path(data_dir).resolve()), name=f"preferences-{manifest['version']}",
                                          digest=manifest["version"])
        mlflow.log_input(dataset, context="training")
        if summary.get("strength"):
            mlflow.log_metrics({f"strength.{k}": float(v) for k, v in summary["strength"].items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
            mlflow.log_artifacts(summary["strength"]["report_dir"], "strength_report")
        _write_lineage(model_dir, {"run_id": run.info.run_id, "dataset_version": manifest["version"], "label_watermark": watermark,
                                   "label_dataset_version": label_version, "config_hash": content_hash(cfg.model_dump(mode="json"))})
        _log_pyfunc(model_dir)
        return run.info.run_id


def _write_lineage(model_dir: Path, lineage: dict[str, Any]) -> None:
    (Path(model_dir) / LINEAGE_FILE).write_text(json.dumps(lineage))


def _lineage(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _log_pyfunc(model_dir: Path):
    example = pd.DataFrame({"prompt": ["How do I brew green tea?"], "response": ["Steep it at 80 degrees for three minutes."]})
    scored = RewardScorer(model_dir).score(example["prompt"].tolist(), example["response"].tolist())
    signature = mlflow.models.infer_signature(example, pd.DataFrame({"reward": scored.astype(np.float64)}))
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=RewardModelPyfunc(), artifacts={MODEL_ARTIFACT: str(model_dir)},
        signature=signature, input_example=example,
        # explicit requirements: inferring them would load the model in a subprocess
        pip_requirements=["rmflow", "torch", "transformers", "safetensors", "pandas"],
    )


def register_model(client: MlflowClient, model_dir: Path, name: str) -> tuple[str, bool]:
    """Registers `model_dir` under `name`, or returns the existing version holding the same bytes.
    Returns (version, created)."""
    digest = model_sha256(model_dir)
    if client.search_registered_models(filter_string=f"name='{name}'"):
        for v in client.search_model_versions(f"name='{name}'"):
            if v.tags.get("model_sha256") == digest:
                return str(v.version), False
    lineage = _lineage(model_dir)
    run_id = lineage.get("run_id")
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register") as run:
        info = _log_pyfunc(model_dir)
        if not run_id:
            mlflow.set_tags({"rmflow.kind": "register", "git_commit": git_commit()})
    mv = mlflow.register_model(info.model_uri, name, tags={
        "model_sha256": digest, "dataset_version": lineage.get("dataset_version") or "unknown",
        "label_dataset_version": lineage.get("label_dataset_version") or lineage.get("dataset_version") or "unknown",
        "label_watermark": str(lineage.get("label_watermark") or "none"), "run_id": run.info.run_id,
        "config_hash": lineage.get("config_hash") or "unknown"})
    return str(mv.version), True


def find_version(name: str, label_dataset_version: str, config_hash: str) -> str | None:
    """The registered version trained from this label dataset version with this run config, if any."""
    client = configure_mlflow()
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        return None
    for v in client.search_model_versions(f"name='{name}'"):
        if v.tags.get("label_dataset_version") == label_dataset_version and v.tags.get("config_hash") == config_hash:
            return str(v.version)
    return None


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def promote(model_dir: Path, name: str, eval_data: Path, gate: GateConfig, split: str = "test", eval_format: str | None = None) -> dict[str, Any]:
    """Registers, evaluates and gates a challenger against the champion on the same evaluation
    set; moves `champion` (old one → `previous`) only when every check passes."""
    client = configure_mlflow()
    model_dir = Path(model_dir)
    version, created = register_model(client, model_dir, name)
    rows = group_rows(eval_data, split, eval_format)
    if not any(r["pairs"] for r in rows):
        raise ValueError(f"{eval_data} ({split}) holds no strict preference pairs to evaluate on")
    challenger_scorer = RewardScorer(model_dir)
    challenger = evaluate_rows(challenger_scorer, rows)
    add_probes(challenger_scorer, rows, challenger)
    current = champion_version(client, name)
    champion_correct = None
    if current is not None and current != version:
        champion_dir = resolve_model_uri(f"models:/{name}/{current}")
        champion_correct = evaluate_rows(RewardScorer(champion_dir), rows).correct
    result = evaluate_gate(challenger.metrics, gate, challenger.correct, champion_correct)
    client.set_model_version_tag(name, version, "validation_status", "passed" if result.passed else "failed")
    client.set_model_version_tag(name, version, "validation_reasons", "; ".join(result.reasons) or "all checks passed")
    run_id = client.get_model_version(name, version).tags.get("run_id") or client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(challenger, Path(tmp), f"{name} v{version} evaluation", result.checks)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"eval_{k}": v for k, v in challenger.metrics.items() if isinstance(v, (int, float))})
            for f in files:
                mlflow.log_artifact(str(f), artifact_path="evaluation")
        report_md = (Path(tmp) / "evaluation_report.md").read_text()
    if result.passed and current != version:
        if current is not None:
            client.set_registered_model_alias(name, "previous", current)
        client.set_registered_model_alias(name, "champion", version)
    scalar = {k: v for k, v in challenger.metrics.items() if not isinstance(v, dict)}
    return {"version": version, "created": created, "passed": result.passed, "reasons": result.reasons,
            "champion_version": champion_version(client, name), "metrics": scalar, "gate": result.checks,
            "run_id": run_id, "report_markdown": report_md}


def rollback(name: str) -> dict[str, Any]:
    """Moves `champion` back to `previous`; the demoted version becomes `previous`."""
    client = configure_mlflow()
    current = champion_version(client, name)
    try:
        previous = str(client.get_model_version_by_alias(name, "previous").version)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"model {name!r} has no 'previous' version to roll back to") from e
    client.set_registered_model_alias(name, "champion", previous)
    if current is not None:
        client.set_registered_model_alias(name, "previous", current)
    return {"champion_version": previous, "previous_version": current}
