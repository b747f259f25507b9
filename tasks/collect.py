"""Stage 1, collect: a snapshot of a Label Studio project (every task with its annotations, and the
label config) in a file named by its content hash, so the same labels give the same file.

Incremental: after the first pull, only tasks updated after the previous pull's cursor are fetched
(Label Studio moves a task's `updated_at` when one of its annotations is created, updated or
deleted) and merged into it by task id; tasks deleted in Label Studio leave the snapshot (found
through the project's task count, then its id listing). Each pull writes its own file, and
`snapshots/latest.json` names the newest one with the cursor for the next pull.

The cursor is the time the pull started on Label Studio's clock, less LOOKBACK_S, never the newest
stamp read: an annotation made on an early page while later pages are read is older than stamps
read after it, and a cursor past it would skip it for good. Every pull re-reads the overlap; merging
by id makes that idempotent.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task

from rmcore.atomic import write_atomic
from rmcore.contracts import LabelSnapshot
from rmcore.watermark import Watermark, latest, parse_time
from rmflow.infra.labelstudio_api import (
    PAGE_SIZE,
    connect,
    ensure_project,
    label_config,
    project_task_count,
    pull_tasks,
    server_time,
    task_ids,
    unconsumed_annotations,
)

# how far before a pull's start the next one re-reads: annotations saved while the pull began (their
# stamp taken before it, their commit after) and the Date header's rounding down to the second
LOOKBACK_S = 60
LATEST = "latest.json"


def previous_snapshot(root: Path, project: str) -> tuple[dict[str, Any], str | None] | None:
    """The newest snapshot of `project` under `root` and the cursor its pull left, or None (first
    pull, or unreadable)."""
    pointer = Path(root) / "snapshots" / LATEST
    try:
        latest_ = json.loads(pointer.read_text())
        snapshot = json.loads((Path(root) / "snapshots" / latest_["snapshot"]).read_text())
    except (OSError, ValueError, KeyError):
        return None
    if snapshot.get("project") != project:
        return None
    cursor = latest_.get("cursor")
    if cursor is None:  # written by an older rmflow: the newest stamp it held, less the look-back
        newest = latest([t.get("updated_at") for t in snapshot["tasks"]])
        cursor = (parse_time(newest) - timedelta(seconds=LOOKBACK_S)).isoformat() if newest else None
    return snapshot, cursor


def pull_snapshot(project: str, root: Path, url: str | None = None, full: bool = False, page_size: int = PAGE_SIZE,
                  on_page: Callable[[int], None] | None = None, lookback_s: float = LOOKBACK_S) -> LabelSnapshot:
    """Pulls the project's labels into a snapshot: incrementally from the previous one unless
    `full` (or there is none). `on_page(n)` is called after each page of tasks is read; the next
    pull re-reads from `lookback_s` before this one started."""
    ls = connect(url)
    project_id = ensure_project(ls, project)
    started = server_time(url)
    previous = None if full else previous_snapshot(root, project)
    if previous is None:
        tasks, fetched, deleted = pull_tasks(ls, project_id, page_size=page_size, on_page=on_page), None, 0
    else:
        tasks, fetched, deleted = _merge_changes(ls, project_id, previous[0]["tasks"], previous[1], page_size, on_page)
    snapshot = {"project": project, "label_config": label_config(ls, project_id), "tasks": tasks}
    blob = json.dumps(snapshot, sort_keys=True).encode()
    folder = Path(root) / "snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"
    if not path.is_file():  # written whole or not at all: two runs pulling the same labels agree on its bytes
        write_atomic(path, blob)
    cursor = (parse_time(started) - timedelta(seconds=lookback_s)).isoformat()
    write_atomic(folder / LATEST, json.dumps({"snapshot": path.name, "cursor": cursor}).encode())
    return LabelSnapshot(project=project, snapshot=str(path), tasks=len(tasks),
                         annotations=sum(len(t.get("annotations") or []) for t in tasks), cursor=cursor,
                         fetched=len(tasks) if fetched is None else fetched, deleted=deleted, incremental=previous is not None)


def _merge_changes(ls: Any, project_id: int, old_tasks: list[dict[str, Any]], since: str | None, page_size: int,
                   on_page: Callable[[int], None] | None) -> tuple[list[dict[str, Any]], int, int]:
    """The previous tasks with changed and new ones replaced by their current version and deleted
    ones dropped; returns (tasks, fetched, deleted).

    Changed and new tasks are those updated after the previous pull's cursor (the server filters).
    Deletions leave no trace there, so the project's task count decides: every new task is among
    the fetched ones, so the merged count exceeds Label Studio's exactly when tasks were deleted,
    and only then is the id listing read to find which."""
    merged = {t["id"]: t for t in old_tasks}
    changed = pull_tasks(ls, project_id, updated_after=since, page_size=page_size, on_page=on_page)
    for t in changed:
        merged[t["id"]] = t
    deleted = 0
    if len(merged) != project_task_count(ls, project_id):
        present = task_ids(ls, project_id)
        deleted = len(set(merged) - present)
        merged = {i: t for i, t in merged.items() if i in present}
    return [merged[i] for i in sorted(merged)], len(changed), deleted


collect_task = task(pull_snapshot, name="collect", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])


def new_annotations(project: str, watermark: Watermark, url: str | None = None) -> dict[str, str | None]:
    """The project's submitted (not cancelled) annotations that the watermark has not consumed, as
    annotation id → `updated_at` (none while the project does not exist)."""
    return unconsumed_annotations(connect(url), project, watermark)


new_annotations_task = task(new_annotations, name="new-annotations", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
