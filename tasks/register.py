"""Stage 5, register: the training run in MLflow (the config it really trained with, metrics,
dataset input, strength report), the pyfunc reward model logged once (self-contained: its code and
rmcore ship with it, requirements pinned), the Hugging Face export (`hf_model/`), and a registered
version.

A new version is tagged `validation_status=pending`; only the gate turns it into passed/failed,
and only a gated version counts as done for a later pipeline run (a pending one is evaluated and
gated, never skipped). Tags: `model_sha256` (re-registering the same bytes reuses the version),
`dataset_version`, `label_dataset_version` (the labels a strength version derives from),
`label_watermark`, `config_hash` (the requested run config), `run_id`, `reward_mean`/`reward_std`,
`input_format` (chat_template or pair), `hf_export` (`hf_model`, or why there is none).
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import task

from rmcore.contracts import RegisteredModel, TrainedModel
from rmcore.dataset import read_manifest
from rmcore.export import ExportUnavailable, export_hf
from rmcore.metrics import scalar_metrics
from rmcore.model import read_meta
from rmcore.names import HF_ARTIFACT, MODEL_ARTIFACT, check_name
from rmcore.scoring import RewardScorer
from rmflow.infra.mlflow_client import configure_mlflow, git_commit, log_run, model_versions

PENDING, PASSED, FAILED = "pending", "passed", "failed"


def model_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# what scoring imports (rmcore.scoring: torch, transformers + tokenizers, safetensors, pydantic
# configs, jinja2 chat templates), pinned to the versions that trained the model
SCORING_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pydantic", "jinja2", "pyyaml")


def pinned_requirements() -> list[str]:
    from importlib.metadata import version

    # a local build tag (2.13.0+cpu) is no index's version: pin the release
    return [f"{name}=={version(name).split('+')[0]}" for name in SCORING_REQUIREMENTS]


def _log_pyfunc(model_dir: Path):
    import rmcore

    example = pd.DataFrame({"prompt": ["How do I brew green tea?"], "response": ["Steep it at 80 degrees for three minutes."]})
    scored = RewardScorer(model_dir).score(example["prompt"].tolist(), example["response"].tolist())
    signature = mlflow.models.infer_signature(example, pd.DataFrame({"reward": scored.astype(np.float64)}), params={"normalize": False})
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=str(Path(__file__).with_name("reward_pyfunc.py")), artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(rmcore.__file__).parent)], signature=signature, input_example=example,
        # explicit requirements: inferring them would load the model in a subprocess
        pip_requirements=pinned_requirements(),
    )


def _log_hf_export(model_dir: Path) -> str:
    """The Hugging Face export as the run's `hf_model` artifact folder; returns the version tag."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_hf(model_dir, Path(tmp) / HF_ARTIFACT)
        except ExportUnavailable as e:
            return f"unavailable: {e}"
        mlflow.log_artifacts(str(Path(tmp) / HF_ARTIFACT), HF_ARTIFACT)
    return HF_ARTIFACT


def _as_registered(name: str, v) -> RegisteredModel:
    return RegisteredModel(name=name, version=str(v.version), created=False, run_id=v.tags.get("run_id") or v.run_id or "",
                           status=v.tags.get("validation_status", PENDING))


def register_model(name: str, model_dir: Path, trained: TrainedModel | None = None, label_watermark: str | None = None,
                   config_hash: str | None = None) -> RegisteredModel:
    """Registers `model_dir` under `name` (with its training run when `trained` is given), or
    returns the version that already holds the same bytes."""
    check_name(name)
    client = configure_mlflow()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} is missing: nothing to register (was it deleted after training?)")
    digest = model_sha256(model_dir)
    for v in model_versions(client, name):
        if v.tags.get("model_sha256") == digest:
            return _as_registered(name, v)
    dataset_version = label_version = "unknown"
    if trained is not None:
        manifest = read_manifest(Path(trained.dataset))
        dataset_version, label_version = manifest["version"], manifest.get("parent_version", manifest["version"])
        run_id = log_run(trained.run, trained.summary, Path(trained.dataset), run_name=f"train-{trained.run.loss.name}",
                         tags={"label_dataset_version": label_version, "label_watermark": label_watermark or "none", "rmflow.kind": "train"})
    else:
        with mlflow.start_run(run_name="register") as run:
            mlflow.set_tags({"rmflow.kind": "register", "git_commit": git_commit()})
            run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id):
        if trained is not None and trained.summary.get("strength"):
            mlflow.log_metrics({f"strength.{k}": float(v) for k, v in scalar_metrics(trained.summary["strength"]).items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if trained is not None and trained.strength_report:
            mlflow.log_artifacts(trained.strength_report, "strength_report")
        info = _log_pyfunc(model_dir)
        hf_export = _log_hf_export(model_dir)
    meta = read_meta(model_dir)
    stats = meta.get("reward_stats") or {}
    mv = mlflow.register_model(info.model_uri, name, tags={
        "model_sha256": digest, "dataset_version": dataset_version, "label_dataset_version": label_version,
        "label_watermark": str(label_watermark or "none"), "run_id": run_id, "config_hash": config_hash or "unknown",
        "validation_status": PENDING, "hf_export": hf_export, "input_format": meta.get("input_format", "pair"),
        **{f"reward_{k}": str(stats[k]) for k in ("mean", "std") if k in stats}})
    return RegisteredModel(name=name, version=str(mv.version), created=True, run_id=run_id, status=PENDING)


def find_version(name: str, label_dataset_version: str, config_hash: str) -> RegisteredModel | None:
    """The registered version trained from this label dataset version with this run config, if any
    (its `status` says whether the gate already ran)."""
    client = configure_mlflow()
    for v in model_versions(client, name):
        if v.tags.get("label_dataset_version") == label_dataset_version and v.tags.get("config_hash") == config_hash:
            return _as_registered(name, v)
    return None


register_task = task(register_model, name="register", retries=2, retry_delay_seconds=[5, 15], tags=["mlflow"])
find_version_task = task(find_version, name="find-trained-version", retries=2, retry_delay_seconds=[5, 15], tags=["mlflow"])
