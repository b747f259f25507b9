"""Collection from a real Label Studio server (started here; annotations submitted through its API)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmcore.watermark import Watermark, advance_watermark, read_watermark
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
    advance_watermark(out, Watermark.model_validate(first["watermark"]))
    second = collect_rankings(PROJECT, out)
    assert second["new_rankings"] == 0 and second["version"] == first["version"]
    advance_watermark(out, Watermark.model_validate(second["watermark"]))

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
    from rmflow.tasks.collect import new_annotations

    project = "test-incremental"
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 4)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(30, 4, seed=5)]
    lst.import_tasks(ls, project_id, items)
    ids = sorted(t.id for t in ls.tasks.list(project=project_id))
    lst.simulate_annotators(project_id, 1, task_ids=ids[:10])
    out = tmp_path / "labels"
    time.sleep(1.1)  # Label Studio's clock has whole seconds: every change below is after this pull's start
    first = pull_snapshot(project, out, lookback_s=0)
    assert (first.incremental, first.fetched, first.annotations) == (False, 30, 10)
    watermark = build_dataset(first, out, Watermark()).watermark
    assert new_annotations(project, watermark) == {}
    time.sleep(1.1)

    lst.simulate_annotators(project_id, 1, task_ids=ids[10:13])  # 3 new
    annotator = lst.connect(token=local.create_user("sim-0@rmflow.local"))
    task = ls.tasks.get(id=ids[0])
    mine = task.annotations[0]
    annotator.annotations.update(id=mine["id"], result=lst.ranker_result(list(reversed(mine["result"][0]["value"]["ranker"]["rank"]))))
    ls.annotations.delete(id=ls.tasks.get(id=ids[1]).annotations[0]["id"])
    ls.tasks.delete(id=ids[2])
    assert len(new_annotations(project, watermark)) == 4  # 3 created + 1 updated; a deletion is no annotation

    time.sleep(1.1)
    second = pull_snapshot(project, out, lookback_s=0)
    # 3 new, 1 updated, 1 lost its annotation
    assert second.incremental and second.deleted == 1 and second.fetched == 5
    assert (second.tasks, second.annotations) == (29, 11)
    full = pull_snapshot(project, tmp_path / "full", full=True)
    assert Path(second.snapshot).name == Path(full.snapshot).name  # same content
    # nothing clock-dependent is kept ("created_ago": "12 minutes" would change the bytes by itself)
    assert "created_ago" not in Path(full.snapshot).read_text()
    third = pull_snapshot(project, out, lookback_s=0)
    assert third.fetched == 0 and third.snapshot == second.snapshot
    # with the default look-back, the pull after leaves a cursor a minute back: that minute's changes are read again
    pull_snapshot(project, out)
    again = pull_snapshot(project, out)
    assert again.fetched >= 5 and again.snapshot == second.snapshot


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


def test_a_pull_during_annotation_and_deletion_loses_no_label(label_studio, tmp_path):
    """While a pull of three pages reads on, annotators label a task on the first page (already
    read) and one on the last page (not yet read), and a task of the first page is deleted. Paged
    by page number, the deletion shifted the later pages and one task was never read; with the
    newest stamp as cursor, the first-page label was older than the cursor and skipped for good.
    The next pull must hold every annotation exactly once, and count the missed one as new."""
    from rmcore.synthetic import synthetic_items
    from rmflow.tasks.collect import new_annotations

    project = "test-concurrent-pull"
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project, 4)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(12, 4, seed=8)]
    lst.import_tasks(ls, project_id, items)
    ids = sorted(t.id for t in ls.tasks.list(project=project_id))
    lst.simulate_annotators(project_id, 1, seed=8, task_ids=ids)
    made: dict[str, int] = {}

    def meanwhile(page: int) -> None:
        if page != 1:
            return
        lst.simulate_annotators(project_id, 2, seed=8, task_ids=[ids[0]])  # sim-1 labels a task already read
        lst.simulate_annotators(project_id, 2, seed=8, task_ids=[ids[-1]])  # and one on the last page
        ls.tasks.delete(id=ids[1])
        made.update({"first": ls.tasks.get(id=ids[0]).annotations[-1]["id"], "last": ls.tasks.get(id=ids[-1]).annotations[-1]["id"]})

    out = tmp_path / "labels"
    first = pull_snapshot(project, out, page_size=4, on_page=meanwhile)
    held = {t["id"] for t in json.loads(Path(first.snapshot).read_text())["tasks"]}
    assert set(ids) - {ids[1]} <= held  # no task skipped by the deletion
    watermark = build_dataset(first, out, read_watermark(out)).watermark
    advance_watermark(out, watermark)
    # the label on the page already read is new; the one the pull still read is consumed
    assert set(new_annotations(project, watermark)) == {str(made["first"])}

    second = pull_snapshot(project, out, page_size=4)
    annotation_ids = [a["id"] for t in json.loads(Path(second.snapshot).read_text())["tasks"] for a in t["annotations"]]
    truth = [a["id"] for t in lst.pull_tasks(ls, project_id) for a in t["annotations"]]
    assert len(truth) == 13  # 12 - the deleted task's + 2
    assert sorted(annotation_ids) == sorted(truth) and len(set(annotation_ids)) == len(annotation_ids)
    labels = build_dataset(second, out, read_watermark(out))
    assert labels.new_rankings == 1  # the missed label, counted once
