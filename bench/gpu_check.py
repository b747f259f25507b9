"""Everything of rmflow that needs a GPU, in one call (`bench/gpu_check.sh`, under 8 minutes on one
H100). One JSON line per check on stdout — `{"check": …, "ok": true|false, "seconds": …, …}` — and a
last line with the whole result; the exit status is non-zero when any check failed.

Checks (`--only` picks some):
- `train`: `rmflow train --gpu --workers 1 --ray` on hh-rlhf with a small random Qwen2-shaped
  decoder: the nccl path, bf16 autocast, packing on by default; a worker is SIGKILLed after the
  first checkpoint and the run must resume from it and train every prompt group exactly once.
- `mfu`: `rmflow bench packing` on CUDA for each `--sizes` (random-init Qwen2 0.5B / 1.5B shapes,
  real hh-rlhf lengths): padded batch-of-8 vs length-bucketed vs packed, pairs/s and MFU on useful
  tokens, in the same run. The issue's targets (1.5B packed ≥ 40 % MFU and ≥ 5× the padded pairs/s)
  are reported as `targets`; a missed target is a finding, not a failed check.
- `fsdp`: `--parallel-strategy fsdp` with one GPU worker (world size 1): trains, saves a model
  folder in the ddp format, and the reloaded folder scores the validation split as the run did.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKS = ("train", "mfu", "fsdp")
SIZES = ("0.5b", "1.5b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CHECKS), help=f"Comma-separated checks to run, of {', '.join(CHECKS)}.")
    p.add_argument("--sizes", default=",".join(SIZES), help="Decoder sizes for the mfu check.")
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                   help="The folder holding hh-rlhf/ (the project's ../shared/data).")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one, removed after).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan, one JSON line per check, and run nothing.")
    p.add_argument("--cpu", action="store_true", help="Rehearse the same checks on the CPU (gloo, fp32, 150 hh-rlhf "
                   "records, 256 tokens, the tiny decoder for mfu): to try the script where no GPU is at hand.")
    args = p.parse_args(argv)
    args.only = [c for c in args.only.split(",") if c]
    args.sizes = [s for s in args.sizes.split(",") if s]
    if bad := sorted(set(args.only) - set(CHECKS)):
        p.error(f"unknown checks: {', '.join(bad)} (known: {', '.join(CHECKS)})")
    if bad := sorted(set(args.sizes) - set(SIZES)):
        p.error(f"unknown sizes: {', '.join(bad)} (known: {', '.join(SIZES)})")
    return args


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str), flush=True)


def run_check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one check; any exception is a failed check with its error, never an abort."""
    started = time.perf_counter()
    try:
        row = {"check": name, "ok": True} | fn()
    except Exception as e:  # a check's failure is reported, and the next check still runs
        row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
               "trace": traceback.format_exc(limit=6)[-3000:]}
    row["seconds"] = round(time.perf_counter() - started, 1)
    emit(row)
    return row


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _small_decoder(work: Path) -> Path:
    from rmflow.bench.packing import random_decoder

    out = work / "decoder-small"
    if not out.exists():
        random_decoder("tiny", out, "cpu")
    return out


def _rmflow(args: list[str], timeout: float) -> dict[str, Any]:
    """`rmflow ARGS` in a subprocess (its Ray runtime a descendant of this process); its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", "rmflow.cli", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rmflow {args[0]} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Target:
    """Where the checks run: the GPU (the real thing) or a CPU rehearsal of the same steps."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu
        self.device = "cpu" if cpu else "cuda"
        self.gpu_flag = [] if cpu else ["--gpu"]
        self.limit = 150 if cpu else None
        self.max_length = "256" if cpu else "1024"


