"""What every converter shares: quarantine, validation, and the ranking → pairs / group views."""
from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

from rmcore.records import (
    Completion,
    Judgement,
    PreferencePair,
    QuarantinedRecord,
    RankedGroup,
    Ranking,
    text_id,
)


class InvalidRecord(ValueError):
    """Raised by a parser for one record; the message is the quarantine reason."""


class StrictModeError(ValueError):
    """`--strict`: the first invalid record stops the run with its reason."""


@dataclass
class ConversionResult:
    rankings: list[Ranking] = field(default_factory=list)
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    cancelled: int = 0
    superseded: int = 0
    relabelled: int = 0  # earlier judgements replaced by re-annotation
    sources: list[Path] = field(default_factory=list)


class Quarantine:
    """Collects invalid records; in strict mode the first one raises."""

    def __init__(self, source: str, strict: bool = False) -> None:
        self.source, self.strict = source, strict
        self.records: list[QuarantinedRecord] = []

    def add(self, locator: str, reason: str, record: Any) -> None:
        if self.strict:
            raise StrictModeError(f"{self.source} {locator}: {reason}")
        self.records.append(QuarantinedRecord(self.source, locator, reason, record))


def require_text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} must be a string, got {type(value).__name__}")
    if "\ufffd" in value or any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise InvalidRecord(f"{what} is not valid UTF-8")
    if not allow_empty and not value.strip():
        raise InvalidRecord(f"{what} is empty")
    return value


def validate_ranking(r: Ranking, allow_empty_completion: bool = False) -> Ranking:
    """Checks the invariants every consumer relies on; raises InvalidRecord naming the problem."""
    require_text(r.prompt, "prompt")
    ids = [c.id for c in r.completions]
    if len(r.completions) < 2:
        raise InvalidRecord(f"needs at least 2 completions, got {len(r.completions)}")
    if len(set(ids)) != len(ids):
        raise InvalidRecord(f"duplicate completion ids {sorted({i for i in ids if ids.count(i) > 1})}")
    for c in r.completions:
        require_text(c.text, f"completion {c.id!r}", allow_empty=allow_empty_completion)
    ranked = [i for block in r.order for i in block]
    unknown = sorted(set(ranked) - set(ids))
    if unknown:
        raise InvalidRecord(f"ranking names unknown completion ids {unknown}")
    if len(set(ranked)) != len(ranked):
        raise InvalidRecord(f"ranking lists a completion twice: {ranked}")
    if len(ranked) < 2:
        raise InvalidRecord("ranking orders fewer than 2 completions")
    for j in r.judgements or []:
        if j.a not in ids or j.b not in ids:
            raise InvalidRecord(f"judgement names unknown completion ids {j.a!r}, {j.b!r}")
    return r


def pairwise_ranking(prompt: str, chosen: str, rejected: str, annotator: str, source: str, allow_empty: bool = False) -> Ranking:
    """The K=2 ranking of one strict preference, validated."""
    if chosen == rejected:
        raise InvalidRecord("chosen and rejected responses are identical")
    ranking = Ranking(prompt_id=text_id(prompt), prompt=prompt,
                      completions=[Completion("chosen", chosen), Completion("rejected", rejected)],
                      order=[["chosen"], ["rejected"]], annotator=annotator, source=source)
    return validate_ranking(ranking, allow_empty_completion=allow_empty)


def copeland_order(ids: list[str], judgements: list[Judgement]) -> list[list[str]]:
    """Tie blocks by wins minus losses: a total order that exists even when judgements cycle."""
    score = {i: 0 for i in ids}
    seen = set()
    for j in judgements:
        seen |= {j.a, j.b}
        if j.outcome == "a":
            score[j.a] += 1
            score[j.b] -= 1
        elif j.outcome == "b":
            score[j.b] += 1
            score[j.a] -= 1
    levels = sorted({score[i] for i in ids if i in seen}, reverse=True)
    return [[i for i in ids if i in seen and score[i] == s] for s in levels]


def is_intransitive(judgements: list[Judgement]) -> bool:
    """True when the strict judgements contain a preference cycle."""
    edges: dict[str, set[str]] = {}
    for j in judgements:
        if j.outcome != "tie":
            w, l = (j.a, j.b) if j.outcome == "a" else (j.b, j.a)
            edges.setdefault(w, set()).add(l)
    state: dict[str, int] = {}

    def has_cycle(node: str) -> bool:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1 or (state.get(nxt) is None and has_cycle(nxt)):
                return True
        state[node] = 2
        return False

    return any(state.get(n) is None and has_cycle(n) for n in list(edges))


def judgements_of(r: Ranking) -> list[Judgement]:
    """The human's judgements: given ones, or every pair implied by the order's tie blocks."""
    if r.judgements is not None:
        return r.judgements
    out = []
    for bi, bj in combinations(range(len(r.order)), 2):
        out += [Judgement(a, b, "a") for a in r.order[bi] for b in r.order[bj]]
    for block in r.order:
        out += [Judgement(a, b, "tie") for a, b in combinations(block, 2)]
    return out


