"""Stage 1, collect: a snapshot of a Label Studio project (every task with its annotations, and the
label config) in a file named by its content hash, so the same labels give the same file.

Incremental: after the first pull, only tasks updated since the previous snapshot are fetched
(Label Studio moves a task's `updated_at` when one of its annotations is created, updated or
deleted) and merged into it by task id; tasks deleted in Label Studio leave the snapshot (found
through the project's task count, then its id listing). Each pull writes its own file, and
`snapshots/latest.json` names the newest one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task

from rmcore.contracts import LabelSnapshot
from rmcore.watermark import is_after, latest, parse_time
from rmflow.infra.labelstudio_api import connect, ensure_project, label_config, project_task_count, pull_tasks, task_ids

LATEST = "latest.json"


def _write_atomic(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def previous_snapshot(root: Path, project: str) -> dict[str, Any] | None:
    """The newest snapshot of `project` under `root`, or None (first pull, or unreadable)."""
    pointer = Path(root) / "snapshots" / LATEST
    try:
        snapshot = json.loads((Path(root) / "snapshots" / json.loads(pointer.read_text())["snapshot"]).read_text())
    except (OSError, ValueError, KeyError):
        return None
    return snapshot if snapshot.get("project") == project else None


def pull_snapshot(project: str, root: Path, url: str | None = None, full: bool = False) -> LabelSnapshot:
    """Pulls the project's labels into a snapshot: incrementally from the previous one unless
    `full` (or there is none)."""
    ls = connect(url)
    project_id = ensure_project(ls, project)
    previous = None if full else previous_snapshot(root, project)
    if previous is None:
        tasks, fetched, deleted = pull_tasks(ls, project_id), None, 0
    else:
        tasks, fetched, deleted = _merge_changes(ls, project_id, previous["tasks"])
    snapshot = {"project": project, "label_config": label_config(ls, project_id), "tasks": tasks}
    blob = json.dumps(snapshot, sort_keys=True).encode()
    folder = Path(root) / "snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"
    if not path.is_file():  # written whole or not at all: two runs pulling the same labels agree on its bytes
        _write_atomic(path, blob)
    _write_atomic(folder / LATEST, json.dumps({"snapshot": path.name}).encode())
    return LabelSnapshot(project=project, snapshot=str(path), tasks=len(tasks),
                         annotations=sum(len(t.get("annotations") or []) for t in tasks),
                         fetched=len(tasks) if fetched is None else fetched, deleted=deleted, incremental=previous is not None)


def _merge_changes(ls: Any, project_id: int, old_tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """The previous tasks with changed and new ones replaced by their current version and deleted
    ones dropped; returns (tasks, fetched, deleted).

    Changed and new tasks are those updated after the newest `updated_at` of the previous snapshot
    (the server filters). Deletions leave no trace there, so the project's task count decides:
    every new task is among the fetched ones, so the merged count exceeds Label Studio's exactly when
    tasks were deleted, and only then is the id listing read to find which."""
    merged = {t["id"]: t for t in old_tasks}
    newest = latest([t.get("updated_at") for t in old_tasks])
    # the filter is strictly "after": start a microsecond before the newest stamp already held
    since = (parse_time(newest) - timedelta(microseconds=1)).isoformat() if newest else None
    changed = pull_tasks(ls, project_id, updated_after=since)
    for t in changed:
        merged[t["id"]] = t
    deleted = 0
    if len(merged) != project_task_count(ls, project_id):
        present = task_ids(ls, project_id)
        deleted = len(set(merged) - present)
        merged = {i: t for i, t in merged.items() if i in present}
    return [merged[i] for i in sorted(merged)], len(changed), deleted


collect_task = task(pull_snapshot, name="collect", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])


def count_new_annotations(project: str, watermark: str | None, url: str | None = None) -> int:
    """Submitted (not cancelled) annotations of the project updated after the watermark; only the
    tasks updated after it are fetched."""
    ls = connect(url)
    tasks = pull_tasks(ls, ensure_project(ls, project), updated_after=watermark)
    return sum(1 for t in tasks for a in t.get("annotations") or []
               if not a.get("was_cancelled") and is_after(a.get("updated_at") or a.get("created_at"), watermark))


count_task = task(count_new_annotations, name="count-new-annotations", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