def check_train(work: Path, data: Path, t: Target) -> dict[str, Any]:
    from rmflow.bench.faults import kill_a_worker_after_first_checkpoint

    storage, killed = work / "ray-train", []
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(storage, killed, 300), daemon=True)
    watcher.start()
    summary = _rmflow(["train", "--data", str(data), "--backbone", str(_small_decoder(work)), "--out", str(work / "model-train"),
                       *t.gpu_flag, "--workers", "1", "--ray", "--max-length", t.max_length, "--checkpoint-every", "5",
                       "--pairs-per-step", "16", "--storage-path", str(storage), "--max-failures", "2"], timeout=360)
    watcher.join(timeout=5)
    _require(bool(killed), "no worker was killed: the run ended before its first checkpoint")
    _require(summary["restarts"] >= 1 and summary["resumed_from_step"] >= 5, f"did not resume: {summary}")
    from rmcore.train import split_rows

    expected = sum(len(r["pairs"]) for r in split_rows(data, "train"))
    _require(summary["pairs_trained"] == expected, f"{summary['pairs_trained']} pairs trained, not each of {expected} once")
    _require(summary.get("packing") is not t.cpu, "packing was not on by default on GPU (or was on the CPU)")
    return {k: summary.get(k) for k in ("pairs_per_s", "val_accuracy", "restarts", "resumed_from_step", "packing", "worker_nodes")}


def check_mfu(work: Path, sizes: list[str], shared: Path, t: Target) -> dict[str, Any]:
    from rmflow.bench.packing import main as packing

    extra = ["--limit", str(t.limit), "--max-length", t.max_length] if t.limit else []
    tables = {size: packing(["--size", size, "--device", t.device, "--shared", str(shared), *extra])["rows"]
              for size in (["tiny"] if t.cpu else sizes)}
    targets = {}
    if "1.5b" in tables:
        rows = {r["system"]: r for r in tables["1.5b"]}
        targets = {"1.5b_packed_mfu_ge_0.40": rows["packed"]["mfu"] >= 0.40,
                   "1.5b_packed_ge_5x_padded8": rows["packed"]["pairs_per_s"] >= 5 * rows["padded-batch-of-8"]["pairs_per_s"],
                   "packed_ahead_of_bucketed": rows["packed"]["pairs_per_s"] > rows["bucketed"]["pairs_per_s"]}
    return {"tables": tables, "targets": targets}


def check_fsdp(work: Path, data: Path, t: Target) -> dict[str, Any]:
    from rmcore.evaluate import evaluate_saved_model
    from rmcore.model import RewardModel

    out = work / "model-fsdp"
    summary = _rmflow(["train", "--data", str(data), "--backbone", str(_small_decoder(work)), "--out", str(out), *t.gpu_flag,
                       "--workers", "1", "--parallel-strategy", "fsdp", "--max-length", t.max_length,
                       "--storage-path", str(work / "ray-fsdp")], timeout=300)
    RewardModel.load(out)  # the ddp layout: backbone/, head.safetensors, rmflow_model.json
    saved = evaluate_saved_model(out, data, "validation", device=t.device).metrics
    _require(abs(saved["margin_mean"] - summary["val_margin_mean"]) <= 0.02 * max(1.0, abs(summary["val_margin_mean"])),
             f"the reloaded model scores differently: {saved['margin_mean']} vs {summary['val_margin_mean']}")
    return {"val_accuracy": summary["val_accuracy"], "reloaded_margin_mean": saved["margin_mean"],
            "run_margin_mean": summary["val_margin_mean"], "files": sorted(p.name for p in out.iterdir())}


def _no_cuda() -> dict[str, Any]:
    raise RuntimeError("no CUDA device visible to torch: run this on a GPU machine")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for name in args.only:
            emit({"check": name, "planned": True} | ({"sizes": args.sizes} if name == "mfu" else {}))
        return 0
    import torch

    rows: list[dict[str, Any]] = []
    t = Target(args.cpu)
    if not t.cpu and not torch.cuda.is_available():
        rows.append(run_check("cuda", _no_cuda))
    else:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            work = Path(tmp)
            from rmflow.bench.train_vs_trl import prepare

            data = prepare("hh-rlhf", args.shared, work, t.limit)
            if not t.cpu:
                rows.append(run_check("cuda", lambda: {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}))
            steps = {"train": lambda: check_train(work, data, t), "mfu": lambda: check_mfu(work, args.sizes, args.shared, t),
                     "fsdp": lambda: check_fsdp(work, data, t)}
            rows += [run_check(name, steps[name]) for name in args.only]
    ok = all(r["ok"] for r in rows)
    emit({"gpu_check": "done", "ok": ok, "failed": [r["check"] for r in rows if not r["ok"]]})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
