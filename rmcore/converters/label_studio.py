"""Label Studio JSON exports → `Ranking` records.

Supported labelling configs (an export carries none, so fields are found the way Label Studio's
templates lay tasks out, or from `LabelConfig`):
- Ranker over a List: `value.ranker.<ranker name>` = item ids best→worst. Bucket mode:
  `value.ranker.<bucket>` = ids; each bucket is a tie block, buckets ordered as in the config (else
  as in the result); the internal "_" bucket holds unranked items and is ignored.
- Pairwise: `value.selected` = "left" | "right" (left = first text field).
- Choices with a Tie option: a choice naming the first/second response, or "tie".
Per task and annotator the latest update wins; cancelled (skipped) annotations are counted and
ignored. Tasks whose data carry `rmflow_reannotate` (pairs rmflow sent back for re-annotation)
supersede every earlier judgement of their pair on that prompt.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rmcore.converters.common import (
    ConversionResult,
    InvalidRecord,
    Quarantine,
    iter_json_records,
    require_text,
    supersede_relabelled_pairs,
    validate_ranking,
)
from rmcore.converters.hh_rlhf import ASSISTANT
from rmcore.converters.trl_format import render_messages
from rmcore.names import REANNOTATE_FIELD
from rmcore.records import Completion, Ranking, text_id
from rmcore.watermark import parse_time

PROMPT_FIELDS = ("prompt", "question", "instruction", "query", "input", "text", "context")
PAIR_FIELDS = (
    ("answer1", "answer2"),
    ("response1", "response2"),
    ("response_a", "response_b"),
    ("completion1", "completion2"),
    ("text1", "text2"),
    ("left", "right"),
)
ITEM_TEXT_KEYS = ("body", "text", "content", "html", "title")
TIE_WORDS = re.compile(r"^\s*(tie|equal|same|both|neither|no preference)\b", re.I)
FIRST = re.compile(r"(\b1\b|\bA\b|left|first)\s*$", re.I)
SECOND = re.compile(r"(\b2\b|\bB\b|right|second)\s*$", re.I)


@dataclass
class LabelConfig:
    """What rmflow needs from a project's label config XML (all optional)."""

    prompt_field: str | None = None
    items_field: str | None = None
    pair_fields: tuple[str, str] | None = None
    bucket_order: list[str] = field(default_factory=list)
    controls: set[str] = field(default_factory=set)  # names of the Ranker/Pairwise/Choices tags, when known

    @classmethod
    def from_xml(cls, xml: str) -> LabelConfig:
        root = ET.fromstring(xml)
        values = {el.get("name"): (el.get("value") or "").lstrip("$") for el in root.iter() if el.get("value")}
        cfg = cls()
        for el in root.iter():
            if el.tag == "List":
                cfg.items_field = values.get(el.get("name"))
            elif el.tag == "Pairwise":
                names = [n.strip() for n in (el.get("toName") or "").split(",")]
                if len(names) == 2 and all(n in values for n in names):
                    cfg.pair_fields = (values[names[0]], values[names[1]])
            elif el.tag == "Bucket" and el.get("name"):
                cfg.bucket_order.append(el.get("name"))
            if el.tag in ("Ranker", "Pairwise", "Choices") and el.get("name"):
                cfg.controls.add(el.get("name"))
        used = {cfg.items_field, *(cfg.pair_fields or ())}
        for el in root.iter("Text"):
            field_name = values.get(el.get("name"))
            if field_name and field_name not in used:
                cfg.prompt_field = field_name
                break
        return cfg


def _prompt_of(data: dict, cfg: LabelConfig) -> str:
    candidates = [cfg.prompt_field] if cfg.prompt_field else PROMPT_FIELDS
    for key in candidates:
        if key in data:
            if isinstance(data[key], list):  # a dialogue as messages: kept as turns (the hh-rlhf layout)
                return render_messages(data[key], f"data.{key}") + ASSISTANT
            return require_text(data[key], f"data.{key}")
    raise InvalidRecord(f"no prompt field in task data (looked for {', '.join(candidates)})")


