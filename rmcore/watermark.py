"""The label watermark: which annotations a successful pipeline run has consumed.

One store for every caller (CLI `rmflow collect`, the pipeline flow, the label sensor, the webhook
receiver): a JSON file in the dataset root, written atomically, that only moves forward. Times are
compared as datetimes (Label Studio writes ISO 8601 with varying precision and offsets).

A watermark is a time and a set: `at` is when the consumed pull started, on Label Studio's clock,
so every annotation updated before it was in that pull; `consumed` lists the annotations updated
after `at` that the pull still caught (made while it was reading). An annotation is new when it was
updated after `at` and is not in `consumed` with that same stamp. A single "newest stamp seen" would
skip an annotation made on an early page while later pages were read (its stamp is older than one
read afterwards), and a bare pull time would count the caught ones twice.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from rmcore.atomic import write_atomic

WATERMARK_FILE = "watermark.json"


def parse_time(stamp: str | None) -> datetime | None:
    """An aware datetime from an ISO 8601 string (`Z` or an offset; naive means UTC); None for a
    missing or unreadable stamp."""
    if not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def is_after(stamp: str | None, watermark: str | None) -> bool:
    """Whether an annotation time lies after the watermark time (no watermark: everything is new)."""
    if watermark is None:
        return True
    t = parse_time(stamp)
    return t is not None and t > parse_time(watermark)


def latest(stamps: list[str | None]) -> str | None:
    """The latest of ISO stamps, as written (None when there is none)."""
    known = [s for s in stamps if parse_time(s) is not None]
    return max(known, key=parse_time) if known else None


def annotation_stamp(annotation: dict) -> str | None:
    """When an annotation last changed (Label Studio's `updated_at`, else `created_at`)."""
    return annotation.get("updated_at") or annotation.get("created_at")


class Watermark(BaseModel):
    """What a successful run consumed (see the module docstring)."""

    at: str | None = Field(None, description="Every annotation updated before this time was consumed (None: nothing yet).")
    consumed: dict[str, str] = Field(default_factory=dict, description="Annotation id → its `updated_at`, for annotations "
                                     "updated after `at` that were consumed too.")

    def is_new(self, annotation_id: object, stamp: str | None) -> bool:
        if not is_after(stamp, self.at):
            return False
        seen = self.consumed.get(str(annotation_id))
        return seen is None or parse_time(seen) != parse_time(stamp)

    def later_than(self, other: Watermark) -> bool:
        return other.at is None or (self.at is not None and parse_time(self.at) > parse_time(other.at))


def read_watermark(root: Path) -> Watermark:
    """The stored watermark (an empty one before the first successful run). A file written by an
    older rmflow held only the newest stamp seen: it reads as `at` with nothing consumed after it."""
    path = Path(root) / WATERMARK_FILE
    if not path.is_file():
        return Watermark()
    data = json.loads(path.read_text())
    return Watermark(at=data.get("watermark"), consumed=data.get("consumed") or {})


def advance_watermark(root: Path, watermark: Watermark) -> Watermark:
    """Stores `watermark` unless the stored one is later; returns the stored value afterwards. Call
    it only after the run that consumed the labels succeeded."""
    current = read_watermark(root)
    if not watermark.later_than(current):
        return current
    # a power cut leaves the old watermark or the new one, never an empty file
    write_atomic(Path(root) / WATERMARK_FILE, json.dumps({"watermark": watermark.at, "consumed": watermark.consumed}, sort_keys=True))
    return watermark
