"""`rmflow bench collect`: collection from a large Label Studio project, full vs incremental.

A project of `--tasks` ranking tasks (20,000 by default, bulk-imported once; `--annotated` of them
labelled) on the Label Studio rmflow manages (started if needed) or LABEL_STUDIO_URL. Measured in
one process, each `--repeats` times (median):

- poll, no change: what the label sensor does every interval. Before: every task with its
  annotations pulled and counted. After: only tasks updated since the watermark (server filter).
- collect after `--new` new annotations: a snapshot. Before: every task pulled (`full=True`).
  After: only the tasks updated since the previous snapshot (server filter), merged into it (the
  id listing is read only when the task count shows deletions). Both snapshots must be
  byte-identical (same content hash), or the bench fails.

One JSON line per measurement, then one JSON object with the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rmcore.synthetic import synthetic_items
from rmcore.watermark import Watermark, latest
from rmflow.infra import labelstudio_api as lst
from rmflow.tasks.collect import new_annotations, pull_snapshot


def _timed(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ensure_large_project(title: str, tasks: int, annotated: int) -> int:
    """The project with `tasks` tasks and at least `annotated` annotations (bulk import in pages
    of 1000; idempotent across runs)."""
    ls = lst.connect()
    project_id = lst.ensure_project(ls, title)
    have = ls.projects.get(id=project_id).task_number or 0
    if have < tasks:
        items = synthetic_items(tasks - have, 4, seed=have + 1)
        rows = [{"data": {"prompt": f"[{have + n}] {i.prompt}", "rmflow_hash": f"bench-{have + n}",
                          "items": [{"id": f"r{j}", "title": f"Response {j + 1}", "body": r} for j, r in enumerate(i.responses)],
                          "rmflow_gold": {f"r{j}": g for j, g in enumerate(i.gold)}}} for n, i in enumerate(items)]
        with lst.api_errors():
            for start in range(0, len(rows), 1000):
                ls.projects.import_tasks(id=project_id, request=rows[start:start + 1000])
    done = sum(1 for t in ls.tasks.list(project=project_id, fields="task_only", include="id,total_annotations", page_size=5000)
               if t.total_annotations)
    if done < annotated:
        label_new(project_id, annotated - done)
    return project_id


def label_new(project_id: int, n: int) -> None:
    """`n` unlabelled tasks get one simulated annotation each."""
    ls = lst.connect()
    ids = [t.id for t in ls.tasks.list(project=project_id, fields="task_only", include="id,total_annotations", page_size=5000)
           if not t.total_annotations][:n]
    lst.simulate_annotators(project_id, 1, task_ids=ids, seed=len(ids))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--annotated", type=int, default=2000, help="Tasks labelled before the measurements.")
    p.add_argument("--new", type=int, default=50, help="New annotations before the collect measurement.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--project", default="rmflow-bench-collect")
    args = p.parse_args(argv)

    if not lst.endpoint():
        from rmflow.infra import labelstudio

        labelstudio.up()
    t = time.perf_counter()
    project_id = ensure_large_project(args.project, args.tasks, args.annotated)
    setup_s = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        base = pull_snapshot(args.project, root / "incremental", full=True)
        snapshot = json.loads(Path(base.snapshot).read_text())
        watermark = Watermark(at=latest([a.get("updated_at") for task in snapshot["tasks"] for a in task.get("annotations") or []]))
        ls = lst.connect()

        def full_poll() -> int:  # the sensor before: every task and annotation, counted here
            from rmcore.watermark import is_after

            return sum(1 for task in lst.pull_tasks(ls, project_id) for a in task.get("annotations") or []
                       if not a.get("was_cancelled") and is_after(a.get("updated_at"), watermark.at))

        before_s, before_n = _timed(full_poll, args.repeats)
        after_s, after_n = _timed(lambda: len(new_annotations(args.project, watermark)), args.repeats)
        assert before_n == after_n == 0, (before_n, after_n)
        rows.append({"measure": "poll, no change", "before_s": before_s, "after_s": after_s})

        label_new(project_id, args.new)
        after_s, inc = _timed(lambda: pull_snapshot(args.project, root / "incremental"), 1)  # the first pull after the change
        before_s, full = _timed(lambda: pull_snapshot(args.project, root / "full", full=True), args.repeats)
        if Path(inc.snapshot).name != Path(full.snapshot).name:
            raise SystemExit("the incremental snapshot differs from a full pull")
        rows.append({"measure": f"collect after {args.new} new annotations", "before_s": before_s, "after_s": after_s,
                     "fetched_before": full.fetched, "fetched_after": inc.fetched})
        for row in rows:
            row["speedup"] = row["before_s"] / row["after_s"]
            print(json.dumps(row), flush=True)
    table = ["| measure | before (full pull) | after (incremental) | speed-up |", "|---|---:|---:|---:|"]
    table += [f"| {r['measure']} | {r['before_s']:.2f} s | {r['after_s']:.2f} s | {r['speedup']:.0f}× |" for r in rows]
    print("\n".join(table), file=sys.stderr)
    result = {"tasks": args.tasks, "annotated": args.annotated, "setup_s": setup_s, "rows": rows, "table": "\n".join(table)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