def _items_of(data: dict, cfg: LabelConfig) -> tuple[str, list[Completion]]:
    key = cfg.items_field or next(
        # the first list of objects with ids (a dialogue prompt is a list of messages, not items)
        (k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(i, dict) and "id" in i for i in v)),
        None,
    )
    if key is None or key not in data:
        raise InvalidRecord("no items list in task data (set --items-field)")
    items = data[key]
    if not isinstance(items, list):
        raise InvalidRecord(f"data.{key} must be a list, got {type(items).__name__}")
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise InvalidRecord(f"data.{key}[{n}] must be an object with an 'id'")
        text_key = next((k for k in ITEM_TEXT_KEYS if k in item), None)
        if text_key is None:
            raise InvalidRecord(f"data.{key}[{n}] has no text ({'/'.join(ITEM_TEXT_KEYS)})")
        out.append(Completion(str(item["id"]), require_text(item[text_key], f"data.{key}[{n}].{text_key}")))
    return key, out


def _pair_of(data: dict, cfg: LabelConfig) -> list[Completion]:
    fields = [cfg.pair_fields] if cfg.pair_fields else PAIR_FIELDS
    for a, b in fields:
        if a in data and b in data:
            return [Completion(a, require_text(data[a], f"data.{a}")), Completion(b, require_text(data[b], f"data.{b}"))]
    raise InvalidRecord("no pair of response fields in task data (e.g. answer1/answer2)")


def _ranker_order(item: dict, cfg: LabelConfig) -> list[list[str]]:
    ranker = item.get("value", {}).get("ranker")
    if not isinstance(ranker, dict):
        raise InvalidRecord("ranker result has no value.ranker object")
    name = item.get("from_name")
    if name in ranker and len(ranker) == 1:
        ids = ranker[name]
        if not isinstance(ids, list):
            raise InvalidRecord(f"value.ranker.{name} must be a list of ids")
        return [[str(i)] for i in ids]
    buckets = [b for b in ranker if b != "_"]
    known = [b for b in cfg.bucket_order if b in buckets]
    order = known + [b for b in buckets if b not in known]
    blocks = []
    for b in order:
        if not isinstance(ranker[b], list):
            raise InvalidRecord(f"value.ranker.{b} must be a list of ids")
        if ranker[b]:
            blocks.append([str(i) for i in ranker[b]])
    return blocks


def _choice_order(choice: Any, pair: list[Completion]) -> list[list[str]]:
    if not isinstance(choice, str):
        raise InvalidRecord(f"choice must be a string, got {choice!r}")
    a, b = pair[0].id, pair[1].id
    if TIE_WORDS.match(choice):
        return [[a, b]]
    if choice == a or FIRST.search(choice):
        return [[a], [b]]
    if choice == b or SECOND.search(choice):
        return [[b], [a]]
    raise InvalidRecord(f"choice {choice!r} names neither response nor a tie")


def _ranking_result(result: Any) -> dict:
    if not isinstance(result, list):
        raise InvalidRecord(f"annotation result must be a list, got {type(result).__name__}")
    usable = [r for r in result if isinstance(r, dict) and r.get("type") in ("ranker", "pairwise", "choices")]
    if not usable:
        raise InvalidRecord("annotation has no ranker, pairwise or choices result")
    return usable[0]


