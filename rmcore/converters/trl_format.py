"""TRL preference format: explicit `prompt`/`chosen`/`rejected` (strings or message lists) and the
implicit-prompt form where `chosen`/`rejected` are whole conversations sharing a prefix.

Conversations are rendered as "\\n\\nHuman: …\\n\\nAssistant: …" (the hh-rlhf layout), so a
model trained on either source sees the same text shape.
"""
from __future__ import annotations

from typing import Any

from rmcore.converters.common import InvalidRecord, pairwise_ranking, require_text
from rmcore.converters.hh_rlhf import split_dialogue
from rmcore.records import Ranking

ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


def render_messages(messages: Any, what: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord(f"{what} must be a non-empty list of messages")
    parts = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRecord(f"{what}[{n}] must be an object with 'role' and 'content'")
        role = ROLE_NAMES.get(str(m["role"]).lower())
        if role is None:
            raise InvalidRecord(f"{what}[{n}] has unknown role {m['role']!r}")
        parts.append(f"\n\n{role}: {require_text(m['content'], f'{what}[{n}].content', allow_empty=True)}")
    return "".join(parts)


def _as_text(value: Any, what: str) -> str:
    return render_messages(value, what) if isinstance(value, list) else require_text(value, what)


def _completion_text(value: Any, what: str) -> str:
    if isinstance(value, list):  # the assistant turn(s) that follow the prompt
        return "".join(require_text(m.get("content"), f"{what} content") for m in value if isinstance(m, dict))
    return require_text(value, what)


def ranking_from_trl_record(record: Any, source: str = "trl") -> Ranking:
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected an object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise InvalidRecord(f"missing field {key!r}")
    if "prompt" in record:
        prompt = _as_text(record["prompt"], "prompt")
        if isinstance(record["prompt"], list):
            prompt += "\n\nAssistant:"
        chosen = _completion_text(record["chosen"], "chosen").strip()
        rejected = _completion_text(record["rejected"], "rejected").strip()
    else:
        prompt, chosen = split_dialogue(_as_text(record["chosen"], "chosen"))
        prompt_r, rejected = split_dialogue(_as_text(record["rejected"], "rejected"))
        if prompt != prompt_r:
            raise InvalidRecord("implicit prompt: chosen and rejected do not share a prefix")
    return pairwise_ranking(prompt, chosen, rejected, str(record.get("annotator", "trl")), source)

