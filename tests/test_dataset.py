from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rmcore.converters.common import ConversionResult
from rmcore.dataset import load_groups, load_pairs, read_manifest, split_of, write_preference_dataset
from rmcore.sweep import write_selection_dataset
from rmcore.synthetic import synthetic_items, synthetic_rankings

ROOT = Path(__file__).resolve().parents[1]


def rmflow(*args: str, cwd: Path = ROOT) -> dict:
    """Runs the CLI; returns the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", "rmflow", *args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_split_by_prompt_hash_is_deterministic_and_disjoint(tmp_path):
    rankings = synthetic_rankings(synthetic_items(120, k=3, seed=5), annotators=2, seed=1)
    manifest = write_preference_dataset(ConversionResult(rankings=rankings), tmp_path, {"kind": "t"})
    groups = load_groups(tmp_path)
    prompts = {s: set(groups[s]["prompt"]) for s in groups}
    assert not (prompts["train"] & prompts["validation"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["validation"] & prompts["test"])
    for split, ps in prompts.items():
        assert all(split_of(p, (0.8, 0.1, 0.1)) == split for p in ps)
    assert manifest["groups"] == 240 and manifest["pairs"] == 240 * 3
    assert sum(manifest["splits"].values()) == manifest["pairs"]
    assert load_pairs(tmp_path)["train"].num_rows == manifest["splits"]["train"]


def test_a_sweeps_selection_set_takes_whole_training_prompts_and_drops_the_test_split(tmp_path):
    """What `rmflow tune`'s trials see: a quarter of the training prompts moved (every annotator's group of a
    prompt together) into validation, the validation split kept whole, the test split gone; the same seed
    moves the same prompts, another seed others; a fraction that moves nothing is refused, naming the folder."""
    rankings = synthetic_rankings(synthetic_items(120, k=3, seed=5), annotators=2, seed=1)
    write_preference_dataset(ConversionResult(rankings=rankings), tmp_path / "d", {"kind": "t"})
    source = load_groups(tmp_path / "d")
    manifest = write_selection_dataset(tmp_path / "d", tmp_path / "s", 0.25, seed=0)
    sel = load_groups(tmp_path / "s")
    prompts = {s: set(sel[s]["prompt"]) for s in sel}
    moved = prompts["validation"] - set(source["validation"]["prompt"])
    assert moved and moved <= set(source["train"]["prompt"]) and not (prompts["train"] & prompts["validation"])
    assert set(source["validation"]["prompt"]) <= prompts["validation"] and prompts["train"] | moved == set(source["train"]["prompt"])
    assert 0.15 < len(moved) / len(set(source["train"]["prompt"])) < 0.35
    assert sel["validation"].num_rows == source["validation"].num_rows + 2 * len(moved)  # both annotators' groups
    def as_labelled(rows):
        return sorted((r["group_id"], r["completions"], r["pairs"], r["margins"], r["ties"]) for r in rows)
    assert as_labelled(sel["train"].to_list() + sel["validation"].to_list()) == as_labelled(
        source["train"].to_list() + source["validation"].to_list())  # moved as they were, nothing lost or changed
    assert manifest["splits"]["test"] == 0 and load_pairs(tmp_path / "s")["test"].num_rows == 0
    assert manifest["splits"]["train"] + manifest["splits"]["validation"] == sum(
        read_manifest(tmp_path / "d")["splits"][s] for s in ("train", "validation"))
    assert write_selection_dataset(tmp_path / "d", tmp_path / "s2", 0.25, seed=0)["version"] == manifest["version"]
    other = write_selection_dataset(tmp_path / "d", tmp_path / "s3", 0.25, seed=1)
    assert set(load_groups(tmp_path / "s3")["train"]["prompt"]) != prompts["train"] and other["version"] != manifest["version"]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "d"))):
        write_selection_dataset(tmp_path / "d", tmp_path / "s4", 1e-6)


def test_version_is_stable_for_same_inputs_and_changes_with_data_or_options(tmp_path):
    rankings = synthetic_rankings(synthetic_items(30, seed=3), seed=4)
    v1 = write_preference_dataset(ConversionResult(rankings=rankings), tmp_path / "a", {"kind": "t"})["version"]
    v2 = write_preference_dataset(ConversionResult(rankings=list(rankings)), tmp_path / "b", {"kind": "t"})["version"]
    v3 = write_preference_dataset(ConversionResult(rankings=rankings[:-1]), tmp_path / "c", {"kind": "t"})["version"]
    v4 = write_preference_dataset(ConversionResult(rankings=rankings), tmp_path / "d", {"kind": "t", "x": 1})["version"]
    assert v1 == v2 and len({v1, v3, v4}) == 3


def test_duplicate_rankings_are_dropped_and_counted(tmp_path):
    rankings = synthetic_rankings(synthetic_items(10, seed=3), seed=4)
    manifest = write_preference_dataset(ConversionResult(rankings=rankings + rankings[:4]), tmp_path, {})
    assert manifest["groups"] == 10 and manifest["duplicates"] == 4


def test_cli_convert_qa_feedback_counts_and_stable_version(shared_data, tmp_path):
    src = shared_data / "qa-feedback" / "dev_feedback_400.json"
    first = rmflow("convert", "qa-feedback", str(src), "--out", str(tmp_path / "a"))
    assert {k: first[k] for k in ("prompts", "pairs", "ties", "groups", "quarantined")} == {
        "prompts": 400, "pairs": 2104, "ties": 296, "groups": 400, "quarantined": 0}
    assert rmflow("convert", "qa-feedback", str(src), "--out", str(tmp_path / "b"))["version"] == first["version"]
    assert sum(first["splits"].values()) == 2104
    manifest = read_manifest(tmp_path / "a")
    assert manifest["sources"][0]["sha256"] and manifest["version"] == first["version"]


def test_cli_convert_hh_rlhf_counts(shared_data, tmp_path):
    src = shared_data / "hh-rlhf" / "harmless-base-test-first1000.jsonl.gz"
    result = rmflow("convert", "hh-rlhf", str(src), "--out", str(tmp_path))
    assert (result["prompts"], result["pairs"], result["ties"], result["groups"]) == (1000, 1000, 0, 1000)


def test_cli_convert_quarantine_file_and_strict_exit(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p2"}\n')
    result = rmflow("convert", "trl", str(src), "--out", str(tmp_path / "ds"))
    assert result["pairs"] == 1 and result["quarantined"] == 1
    entry = json.loads((tmp_path / "ds" / "quarantine.jsonl").read_text().splitlines()[0])
    assert entry["locator"] == "line 2" and "missing field 'chosen'" in entry["reason"]
    proc = subprocess.run([sys.executable, "-m", "rmflow", "convert", "trl", str(src), "--out", str(tmp_path / "s"), "--strict"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "line 2: missing field 'chosen'" in json.loads(proc.stdout.strip().splitlines()[-1])["error"]


def test_cli_last_line_is_strict_json_even_with_nan():
    import io
    from contextlib import redirect_stdout

    from rmflow.output import emit

    buf = io.StringIO()
    with redirect_stdout(buf):
        emit({"accuracy": float("nan"), "nested": {"x": [float("inf"), 1.0]}})
    assert json.loads(buf.getvalue(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == {
        "accuracy": None, "nested": {"x": [None, 1.0]}}
