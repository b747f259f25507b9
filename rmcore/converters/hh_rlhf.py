"""Anthropic hh-rlhf: `{"chosen", "rejected"}` whole dialogues sharing all but the last turn.

The prompt is the shared dialogue up to and including the final "\\n\\nAssistant:"; the
completions are the two final Assistant turns. An empty final turn is kept: in harmless-base it
is the assistant saying nothing, which annotators sometimes preferred.
"""
from __future__ import annotations

from typing import Any

from rmcore.converters.common import InvalidRecord, pairwise_ranking, require_text
from rmcore.records import Ranking

ASSISTANT = "\n\nAssistant:"


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt ending in the last Assistant marker, final assistant turn)."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        raise InvalidRecord("dialogue has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:].strip()


def ranking_from_hh_record(record: Any, source: str = "hh-rlhf") -> Ranking:
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected an object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise InvalidRecord(f"missing field {key!r}")
        require_text(record[key], key)
    prompt, chosen = split_dialogue(record["chosen"])
    prompt_r, rejected = split_dialogue(record["rejected"])
    if prompt != prompt_r:
        raise InvalidRecord("chosen and rejected do not share the dialogue before the last turn")
    return pairwise_ranking(prompt, chosen, rejected, str(record.get("annotator", "hh-rlhf")), source, allow_empty=True)

