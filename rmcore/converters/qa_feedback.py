"""FineGrainedRLHF qa-feedback: 4 predictions per question and 6 pairwise judgements in the
order (1v2, 1v3, 1v4, 2v3, 2v4, 3v4); 1 = first preferred, 2 = second, 0 = tie.

Every strict judgement becomes a pair, even when the six are intransitive; the K-wise group's order
is the Copeland order (wins minus losses, equal scores tied). The prompt is the question alone: the grounding
passages (a median 465 words a question, over any max length the default backbone takes) are neither
fed to the model nor kept.
"""
from __future__ import annotations

import json
from itertools import combinations
from typing import Any

from rmcore.converters.common import (
    InvalidRecord,
    copeland_order,
    require_text,
    validate_ranking,
)
from rmcore.records import Completion, Judgement, Ranking, text_id

K = 4
PAIR_ORDER = list(combinations(range(1, K + 1), 2))
OUTCOME = {1: "a", 2: "b", 0: "tie"}


def _preference_list(value: Any) -> list[int]:
    if isinstance(value, str):  # the published file stores the list as a string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRecord(f"preference is not a list: {value!r}") from e
    if not isinstance(value, list) or len(value) != len(PAIR_ORDER):
        raise InvalidRecord(f"preference must list {len(PAIR_ORDER)} judgements, got {value!r}")
    if any(isinstance(v, bool) or v not in OUTCOME for v in value):
        raise InvalidRecord(f"preference values must be 0, 1 or 2, got {value!r}")
    return value


def ranking_from_qa_record(record: Any, source: str = "qa-feedback") -> Ranking:
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected an object, got {type(record).__name__}")
    for key in ["question", "preference"] + [f"prediction {i}" for i in range(1, K + 1)]:
        if key not in record:
            raise InvalidRecord(f"missing field {key!r}")
    question = require_text(record["question"], "question")
    completions = [
        Completion(f"p{i}", require_text(record[f"prediction {i}"], f"prediction {i}"))
        for i in range(1, K + 1)
    ]
    judgements = [
        Judgement(f"p{i}", f"p{j}", OUTCOME[v])
        for (i, j), v in zip(PAIR_ORDER, _preference_list(record["preference"]))
    ]
    ranking = Ranking(
        prompt_id=text_id(question),
        prompt=question,
        completions=completions,
        order=copeland_order([c.id for c in completions], judgements),
        annotator=str(record.get("annotator", "qa-feedback")),
        source=source,
        judgements=judgements,
    )
    return validate_ranking(ranking)