def supersede_relabelled_pairs(rankings: list[Ranking]) -> tuple[list[Ranking], int]:
    """Re-annotations (rankings with `meta["reannotation"]`) replace every other judgement of their
    pairs on the same prompt. The other rankings lose those judgements and take the Copeland order
    of what is left; one with nothing left is dropped. Returns (rankings, judgements replaced)."""
    relabelled: dict[str, set[frozenset[str]]] = {}
    for r in rankings:
        if r.meta.get("reannotation"):
            texts = [c.text for c in r.completions]
            relabelled.setdefault(r.prompt_id, set()).update(frozenset(p) for p in combinations(texts, 2))
    out, replaced = [], 0
    for r in rankings:
        keys = relabelled.get(r.prompt_id)
        if not keys or r.meta.get("reannotation"):
            out.append(r)
            continue
        judgements = judgements_of(r)
        kept = [j for j in judgements if frozenset((r.text_of(j.a), r.text_of(j.b))) not in keys]
        replaced += len(judgements) - len(kept)
        if len(kept) == len(judgements):
            out.append(r)
        elif kept:
            out.append(replace(r, judgements=kept, order=copeland_order([c.id for c in r.completions], kept)))
    return out, replaced


def _rank_distance(r: Ranking) -> dict[str, int]:
    return {i: bi for bi, block in enumerate(r.order) for i in block}


def group_from_ranking(r: Ranking) -> RankedGroup:
    ordered = [i for block in r.order for i in block]
    blocks = [bi for bi, block in enumerate(r.order) for _ in block]
    pos = {cid: k for k, cid in enumerate(ordered)}
    level = _rank_distance(r)
    pairs, margins, ties = [], [], []
    for j in judgements_of(r):
        if j.outcome == "tie":
            ties.append((pos[j.a], pos[j.b]))
            continue
        w, l = (j.a, j.b) if j.outcome == "a" else (j.b, j.a)
        pairs.append((pos[w], pos[l]))
        margins.append(float(max(level[l] - level[w], 1)))
    return RankedGroup(
        group_id=r.fingerprint()[:16],
        prompt_id=r.prompt_id,
        prompt=r.prompt,
        completions=[r.text_of(i) for i in ordered],
        blocks=blocks,
        pairs=pairs,
        margins=margins,
        ties=ties,
        annotator=r.annotator,
    )


def pairs_from_group(g: RankedGroup) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt_id=g.prompt_id,
            prompt=g.prompt,
            chosen=g.completions[w],
            rejected=g.completions[l],
            margin=m,
            group_id=g.group_id,
            annotator=g.annotator,
        )
        for (w, l), m in zip(g.pairs, g.margins)
    ]


def decode_utf8(raw: bytes, locator: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord(f"{locator} is not valid UTF-8 (byte {e.start})") from e


def _open_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


_ARRAY_RESYNC = re.compile(r",\s*(?=\{)")


def iter_json_records(
    path: Path, quarantine: Quarantine, array_key: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Yields (locator, record) from a JSON array, a JSON object holding one, or JSON Lines
    (optionally gzipped). Undecodable lines and array elements are quarantined; reading goes on."""
    raw = _open_bytes(path)
    text = raw.decode("utf-8", errors="surrogateescape")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and array_key and _is_single_json(stripped)):
        yield from _iter_json_array(text, quarantine, array_key)
        return
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        locator = f"line {n}"
        try:
            yield locator, json.loads(decode_utf8(line, locator))
        except (InvalidRecord, json.JSONDecodeError) as e:
            quarantine.add(locator, f"invalid JSON line: {e}", line.decode("utf-8", "replace"))


def _is_single_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _iter_json_array(text: str, quarantine: Quarantine, array_key: str | None) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _iter_broken_array(text, quarantine)
        return
    if isinstance(data, dict):
        data = data.get(array_key) if array_key else None
        if not isinstance(data, list):
            quarantine.add("file", f"expected a JSON list (or an object with key {array_key!r})", None)
            return
    for n, rec in enumerate(data):
        yield f"element {n}", rec


def _iter_broken_array(text: str, quarantine: Quarantine) -> Iterator[tuple[str, Any]]:
    """An array with a corrupt element: decode element by element, skip to the next `, {` on
    failure, so one bad task costs one quarantine entry, not the whole export."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            rec, end = dec.raw_decode(text, pos)
            yield f"element {n}", rec
            pos = end
        except json.JSONDecodeError as e:
            m = _ARRAY_RESYNC.search(text, e.pos)
            end = m.start() if m else len(text)
            line = text.count("\n", 0, pos) + 1
            quarantine.add(f"element {n} (line {line})", f"invalid JSON: {e.msg}", text[pos:end][:2000])
            pos = end
        n += 1


def rankings_from_records(
    path: Path, parse_record: Callable[[Any, str], Ranking], strict: bool = False
) -> ConversionResult:
    """Runs a one-record parser over a file; each record that fails is quarantined."""
    q = Quarantine(str(path), strict)
    out = ConversionResult(sources=[path])
    for locator, rec in iter_json_records(path, q):
        try:
            out.rankings.append(parse_record(rec, path.name))
        except InvalidRecord as e:
            q.add(locator, str(e), rec)
    out.quarantined = q.records
    return out
