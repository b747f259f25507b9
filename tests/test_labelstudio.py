"""Collection from a real Label Studio server (started here; annotations submitted through its API)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rmcore.watermark import advance_watermark, read_watermark
from rmflow.infra import labelstudio_api as lst
from rmflow.infra.process import free_port
from rmflow.tasks.collect import pull_snapshot
from rmflow.tasks.dataset import build_dataset

pytestmark = [pytest.mark.slow, pytest.mark.services]
PROJECT = "test-rankings"


def collect_rankings(project: str, out) -> dict:
    """What `rmflow collect` does before it advances the watermark."""
    return build_dataset(pull_snapshot(project, out), out, read_watermark(out)).model_dump()


def test_collect_counts_updates_cancels_and_quarantines(label_studio, tmp_path):
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio as local

    ls = lst.connect()
    project_id = lst.ensure_project(ls, PROJECT, 4)
    assert lst.ensure_project(ls, PROJECT, 4) == project_id
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(20, 4, seed=3)]
    assert lst.import_tasks(ls, project_id, items) == {"imported": 20, "skipped": 0}
    assert lst.import_tasks(ls, project_id, items) == {"imported": 0, "skipped": 20}
    assert lst.simulate_annotators(project_id, annotators=2, noise=0.5)["submitted"] == 40

    out = tmp_path / "labels"
    first = collect_rankings(PROJECT, out)
    assert (first["new_rankings"], first["total_rankings"], first["quarantined"]) == (40, 40, 0)
    assert first["multi_annotated_tasks"] == 20 and -1 <= first["kendall_tau"] <= 1
    advance_watermark(out, first["watermark"])
    second = collect_rankings(PROJECT, out)
    assert second["new_rankings"] == 0 and second["version"] == first["version"]
    advance_watermark(out, second["watermark"])

    # an annotator changes its mind: the update replaces its ranking
    annotator = lst.connect(token=local.create_user("sim-0@rmflow.local"))
    me = annotator.users.whoami().id
    task = next(t for t in ls.tasks.list(project=project_id, fields="all"))
    mine = next(a for a in task.annotations if lst.annotation_user(a) == me)
    old = mine["result"][0]["value"]["ranker"]["rank"]
    annotator.annotations.update(id=mine["id"], result=lst.ranker_result(list(reversed(old))))
    # a third person skips one task and submits a broken ranking on another
    third = lst.connect(token=local.create_user("sim-9@rmflow.local"))
    tasks = [t.id for t in ls.tasks.list(project=project_id)]
    third.annotations.create(id=tasks[1], result=[], was_cancelled=True)
    third.annotations.create(id=tasks[2], result=lst.ranker_result(["r0", "r1", "zz", "r3"]))

    third_collect = collect_rankings(PROJECT, out)
    assert third_collect["new_rankings"] == 1 and third_collect["total_rankings"] == 40
    assert third_collect["cancelled"] == 1 and third_collect["quarantined"] == 1
    assert "unknown completion ids ['zz']" in third_collect["quarantine_reasons"][0]
    assert third_collect["version"] != first["version"]
    rankings = [json.loads(line) for line in (out / third_collect["version"] / "rankings.jsonl").read_text().splitlines()]
    updated = next(r for r in rankings if r["meta"]["annotation_id"] == mine["id"])
    assert [b[0] for b in updated["order"]] == list(reversed(old))


def test_incremental_collect_fetches_only_changes_and_equals_a_full_pull(label_studio, tmp_path):
    """Creates, updates and deletes of annotations and a deleted task: the merged snapshot is byte
    for byte the one a full pull writes (same content hash), and only changed tasks were fetched."""
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio as local
    from rmflow.tasks.collect import count_new_annotations

    project = "test-incremental"
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 4)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(30, 4, seed=5)]
    lst.import_tasks(ls, project_id, items)
    ids = sorted(t.id for t in ls.tasks.list(project=project_id))
    lst.simulate_annotators(project_id, 1, task_ids=ids[:10])
    out = tmp_path / "labels"
    first = pull_snapshot(project, out)
    assert (first.incremental, first.fetched, first.annotations) == (False, 30, 10)
    watermark = build_dataset(first, out, None).watermark
    assert count_new_annotations(project, watermark) == 0

    lst.simulate_annotators(project_id, 1, task_ids=ids[10:13])  # 3 new
    annotator = lst.connect(token=local.create_user("sim-0@rmflow.local"))
    task = ls.tasks.get(id=ids[0])
    mine = task.annotations[0]
    annotator.annotations.update(id=mine["id"], result=lst.ranker_result(list(reversed(mine["result"][0]["value"]["ranker"]["rank"]))))
    ls.annotations.delete(id=ls.tasks.get(id=ids[1]).annotations[0]["id"])
    ls.tasks.delete(id=ids[2])
    assert count_new_annotations(project, watermark) == 4  # 3 created + 1 updated; a deletion is no annotation

    second = pull_snapshot(project, out)
    # 3 new, 1 updated, 1 lost its annotation, + the newest task already held (re-read at the boundary)
    assert second.incremental and second.deleted == 1 and second.fetched == 6
    assert (second.tasks, second.annotations) == (29, 11)
    full = pull_snapshot(project, tmp_path / "full", full=True)
    assert Path(second.snapshot).name == Path(full.snapshot).name  # same content
    # nothing clock-dependent is kept ("created_ago": "12 minutes" would change the bytes by itself)
    assert "created_ago" not in Path(full.snapshot).read_text()
    third = pull_snapshot(project, out)
    assert third.fetched == 1 and third.snapshot == second.snapshot  # only the boundary task


def test_label_studio_down_is_a_clear_error_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port(1)}"
    with pytest.raises(lst.LabelStudioError, match="unreachable after 3 attempts"):
        lst.connect(url, token="x" * 40, attempts=3)


def test_wrong_token_is_an_auth_error_that_never_prints_the_token(label_studio, tmp_path, monkeypatch):
    secret = "deadbeef" * 5
    with pytest.raises(lst.LabelStudioError, match="rejected the API token") as info:
        lst.connect(lst.endpoint(), token=secret)  # where it runs now (a fault test may have restarted it)
    assert secret not in str(info.value)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", secret)
    proc = subprocess.run([sys.executable, "-m", "rmflow", "collect", "--project", PROJECT, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "rejected the API token" in proc.stdout.splitlines()[-1]
    assert secret not in proc.stdout + proc.stderr


def test_simulated_annotators_replay_real_human_orders(label_studio, shared_data, tmp_path):
    from rmcore.converters import convert_file
    from rmcore.dataset import write_preference_dataset

    result = convert_file("qa-feedback", shared_data / "qa-feedback" / "dev_feedback_400.json")
    result.rankings = result.rankings[:5]
    write_preference_dataset(result, tmp_path / "ds", {"kind": "qa-feedback"})
    items = lst.items_from_file(tmp_path / "ds" / "rankings.jsonl")
    ls = lst.connect()
    project_id = lst.ensure_project(ls, "replay-test", 4)
    lst.import_tasks(ls, project_id, items)
    lst.simulate_annotators(project_id, annotators=1)
    collected = collect_rankings("replay-test", tmp_path / "labels")
    assert collected["total_rankings"] == 5
    replayed = [json.loads(line) for line in (tmp_path / "labels" / collected["version"] / "rankings.jsonl").read_text().splitlines()]
    human = {r.prompt: [r.text_of(i) for block in r.order for i in block] for r in result.rankings}
    for r in replayed:
        texts = {c["id"]: c["text"] for c in r["completions"]}
        assert [texts[i] for block in r["order"] for i in block] == human[r["prompt"]]
