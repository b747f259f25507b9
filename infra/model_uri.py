"""Model URIs through MLflow: `models:/NAME@alias`, `models:/NAME/3`, `runs:/…`, or a local folder.

rmcore takes model folders only (no service I/O); this is where a URI becomes a folder. A download
goes into a temporary folder that rmflow creates and removes when the caller is done with it, so a
server that reloads on every promotion (or retries a broken version) does not leave a copy per try.
A local folder is used in place and never deleted.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rmcore.model import META_FILE
from rmcore.scoring import RewardScorer

DOWNLOAD_PREFIX = "rmflow-model-"


def is_uri(uri: str | Path) -> bool:
    text = str(uri)
    return "://" in text or ":/" in text


@contextmanager
def model_folder(uri: str | Path, download_root: str | Path | None = None) -> Iterator[Path]:
    """The saved reward model folder `uri` names, for the duration of the `with` block: a local
    folder as it is, or an MLflow URI downloaded (from MLFLOW_TRACKING_URI's server / registry) into a
    fresh folder under `download_root` (default: the system temp dir) that is deleted afterwards,
    also when loading fails."""
    if not is_uri(uri):
        yield Path(uri)
        return
    import mlflow

    from rmcore.paths import mlflow_tracking_uri

    if download_root is not None:
        Path(download_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=download_root))
    try:
        mlflow.set_tracking_uri(mlflow_tracking_uri())
        local = Path(mlflow.artifacts.download_artifacts(str(uri), dst_path=str(tmp)))
        # a pyfunc logged by rmflow keeps the saved reward model folder under artifacts/
        found = sorted(local.rglob(META_FILE))
        yield found[0].parent if found else local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_scorer(uri: str | Path, device: str = "auto", download_root: str | Path | None = None, dtype: str = "auto") -> RewardScorer:
    """A `RewardScorer` for `uri`; the downloaded files are gone once it is loaded (weights and
    tokenizer live in memory)."""
    with model_folder(uri, download_root) as folder:
        return RewardScorer(folder, device, dtype)
