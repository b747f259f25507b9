"""`bench/gpu_check.sh`: arguments, the plan, JSON lines, the exit status when there is no GPU, and
the `--cpu` rehearsal of every check through the same entry points, with what the GPU machine lacks
made unimportable."""
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
    assert args.only == ["train", "fsdp", "mfu"] and args.sizes == ["0.5b", "1.5b"] and not args.cpu
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
    assert rows[0]["check"] == "env" and rows[0]["ok"] is False and "no CUDA device" in rows[0]["error"]
    assert rows[1]["check"] == "fsdp" and "not run: the env check failed" in rows[1]["error"]
    assert rows[-1] == {"gpu_check": "done", "ok": False, "failed": ["env", "fsdp"]}


def test_a_failing_check_is_reported_and_the_next_one_still_runs(capsys):
    def broken() -> dict:
        raise ValueError("boom")

    rows = [gpu_check.run_check("a", broken), gpu_check.run_check("b", lambda: {"x": 1})]
    assert rows[0]["ok"] is False and rows[0]["error"] == "ValueError: boom" and rows[1] == {"check": "b", "ok": True, "x": 1,
                                                                                               "seconds": rows[1]["seconds"]}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["check"] for r in printed] == ["a", "b"]


def test_a_python_without_rmflow_s_packages_gets_a_json_row_naming_them():
    """A bare interpreter (here: without torch): the script still answers in JSON, naming what is
    missing, and runs nothing else."""
    bare = subprocess.run([sys.executable, "-I", "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True).stdout.strip()
    python = Path(bare) / "bin" / "python3"
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the base interpreter has torch")
    out = subprocess.run(["bash", str(SCRIPT), "--cpu", "--only", "train"], capture_output=True, text=True,
                         env=os.environ | {"RMFLOW_PYTHON": str(python), "RMFLOW_WHEELS": "/nonexistent"}, timeout=120)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and rows[0]["check"] == "env" and "missing modules: torch" in rows[0]["error"]
    assert [r.get("check") for r in rows] == ["env", "train", None] and "Traceback" not in out.stdout


# The GPU machine's Python lacks these, and nothing carries them (gpu_check.ABSENT). Every finder
# answers "not installed" for them, as on that machine (transformers probes optional packages with
# find_spec, so they must be absent, not raise), in the rehearsal's torchrun workers and bench
# subprocesses too, through sitecustomize.
BLOCK = """
import sys
BLOCKED = {blocked!r}
class _Absent:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [_Absent(f) for f in sys.meta_path]
"""


@pytest.mark.slow
def test_the_cpu_rehearsal_passes_with_what_the_gpu_machine_lacks_unimportable(shared_data, tmp_path):
    from rmcore.model import load_tokenizer, resolve_backbone

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK.format(blocked=tuple(gpu_check.ABSENT)))
    tokenizer = tmp_path / "minilm-tokenizer"  # as bench/gpu_wheels.sh carries it: the package itself is absent there
    load_tokenizer(resolve_backbone("minilm")).save_pretrained(tokenizer)
    env = os.environ | {"RMFLOW_PYTHON": sys.executable, "PYTHONPATH": str(hook), "RMFLOW_SHARED_DATA": str(shared_data)}
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'ray'" in probe.stderr  # the hook holds
    out = subprocess.run(["bash", str(SCRIPT), "--cpu", "--tokenizer", str(tokenizer), "--work", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in out.stdout.splitlines()]  # stdout: JSON lines and nothing else
    assert rows[-1] == {"gpu_check": "done", "ok": True, "failed": []}, (rows, out.stderr[-3000:])
    by = {r.get("check"): r for r in rows}
    assert by["env"]["launcher"] == "torchrun"
    assert by["train"]["restarts"] >= 1 and by["train"]["backend"] == "gloo" and by["train"]["workers"] == 2
    assert by["fsdp"]["workers"] == 2 and "head.safetensors" in by["fsdp"]["files"]
    assert {r["system"] for r in by["mfu"]["tables"]["tiny"]} == {"padded-batch-of-8", "bucketed", "packed"}
