"""Typed records that cross every boundary: converters, Label Studio pulls, datasets, training.

A `Ranking` is what one annotator said about one prompt. Rankers give an order with tie blocks;
pairwise sources give judgements, from which an order is derived (Copeland score). Pairs are always
taken from what the human actually said, so intransitive judgement sets keep every strict
preference as a pair even though no single order can hold them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def text_id(text: str) -> str:
    """Stable short id of a text, used for prompts and completions that come without ids."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Completion:
    id: str
    text: str


@dataclass(frozen=True)
class Judgement:
    """One pairwise human judgement between completions `a` and `b` (ids)."""

    a: str
    b: str
    outcome: Literal["a", "b", "tie"]


@dataclass
class Ranking:
    """One annotator's ranking of K completions of one prompt.

    `order` lists tie blocks best→worst: `[["c2"], ["c0", "c3"], ["c1"]]` says c2 is best, c0 and
    c3 are tied, c1 is worst. `judgements` is set when the source was pairwise; then pairs come
    from the judgements and `order` is their Copeland order.
    """

    prompt_id: str
    prompt: str
    completions: list[Completion]
    order: list[list[str]]
    annotator: str = "unknown"
    source: str = "unknown"
    timestamp: str | None = None
    judgements: list[Judgement] | None = None
    presented_order: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def text_of(self, completion_id: str) -> str:
        return self._texts()[completion_id]

    def _texts(self) -> dict[str, str]:
        return {c.id: c.text for c in self.completions}

    def fingerprint(self) -> str:
        """What makes two rankings duplicates: same prompt, texts, order, judgements, annotator."""
        texts = self._texts()
        return content_hash(
            {
                "prompt": self.prompt,
                "order": [sorted(texts[i] for i in block) for block in self.order],
                "judgements": sorted(
                    (texts[j.a], texts[j.b], j.outcome) for j in self.judgements or []
                ),
                "annotator": self.annotator,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreferencePair:
    """One strict human preference. `margin` is the rank distance (or rating gap); `group_id` is
    the prompt's ranking, so K-wise batching can keep its comparisons together."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    margin: float = 1.0
    weight: float = 1.0
    group_id: str = ""
    annotator: str = "unknown"


@dataclass(frozen=True)
class RankedGroup:
    """K-wise view of one ranking: completions best→worst, `blocks[i]` is the tie block of
    `completions[i]` (equal block = tied), and the strict pairs as indices into `completions`."""

    group_id: str
    prompt_id: str
    prompt: str
    completions: list[str]
    blocks: list[int]
    pairs: list[tuple[int, int]]
    margins: list[float]
    ties: list[tuple[int, int]]
    annotator: str = "unknown"


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record the converter could not use, with the reason naming what is wrong."""

    source: str
    locator: str
    reason: str
    record: Any


@dataclass(frozen=True)
class ReannotationRequest:
    """A labelled pair the strength ensemble doubts, to be sent back to annotators. `chosen` is the
    side the current labels prefer; `mean_strength`/`strength_std` are the ensemble's view of it."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    mean_strength: float
    strength_std: float
    split: str
