"""The retrain rule and the watermark it counts against (pure functions; the service tests run the
same rule through the real receiver and sensor)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rmcore.retrain import RetrainPolicy, retrain_reason
from rmcore.watermark import Watermark, advance_watermark, read_watermark

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def stamps(n: int, minutes_ago: float = 1) -> dict[str, str]:
    return {str(i): (NOW - timedelta(minutes=minutes_ago)).isoformat() for i in range(n)}


def test_threshold_counts_labels_not_time_windows():
    policy = RetrainPolicy(min_new_labels=5)
    # five labels spread over two hours start a run: no window splits them
    spread = {str(i): (NOW - timedelta(minutes=30 * i)).isoformat() for i in range(5)}
    assert retrain_reason(policy, spread, NOW, in_flight=False, last_start=None) == "threshold"
    assert retrain_reason(policy, stamps(4), NOW, in_flight=False, last_start=None) is None


def test_never_beside_a_run_in_flight_and_at_most_one_per_interval():
    policy = RetrainPolicy(min_new_labels=2, min_interval_s=600)
    assert retrain_reason(policy, stamps(9), NOW, in_flight=True, last_start=None) is None
    assert retrain_reason(policy, stamps(9), NOW, in_flight=False, last_start=NOW - timedelta(minutes=5)) is None
    assert retrain_reason(policy, stamps(9), NOW, in_flight=False, last_start=NOW - timedelta(minutes=11)) == "threshold"


def test_max_interval_retrains_at_least_that_often_while_any_label_is_new():
    policy = RetrainPolicy(min_new_labels=100, max_interval_s=3600)
    # the last run started three hours ago: a label made a minute ago starts one now
    assert retrain_reason(policy, stamps(1, minutes_ago=1), NOW, False, last_start=NOW - timedelta(hours=3)) == "max_interval"
    assert retrain_reason(policy, stamps(1, minutes_ago=1), NOW, False, last_start=NOW - timedelta(minutes=30)) is None
    # before the first run, the oldest new label's age counts
    assert retrain_reason(policy, stamps(1, minutes_ago=30), NOW, False, None) is None
    assert retrain_reason(policy, stamps(1, minutes_ago=61), NOW, False, None) == "max_interval"
    assert retrain_reason(policy, {}, NOW, False, last_start=NOW - timedelta(days=9)) is None  # nothing new: nothing to train
    assert retrain_reason(RetrainPolicy(min_new_labels=100), stamps(1, minutes_ago=6000), NOW, False, None) is None  # off by default


def test_a_request_for_the_same_watermark_is_repeated_only_after_retry_s():
    policy = RetrainPolicy(min_new_labels=1, retry_s=300)
    assert retrain_reason(policy, stamps(3), NOW, False, None, fired_same_watermark_at=NOW - timedelta(seconds=60)) is None
    assert retrain_reason(policy, stamps(3), NOW, False, None, fired_same_watermark_at=NOW - timedelta(seconds=301)) == "threshold"


def test_an_annotation_caught_after_the_pull_started_is_consumed_once(tmp_path):
    """`at` is the pull's start: an annotation made on a page already read is newer than it and
    counts as new; one the pull still caught is consumed (listed with its stamp); a later update of
    that one is new again."""
    at = "2026-12-01T12:00:00+00:00"
    wm = Watermark(at=at, consumed={"7": "2026-12-01T12:00:03+00:00"})
    assert not wm.is_new("1", "2026-12-01T11:59:59+00:00")  # before the pull: in it
    assert wm.is_new("2", "2026-12-01T12:00:01+00:00")  # during the pull, missed: new
    assert not wm.is_new("7", "2026-12-01T12:00:03Z")  # during the pull, caught: consumed (same instant, other spelling)
    assert wm.is_new("7", "2026-12-01T12:05:00+00:00")  # updated since: new again
    assert Watermark().is_new("1", "2020-01-01T00:00:00Z")

    assert read_watermark(tmp_path) == Watermark()
    assert advance_watermark(tmp_path, wm) == wm == read_watermark(tmp_path)
    older = Watermark(at="2026-12-01T11:00:00+00:00")
    assert advance_watermark(tmp_path, older) == wm  # never backwards
    (tmp_path / "watermark.json").write_text('{"watermark": "2026-12-01T13:00:00Z"}')  # an older rmflow's file
    assert read_watermark(tmp_path) == Watermark(at="2026-12-01T13:00:00Z")

