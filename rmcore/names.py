"""Names and defaults shared by every layer: one place, so the CLI, the flows, the registry and
the Label Studio side cannot drift apart."""
from __future__ import annotations

import re

DEFAULT_PROJECT = "rmflow-rankings"  # Label Studio project title
DEFAULT_MODEL = "rmflow-reward"  # registered model name in MLflow
DEFAULT_RESPONSES = 4  # K: responses per Label Studio ranking task, when rmflow creates the project
EXPERIMENT = "rmflow"  # MLflow experiment of every run rmflow logs
CHAMPION, PREVIOUS = "champion", "previous"  # registry aliases: the promoted version and the one before
MODEL_ARTIFACT = "reward_model"  # artifact path of the pyfunc in a run
HF_ARTIFACT = "hf_model"  # artifact path of the Hugging Face export in a run
REANNOTATE_FIELD = "rmflow_reannotate"  # task data field marking a pair sent back for re-annotation
LABELS_READY_EVENT = "rmflow.labels.ready"  # the receiver emits it when a project should retrain (rmcore.retrain)
PIPELINE_DEPLOYMENT = "reward-pipeline/reward-pipeline"  # <flow>/<deployment> that triggers start
MIN_NEW_LABELS = 20  # new annotations that start a retrain (rmcore.retrain)
SENSOR_INTERVAL_S = 600  # seconds between label-sensor polls
HEARTBEAT_S = 30  # flow-run heartbeats (Prefect's minimum); a run that misses three is a zombie and is marked Crashed


def project_resource(project_id: int | str) -> str:
    """The Prefect resource id of a Label Studio project, in the receiver's events."""
    return f"rmflow.labelstudio.project.{project_id}"

# MLflow registered-model names and Label Studio project titles rmflow accepts: they end up in
# MLflow search filters and file names, so nothing that could change a query's meaning.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "model name") -> str:
    """`name` if it is a safe registry name, else a ValueError naming it."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (at most 128, starting "
                         "with a letter or digit)")
    return name
