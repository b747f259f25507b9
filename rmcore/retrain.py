"""When to retrain: the rule the webhook receiver and the label sensor both apply.

Retraining starts when at least `min_new_labels` annotations (created or updated) are new since the
watermark of the last successful run, counted per annotation, not per event and not within a time
window: people label far slower than any window, and a batch split across two windows would never
reach the threshold. Two more settings are what operators of such loops ask for: `min_interval_s`
(at most one run per T) and `max_interval_s` (retrain at least every D while any label is new,
however few). Never while a pipeline run is in flight: labels that arrive meanwhile count toward the next
run, which starts once the watermark moved.
"""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from rmcore.names import MIN_NEW_LABELS
from rmcore.watermark import parse_time


class RetrainPolicy(BaseModel):
    """A project's retrain rule; `rmflow up` flags of the same names set it."""

    min_new_labels: int = Field(MIN_NEW_LABELS, ge=1, description="New annotations (created or updated since the last "
                                "successful run's watermark) that start a retrain.")
    min_interval_s: float = Field(0, ge=0, description="At most one pipeline run per this many seconds (0: no limit); "
                                  "labels past the threshold wait for it.")
    max_interval_s: float = Field(0, ge=0, description="Retrain at least every this many seconds while any label is new, even "
                                  "below min_new_labels: since the last run started, or before the first run since the oldest "
                                  "new label (0: off).")
    retry_s: float = Field(300, gt=0, description="After asking for a run at a watermark that has not moved since (the "
                           "run failed or crashed, or its start was lost), ask again after this many seconds, or at the next new label.")


def retrain_reason(policy: RetrainPolicy, pending: dict[str, str | None], now: datetime, in_flight: bool,
                   last_start: datetime | None, fired_same_watermark_at: datetime | None = None) -> str | None:
    """Why a run should start now ("threshold" or "max_interval"), or None.

    `pending`: annotation id → `updated_at` of the annotations the watermark has not consumed;
    `last_start`: when the last pipeline run was started; `fired_same_watermark_at`: when this
    caller last asked for a run while the watermark was what it is now (None: never)."""
    if in_flight or not pending:
        return None
    if last_start is not None and (now - last_start).total_seconds() < policy.min_interval_s:
        return None
    if fired_same_watermark_at is not None and (now - fired_same_watermark_at).total_seconds() < policy.retry_s:
        return None
    if len(pending) >= policy.min_new_labels:
        return "threshold"
    if policy.max_interval_s:
        stamps = [t for t in map(parse_time, pending.values()) if t is not None]
        since = last_start or (min(stamps) if stamps else now)
        if (now - since).total_seconds() >= policy.max_interval_s:
            return "max_interval"
    return None
