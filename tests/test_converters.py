from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmcore.converters import StrictModeError, convert_file
from rmcore.converters.common import group_from_ranking, is_intransitive, judgements_of, pairs_from_group
from rmcore.records import Judgement


def pairs_of(result) -> list[tuple[str, str, str, float]]:
    """(prompt, chosen, rejected, margin) of every strict pair."""
    out = []
    for r in result.rankings:
        out += [(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs_from_group(group_from_ranking(r))]
    return sorted(out)


def ties_of(result) -> int:
    return sum(len(group_from_ranking(r).ties) for r in result.rankings)


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


# ---------------- hh-rlhf ----------------

def test_hh_rlhf_prompt_is_shared_prefix_and_completions_are_last_turns(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Like this.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: rude q\n\nAssistant:", "rejected": "\n\nHuman: rude q\n\nAssistant: Sure, here is how."},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    result = convert_file("hh-rlhf", path)
    assert pairs_of(result) == sorted([
        ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:", "Like this.", "No.", 1.0),
        ("\n\nHuman: rude q\n\nAssistant:", "", "Sure, here is how.", 1.0),  # silence was preferred
    ])
    assert result.quarantined == []


def test_hh_rlhf_bad_lines_are_quarantined_and_good_ones_kept(tmp_path):
    good = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"})
    content = "\n".join([good, "{not json", json.dumps({"chosen": "x"}), json.dumps({"chosen": 3, "rejected": "y"}),
                         json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"})])
    result = convert_file("hh-rlhf", write(tmp_path, "hh.jsonl", content.encode() + b"\n\xff\xfe bad bytes\n"))
    assert len(result.rankings) == 1
    reasons = [q.reason for q in result.quarantined]
    assert len(reasons) == 5
    assert any("invalid JSON" in r for r in reasons)
    assert any("missing field 'rejected'" in r for r in reasons)
    assert any("chosen must be a string, got int" in r for r in reasons)
    assert any("do not share" in r for r in reasons)
    assert any("UTF-8" in r for r in reasons)
    assert {q.locator for q in result.quarantined} == {"line 2", "line 3", "line 4", "line 5", "line 6"}


def test_strict_mode_stops_at_first_bad_record_with_its_reason(tmp_path):
    path = write(tmp_path, "hh.jsonl", '{"chosen": "x"}\n')
    with pytest.raises(StrictModeError, match="line 1: missing field 'rejected'"):
        convert_file("hh-rlhf", path, strict=True)


# ---------------- qa-feedback ----------------

def qa_record(pref, preds=("A", "B", "C", "D")):
    return {"question": "Q?", "passages": [], "gold": "g", "feedback": {},
            "preference": pref, **{f"prediction {i + 1}": p for i, p in enumerate(preds)}}


def test_qa_feedback_pairs_follow_the_six_judgements_and_ties_are_not_pairs(tmp_path):
    # 1v2: 1 wins, 1v3: tie, 1v4: 4 wins, 2v3: 3 wins, 2v4: tie, 3v4: 3 wins
    result = convert_file("qa-feedback", write(tmp_path, "qa.json", [qa_record([1, 0, 2, 2, 0, 1])]))
    assert [(c, r) for _, c, r, _ in pairs_of(result)] == sorted([("A", "B"), ("D", "A"), ("C", "B"), ("C", "D")])
    assert ties_of(result) == 2
    assert len(result.rankings) == 1


def test_qa_feedback_accepts_the_preference_list_as_a_string(tmp_path):
    result = convert_file("qa-feedback", write(tmp_path, "qa.json", [qa_record("[1, 1, 1, 1, 1, 1]")]))
    assert len(pairs_of(result)) == 6 and ties_of(result) == 0
    assert result.rankings[0].order == [["p1"], ["p2"], ["p3"], ["p4"]]


def test_qa_feedback_cycle_keeps_every_judgement_and_is_counted(tmp_path):
    # 1>2, 3>1 (1v3 = 2), 2>3: a cycle among 1,2,3; all beat 4
    result = convert_file("qa-feedback", write(tmp_path, "qa.json", [qa_record([1, 2, 1, 1, 1, 1])]))
    r = result.rankings[0]
    assert is_intransitive(judgements_of(r))
    assert len(pairs_of(result)) == 6
    assert r.order == [["p1", "p2", "p3"], ["p4"]]  # Copeland: the cycle is one tie block


def test_qa_feedback_bad_records(tmp_path):
    records = [qa_record([1] * 6), qa_record([1] * 5), qa_record([1, 1, 1, 1, 1, 7]),
               qa_record([1] * 6, preds=("A", "", "C", "D")), {"question": "q"}, "not an object"]
    result = convert_file("qa-feedback", write(tmp_path, "qa.json", records))
    assert len(result.rankings) == 1
    reasons = sorted(q.reason for q in result.quarantined)
    assert len(reasons) == 5
    assert any("must list 6 judgements" in r for r in reasons)
    assert any("0, 1 or 2" in r for r in reasons)
    assert any("prediction 2 is empty" in r for r in reasons)
    assert any("missing field" in r for r in reasons)
    assert any("expected an object" in r for r in reasons)


# ---------------- trl ----------------

def test_trl_explicit_conversational_and_implicit_forms(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]},
    ]
    result = convert_file("trl", write(tmp_path, "trl.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert pairs_of(result) == sorted([
        ("What is 2+2?", "4", "5", 1.0),
        ("\n\nHuman: Hi\n\nAssistant:", "Hello!", "Go away.", 1.0),
        ("\n\nHuman: Sky?\n\nAssistant:", "Blue.", "Green.", 1.0),
    ])


def test_trl_bad_messages_are_quarantined(tmp_path):
    rows = [{"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "a"}]
    result = convert_file("trl", write(tmp_path, "trl.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert result.rankings == []
    assert [q.locator for q in result.quarantined] == ["line 1", "line 2", "line 3"]
    assert "unknown role" in result.quarantined[0].reason


# ---------------- Label Studio ----------------

ITEMS = [{"id": "a", "title": "A", "body": "answer a"}, {"id": "b", "title": "B", "body": "answer b"},
         {"id": "c", "title": "C", "body": "answer c"}]


def ls_task(task_id, result, completed_by=1, cancelled=False, updated="2026-01-01T00:00:00Z", data=None, ann_id=None):
    return {"id": task_id, "data": data if data is not None else {"prompt": f"prompt {task_id}", "items": ITEMS},
            "annotations": [{"id": ann_id or task_id * 10, "completed_by": completed_by, "was_cancelled": cancelled,
                             "updated_at": updated, "result": result}]}


def ranker(ids, name="rank"):
    return [{"from_name": name, "to_name": "results", "type": "ranker", "value": {"ranker": {name: ids}}}]


def test_label_studio_ranker_list_mode_gives_all_pairs_with_rank_distance_margins(tmp_path):
    result = convert_file("label-studio", write(tmp_path, "ls.json", [ls_task(1, ranker(["b", "a", "c"]))]))
    assert pairs_of(result) == sorted([("prompt 1", "answer b", "answer a", 1.0), ("prompt 1", "answer b", "answer c", 2.0),
                                       ("prompt 1", "answer a", "answer c", 1.0)])
    assert result.rankings[0].presented_order == ["a", "b", "c"]
    assert result.rankings[0].annotator == "ls:1"


def test_label_studio_bucket_mode_buckets_are_tie_blocks_in_config_order(tmp_path):
    result_value = [{"from_name": "rank", "to_name": "results", "type": "ranker",
                     "value": {"ranker": {"bad": ["c"], "good": ["a", "b"], "_": []}}}]
    config = ('<View><Text name="p" value="$prompt"/><List name="results" value="$items"/>'
              '<Ranker name="rank" toName="results"><Bucket name="good"/><Bucket name="bad"/></Ranker></View>')
    path = write(tmp_path, "ls.json", [ls_task(1, result_value)])
    result = convert_file("label-studio", path, label_config=config)
    assert result.rankings[0].order == [["a", "b"], ["c"]]
    assert pairs_of(result) == sorted([("prompt 1", "answer a", "answer c", 1.0), ("prompt 1", "answer b", "answer c", 1.0)])
    assert ties_of(result) == 1


def test_label_studio_pairwise_tag_and_choices_with_tie(tmp_path):
    data = {"prompt": "p", "answer1": "left text", "answer2": "right text"}
    tasks = [
        ls_task(1, [{"from_name": "comparison", "to_name": "comparison", "type": "pairwise", "value": {"selected": "right"}}], data=data),
        ls_task(2, [{"from_name": "pref", "to_name": "prompt", "type": "choices", "value": {"choices": ["Tie"]}}], data=data),
        ls_task(3, [{"from_name": "pref", "to_name": "prompt", "type": "choices", "value": {"choices": ["Response 1"]}}], data=data),
    ]
    result = convert_file("label-studio", write(tmp_path, "ls.json", tasks))
    assert pairs_of(result) == sorted([("p", "right text", "left text", 1.0), ("p", "left text", "right text", 1.0)])
    assert ties_of(result) == 1


def test_label_studio_latest_update_wins_cancelled_ignored_several_annotators(tmp_path):
    task = ls_task(1, ranker(["a", "b", "c"]), completed_by=1, updated="2026-01-01T00:00:00Z")
    task["annotations"] += [
        {"id": 11, "completed_by": 1, "was_cancelled": False, "updated_at": "2026-02-01T00:00:00Z", "result": ranker(["c", "b", "a"])},
        {"id": 12, "completed_by": 2, "was_cancelled": False, "updated_at": "2026-01-05T00:00:00Z", "result": ranker(["a", "c", "b"])},
        {"id": 13, "completed_by": 3, "was_cancelled": True, "updated_at": "2026-01-05T00:00:00Z", "result": []},
    ]
    result = convert_file("label-studio", write(tmp_path, "ls.json", [task]))
    orders = {r.annotator: r.order for r in result.rankings}
    assert orders == {"ls:1": [["c"], ["b"], ["a"]], "ls:2": [["a"], ["c"], ["b"]]}
    assert result.cancelled == 1 and result.superseded == 1


def test_label_studio_reannotation_supersedes_that_pair_only(tmp_path):
    """A re-annotation task for (a, c) with c first replaces both annotators' a>c judgements; their
    other judgements stay, and the order becomes the Copeland order of what is left."""
    task = ls_task(1, ranker(["a", "b", "c"]))
    task["annotations"].append({"id": 11, "completed_by": 2, "was_cancelled": False, "updated_at": "2026-01-02T00:00:00Z",
                                "result": ranker(["a", "c", "b"])})
    relabel_data = {"prompt": "prompt 1", "items": [ITEMS[0], ITEMS[2]], "rmflow_reannotate": {"labelled_chosen": "x"}}
    other = ls_task(3, ranker(["b", "a", "c"]), data={"prompt": "prompt 3", "items": ITEMS})
    result = convert_file("label-studio", write(tmp_path, "ls.json", [task, ls_task(2, ranker(["c", "a"]), completed_by=3, data=relabel_data), other]))
    assert result.relabelled == 2
    pairs = [p for p in pairs_of(result) if p[0] == "prompt 1"]
    assert [p for p in pairs if {p[1], p[2]} == {"answer a", "answer c"}] == [("prompt 1", "answer c", "answer a", 1.0)]
    assert len(pairs) == 5  # 2 kept from each annotator + the re-annotation
    assert len([p for p in pairs_of(result) if p[0] == "prompt 3"]) == 3  # other prompts untouched
    kept = {r.annotator: r.order for r in result.rankings if r.prompt == "prompt 1" and not r.meta.get("reannotation")}
    assert kept == {"ls:1": [["a"], ["b"], ["c"]], "ls:2": [["a", "c"], ["b"]]}


def test_label_studio_malformed_records_each_quarantined_with_reason(tmp_path):
    tasks = [
        ls_task(1, ranker(["a", "b", "c"])),
        ls_task(2, ranker(["a", "zz", "c"])),  # unknown id
        ls_task(3, ranker(["a", "a", "c"])),  # duplicate id
        ls_task(4, ranker(["a", "b"]), data={}),  # task without data
        ls_task(5, ranker(["a", "b"]), data={"prompt": "", "items": ITEMS}),  # empty prompt
        ls_task(6, ranker(["a", "b"]), data={"prompt": "p", "items": [{"id": "a", "body": 5}, {"id": "b", "body": "x"}]}),
        ls_task(7, [{"type": "ranker", "from_name": "rank", "value": {"ranker": "oops"}}]),  # wrong type
        ls_task(8, []),  # no result
        ls_task(9, ranker(["c", "b", "a"])),
    ]
    result = convert_file("label-studio", write(tmp_path, "ls.json", tasks))
    assert sorted(r.meta["task_id"] for r in result.rankings) == [1, 9]
    reasons = {q.locator.split()[1]: q.reason for q in result.quarantined}
    assert "unknown completion ids ['zz']" in reasons["2"]
    assert "twice" in reasons["3"]
    assert reasons["4"] == "task has no data"
    assert reasons["5"] == "data.prompt is empty"
    assert "must be a string, got int" in reasons["6"]
    assert "value.ranker" in reasons["7"]
    assert "no ranker, pairwise or choices result" in reasons["8"]


def test_label_studio_corrupt_element_in_array_costs_only_that_element(tmp_path):
    good = [json.dumps(ls_task(i, ranker(["a", "b", "c"]))) for i in (1, 2, 3)]
    text = "[\n" + good[0] + ",\n" + '{"id": 99, "data": {"prompt": "x", oops}' + ",\n" + good[1] + ",\n" + good[2] + "\n]"
    result = convert_file("label-studio", write(tmp_path, "ls.json", text))
    assert sorted(r.meta["task_id"] for r in result.rankings) == [1, 2, 3]
    assert len(result.quarantined) == 1 and "invalid JSON" in result.quarantined[0].reason


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.one_of(
    junk,
    st.builds(lambda r: ls_task(100, r), junk),
    st.builds(lambda d: ls_task(101, ranker(["a", "b"]), data=d), junk),
    st.builds(lambda ids: ls_task(102, ranker(ids)), st.lists(st.sampled_from(["a", "b", "c", "x", 1, None]), max_size=4)),
), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_fuzzed_exports_keep_every_good_record(tmp_path, bad, seed):
    import random

    good = [ls_task(i, ranker(random.Random(seed + i).sample(["a", "b", "c"], 3))) for i in range(1, 6)]
    mixed = good + bad
    random.Random(seed).shuffle(mixed)
    result = convert_file("label-studio", write(tmp_path, "fuzz.json", mixed))
    got = {r.meta["task_id"]: r.order for r in result.rankings if r.meta["task_id"] in range(1, 6)}
    expected = {t["id"]: [[i] for i in t["annotations"][0]["result"][0]["value"]["ranker"]["rank"]] for t in good}
    assert got == expected
    # every record is accounted for: a ranking, a quarantine entry, or (valid fuzz) a ranking too
    assert len(result.rankings) + len(result.quarantined) >= len(mixed) - sum(1 for b in bad if isinstance(b, dict) and b.get("annotations") == [])
    for q in result.quarantined:
        assert q.reason


def test_judgements_from_order_cover_pairs_and_ties():
    from rmcore.records import Completion, Ranking

    r = Ranking("p", "prompt", [Completion(i, i) for i in "abcd"], order=[["a"], ["b", "c"], ["d"]])
    js = judgements_of(r)
    assert sorted((j.a, j.b) for j in js if j.outcome == "a") == sorted([("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")])
    assert [(j.a, j.b) for j in js if j.outcome == "tie"] == [("b", "c")]
    g = group_from_ranking(r)
    assert asdict(g)["blocks"] == [0, 1, 1, 2]
    assert not is_intransitive([Judgement("a", "b", "a"), Judgement("b", "c", "a")])


def test_label_studio_dialogue_prompt_keeps_its_turns(tmp_path):
    """A task whose prompt is a conversation (messages) keeps it as turns, which a chat-template
    backbone renders as messages again."""
    from rmcore.batching import to_messages

    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tea?"}]
    result = convert_file("label-studio", write(tmp_path, "ls.json", [ls_task(1, ranker(["b", "a", "c"]),
                                                                               data={"prompt": dialogue, "items": ITEMS})]))
    assert to_messages(result.rankings[0].prompt) == dialogue
