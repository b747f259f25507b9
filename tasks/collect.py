"""Stage 1, collect: pull a Label Studio project (every task with its annotations, and the label
config) into a snapshot file named by its content hash, so the same labels give the same file."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from prefect import task

from rmcore.contracts import LabelSnapshot
from rmcore.watermark import is_after
from rmflow.infra.labelstudio_api import connect, ensure_project, label_config, pull_tasks


def pull_snapshot(project: str, root: Path, url: str | None = None) -> LabelSnapshot:
    ls = connect(url)
    project_id = ensure_project(ls, project)
    snapshot = {"project": project, "label_config": label_config(ls, project_id), "tasks": pull_tasks(ls, project_id)}
    blob = json.dumps(snapshot, sort_keys=True).encode()
    path = Path(root) / "snapshots" / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():  # written whole or not at all: two runs pulling the same labels agree on its bytes
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".snapshot-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    return LabelSnapshot(project=project, snapshot=str(path), tasks=len(snapshot["tasks"]),
                         annotations=sum(len(t.get("annotations") or []) for t in snapshot["tasks"]))


collect_task = task(pull_snapshot, name="collect", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])


def count_new_annotations(project: str, watermark: str | None, url: str | None = None) -> int:
    """Submitted (not cancelled) annotations of the project updated after the watermark."""
    ls = connect(url)
    return sum(1 for t in pull_tasks(ls, ensure_project(ls, project)) for a in t.get("annotations") or []
               if not a.get("was_cancelled") and is_after(a.get("updated_at") or a.get("created_at"), watermark))


count_task = task(count_new_annotations, name="count-new-annotations", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