def ranking_from_annotation(task: dict, annotation: dict, cfg: LabelConfig, source: str) -> Ranking:
    data = task.get("data")
    if not isinstance(data, dict) or not data:
        raise InvalidRecord("task has no data")
    prompt = _prompt_of(data, cfg)
    item = _ranking_result(annotation.get("result"))
    if cfg.controls and item.get("from_name") not in cfg.controls:
        # a result for another control (or a renamed one) must not be read as this ranking
        raise InvalidRecord(f"result from_name {item.get('from_name')!r} is not a control of the label config "
                            f"({', '.join(sorted(cfg.controls))})")
    presented = None
    if item["type"] == "ranker":
        _, completions = _items_of(data, cfg)
        order = _ranker_order(item, cfg)
        presented = [c.id for c in completions]
    else:
        completions = _pair_of(data, cfg)
        value = item.get("value", {})
        if item["type"] == "pairwise":
            selected = value.get("selected")
            if selected not in ("left", "right"):
                raise InvalidRecord(f"pairwise value.selected must be 'left' or 'right', got {selected!r}")
            ids = [c.id for c in completions]
            order = [[ids[0]], [ids[1]]] if selected == "left" else [[ids[1]], [ids[0]]]
        else:
            choices = value.get("choices")
            if not isinstance(choices, list) or len(choices) != 1:
                raise InvalidRecord(f"choices result must hold exactly one choice, got {choices!r}")
            order = _choice_order(choices[0], completions)
    ranking = Ranking(
        prompt_id=text_id(prompt),
        prompt=prompt,
        completions=completions,
        order=order,
        annotator=annotator_id(annotation.get("completed_by")),
        source=source,
        timestamp=annotation.get("updated_at") or annotation.get("created_at"),
        presented_order=presented,
        meta={"task_id": task.get("id"), "annotation_id": annotation.get("id"),
              **({"reannotation": True} if data.get(REANNOTATE_FIELD) else {})},
    )
    return validate_ranking(ranking)


def annotator_id(completed_by: Any) -> str:
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    return f"ls:{completed_by}"


def _when(annotation: dict) -> datetime:
    when = parse_time(annotation.get("updated_at") or annotation.get("created_at"))
    return when or datetime.min.replace(tzinfo=timezone.utc)


def latest_per_annotator(annotations: list[dict]) -> tuple[list[dict], int]:
    """Keeps each annotator's most recently updated annotation; returns (kept, superseded)."""
    latest: dict[str, dict] = {}
    for a in annotations:
        who = annotator_id(a.get("completed_by"))
        if who not in latest or _when(a) >= _when(latest[who]):
            latest[who] = a
    return list(latest.values()), len(annotations) - len(latest)


def rankings_from_tasks(
    tasks: list[tuple[str, Any]], quarantine: Quarantine, cfg: LabelConfig, source: str
) -> ConversionResult:
    """Converts (locator, task) pairs; shared by file exports and live pulls from the server."""
    out = ConversionResult()
    for locator, task in tasks:
        if not isinstance(task, dict):
            quarantine.add(locator, f"task must be an object, got {type(task).__name__}", task)
            continue
        locator = f"task {task.get('id', locator)}"
        annotations = task.get("annotations")
        if not isinstance(annotations, list):
            quarantine.add(locator, "task has no annotations list", task)
            continue
        live = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
        out.cancelled += sum(1 for a in annotations if isinstance(a, dict) and a.get("was_cancelled"))
        bad = [a for a in annotations if not isinstance(a, dict)]
        for a in bad:
            quarantine.add(locator, "annotation must be an object", a)
        kept, superseded = latest_per_annotator(live)
        out.superseded += superseded
        for a in kept:
            try:
                out.rankings.append(ranking_from_annotation(task, a, cfg, source))
            except InvalidRecord as e:
                quarantine.add(f"{locator} annotation {a.get('id')}", str(e), {"task": task, "annotation": a})
    out.rankings, out.relabelled = supersede_relabelled_pairs(out.rankings)
    return out


def rankings_from_label_studio(
    path: Path,
    strict: bool = False,
    prompt_field: str | None = None,
    items_field: str | None = None,
    label_config: str | None = None,
) -> ConversionResult:
    cfg = LabelConfig.from_xml(label_config) if label_config else LabelConfig()
    cfg.prompt_field = prompt_field or cfg.prompt_field
    cfg.items_field = items_field or cfg.items_field
    q = Quarantine(str(path), strict)
    out = rankings_from_tasks(list(iter_json_records(path, q)), q, cfg, source=f"label-studio:{path.name}")
    out.sources = [path]
    out.quarantined = q.records
    return out
