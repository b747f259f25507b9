"""The label watermark: the newest annotation time a successful pipeline run has consumed.

One store for every caller (CLI `rmflow collect`, the pipeline flow, the label sensor): a JSON
file in the dataset root, written atomically. It only moves forward, and times are compared as
datetimes (Label Studio writes ISO 8601 with varying precision and offsets).
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

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
    """Whether an annotation time lies after the watermark (no watermark: everything is new)."""
    if watermark is None:
        return True
    t = parse_time(stamp)
    return t is not None and t > parse_time(watermark)


def latest(stamps: list[str | None]) -> str | None:
    """The latest of ISO stamps, as written (None when there is none)."""
    known = [s for s in stamps if parse_time(s) is not None]
    return max(known, key=parse_time) if known else None


def read_watermark(root: Path) -> str | None:
    path = Path(root) / WATERMARK_FILE
    return json.loads(path.read_text())["watermark"] if path.is_file() else None


def advance_watermark(root: Path, watermark: str | None) -> str | None:
    """Moves the watermark to `watermark` unless that is older than the stored one; returns the
    stored value afterwards. Call it only after the run that consumed the labels succeeded."""
    current = read_watermark(root)
    new = latest([current, watermark])
    if new == current:
        return current
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".watermark-")
    with os.fdopen(fd, "w") as f:
        json.dump({"watermark": new}, f)
    os.replace(tmp, root / WATERMARK_FILE)
    return new
