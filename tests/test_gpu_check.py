"""`bench/gpu_check.sh`: the parts that run without a GPU — arguments, the plan, JSON lines, and
the exit status when there is no GPU. (The checks themselves ran as a CPU rehearsal, `--cpu`.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmflow.bench import gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_arguments_select_checks_and_sizes_and_refuse_unknown_ones(capsys):
    args = gpu_check.parse_args([])
    assert args.only == ["train", "mfu", "fsdp"] and args.sizes == ["0.5b", "1.5b"] and not args.cpu
    assert gpu_check.parse_args(["--only", "mfu", "--sizes", "1.5b"]).only == ["mfu"]
    for bad in (["--only", "train,nope"], ["--sizes", "7b"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2
    assert "unknown sizes: 7b" in capsys.readouterr().err


def test_the_script_prints_its_plan_as_json_lines():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "train,mfu", "--sizes", "1.5b"], capture_output=True, text=True,
                         env=os.environ | {"RMFLOW_PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"check": "train", "planned": True}, {"check": "mfu", "planned": True, "sizes": ["1.5b"]}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_fails_with_a_json_line_and_a_non_zero_status():
    out = subprocess.run(["bash", str(SCRIPT), "--only", "fsdp"], capture_output=True, text=True,
                         env=os.environ | {"RMFLOW_PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 1
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]["check"] == "cuda" and rows[0]["ok"] is False and "no CUDA device" in rows[0]["error"]
    assert rows[-1] == {"gpu_check": "done", "ok": False, "failed": ["cuda"]}


def test_a_failing_check_is_reported_and_the_next_one_still_runs(capsys):
    def broken() -> dict:
        raise ValueError("boom")

    rows = [gpu_check.run_check("a", broken), gpu_check.run_check("b", lambda: {"x": 1})]
    assert rows[0]["ok"] is False and rows[0]["error"] == "ValueError: boom" and rows[1] == {"check": "b", "ok": True, "x": 1,
                                                                                               "seconds": rows[1]["seconds"]}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["check"] for r in printed] == ["a", "b"]
