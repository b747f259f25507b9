"""The webhook receiver's own pieces and the state files it writes (the whole path runs against the real stack in
test_service.py)."""
from __future__ import annotations

import pytest

from rmcore.watermark import Watermark, advance_watermark
from rmflow.infra.receiver import LabelCount, ProjectWatch, body_annotations


def test_the_webhook_secret_is_never_empty(tmp_path, monkeypatch):
    from rmflow.infra.receiver import create_app, webhook_secret

    monkeypatch.setenv("RMFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("RMFLOW_WEBHOOK_SECRET", raising=False)
    first = webhook_secret()
    assert first and webhook_secret() == first
    assert (tmp_path / "receiver" / "secret").stat().st_mode & 0o777 == 0o600
    (tmp_path / "receiver" / "secret").write_text("")  # a crash between create and write, by an older rmflow
    assert webhook_secret() not in ("", first)
    monkeypatch.setenv("RMFLOW_WEBHOOK_SECRET", " ")
    with pytest.raises(ValueError, match="empty"):
        webhook_secret()
    with pytest.raises(ValueError, match="empty"):
        create_app("")


def test_webhook_bodies_are_read_or_refused_by_name():
    project = {"id": 3, "title": "p"}
    assert body_annotations({"action": "ANNOTATION_CREATED", "project": project, "annotation": {"id": 1}}) == ("p", [{"id": 1}])
    assert body_annotations({"action": "ANNOTATIONS_CREATED", "project": project, "annotations": [{"id": 1}, {"id": 2}]})[1] == [
        {"id": 1}, {"id": 2}]
    assert body_annotations({"action": "PROJECT_UPDATED", "project": project}) == (None, [])
    for bad, says in (({"action": ["x"]}, "action"), ({"action": "ANNOTATION_CREATED", "project": 3}, "project"),
                      ({"action": "ANNOTATION_CREATED", "project": project, "annotations": [1]}, "annotation")):
        with pytest.raises(ValueError, match=says):
            body_annotations(bad)


def test_the_count_holds_each_unconsumed_annotation_once_and_drops_what_a_run_consumed(tmp_path, monkeypatch):
    monkeypatch.setenv("RMFLOW_HOME", str(tmp_path))
    root = tmp_path / "data"
    count = LabelCount(ProjectWatch(project="p", data_root=str(root)))
    stamp = "2026-12-01T12:00:0{}+00:00"
    assert count.add([{"id": 1, "updated_at": stamp.format(1)}, {"id": 2, "updated_at": stamp.format(2)},
                      {"id": 3, "updated_at": stamp.format(3), "was_cancelled": True}]) == 2
    assert count.add([{"id": 1, "updated_at": stamp.format(5)}]) == 0  # updated again: still one label
    count.save()
    again = LabelCount(ProjectWatch(project="p", data_root=str(root)))  # a restarted receiver
    assert again.pending == {"1": stamp.format(5), "2": stamp.format(2)} and again.stale
    # a run consumed everything up to :03 and label 1 as of :05
    advance_watermark(root, Watermark(at=stamp.format(3), consumed={"1": stamp.format(5)}))
    again.sync_watermark()
    assert again.pending == {} and again.stale  # recounted from Label Studio at the next tick


def test_state_is_written_whole_and_a_secret_by_its_first_writer(tmp_path):
    from rmcore.atomic import write_atomic

    path = tmp_path / "a" / "secret"
    assert write_atomic(path, "one", mode=0o600, replace=False)
    assert not write_atomic(path, "two", mode=0o600, replace=False)  # a second first writer loses
    assert path.read_text() == "one" and path.stat().st_mode & 0o777 == 0o600
    assert write_atomic(path, b"three") and path.read_text() == "three"
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret"]  # no temporary file left behind
