"""rmflow's training loop under `torchrun`: for GPU boxes and Slurm without Ray, and for the GPU check
on a machine where Ray is not installed. The same loop Ray Train runs (`rmcore.train`), wrapped the
same way (`ray_train.prepare_for`: DDP or FSDP2), with the same checkpoint files and summary.

    torchrun --nproc_per_node 8 -m rmflow.infra.torchrun --data DS --out MODEL --set scale.use_gpu=true
    python -m torch.distributed.run --nproc_per_node 2 -m rmflow.infra.torchrun --data DS --out MODEL

nccl with one GPU per local rank when `scale.use_gpu`, else gloo on the CPU. A checkpoint every
`scale.checkpoint_every` steps goes to `--checkpoints` (default MODEL.checkpoints/): one folder per
step, rank 0's `state.pt`, every rank's `trained_rank{r}.json`, and a `complete` marker written
last. With `torchrun --max-restarts N`, a failed worker restarts the group and the new attempt
resumes from the newest complete checkpoint (`restarts`, `resumed_from_step` in the summary); each
attempt's process group meets under its own prefix of torchrun's store (`attempt_store`).
Rank 0 prints the summary as the last stdout line (and to `--summary`). Imports torch, transformers
and rmcore only: no Ray, Prefect or MLflow.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rmcore.config import RunConfig, load_run_config
from rmcore.train import WorkerContext, train_reward_model
from rmflow.infra.ray_train import STATE_FILE, merge_ranks, prepare_for, prepare_out_dir, read_checkpoint

COMPLETE = "complete"  # written last: a checkpoint folder without it was cut short and is never resumed
KEEP = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="Dataset folder (`rmflow convert`), read by every rank.")
    p.add_argument("--out", type=Path, required=True, help="Where rank 0 saves the model (new, empty, or an earlier rmflow model).")
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON RunConfig.")
    p.add_argument("--set", dest="sets", action="append", default=[], help="section.field=value (repeatable).")
    p.add_argument("--checkpoints", type=Path, default=None, help="Checkpoint folder (default: OUT.checkpoints).")
    p.add_argument("--resume", action="store_true", help="A first attempt may resume from --checkpoints (restarts always do).")
    p.add_argument("--summary", type=Path, default=None, help="Also write rank 0's summary JSON here.")
    p.add_argument("--timeout-s", type=float, default=600,
                   help="A collective that waits longer fails the run (and torchrun restarts it) instead of hanging.")
    args = p.parse_args(argv)
    args.checkpoints = args.checkpoints or args.out.with_name(args.out.name + ".checkpoints")
    return args


def run_config(args: argparse.Namespace, world: int) -> RunConfig:
    from rmflow.options import parse_sets

    cfg = load_run_config(args.config, parse_sets(args.sets))
    return cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"workers": world}),
                                  "device": "cuda" if cfg.scale.use_gpu else "cpu"})


def newest_checkpoint(root: Path) -> Path | None:
    done = sorted(root.glob(f"step-*/{COMPLETE}"))
    return done[-1].parent if done else None


def checkpoint_saver(root: Path, rank: int):
    """`WorkerContext.save_checkpoint` for this rank: every rank calls it at the same step."""

    def save(state: dict[str, Any], metrics: dict[str, Any]) -> None:
        folder = root / f"step-{metrics['step']:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        trained = state.pop("trained")
        if rank == 0:
            torch.save(state, folder / f"{STATE_FILE}.part")
            (folder / f"{STATE_FILE}.part").rename(folder / STATE_FILE)
        (folder / f"trained_rank{rank}.json").write_text(json.dumps(trained))
        dist.barrier()  # every rank's files are written
        if rank == 0:
            (folder / COMPLETE).write_text(json.dumps(metrics, default=float))
            for old in [f.parent for f in sorted(root.glob(f"step-*/{COMPLETE}"))][:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)

    return save


def attempt_store(restarts: int, world: int, timeout: timedelta) -> dist.Store | None:
    """The store this attempt's process group meets in: torchrun's agent store under a prefix of its own
    per restart. The agent (c10d rendezvous, torch >= 2.5) keeps one store server for every restart and
    torch adds no per-attempt prefix (pytorch/pytorch#135712), so a restarted rank read the dead
    attempt's gloo addresses (or NCCL unique id) and hung in connectFullMesh until its timeout. The
    restart count is the same on every rank of one node, not across nodes (an agent whose workers did
    not fail restarts them without counting), so several nodes with restarts are refused: they need
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, with which torchrun gives every attempt a fresh store and this
    returns None (torch's env:// rendezvous), as it does for a static rendezvous."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise SystemExit("torchrun on several nodes with --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                         "environment (its shared store would hand a restarted group the dead attempt's addresses)")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"rmflow/attempt_{restarts}", store)


def leave_together(rank: int, world: int, timeout: timedelta) -> None:
    """Returns once every rank is done with its collectives. gloo aborts a rank ("terminate called
    without an active exception") whose peer tears its pairs down while it is still in a collective,
    and a gloo barrier alone does not prevent it: a rank may leave the barrier, and the process, before
    its last message reached a peer still inside. So after it, each rank marks itself done in the
    process group's store (TCP, not gloo pairs) and waits for the others' marks. Rank 0 may host that
    store (env:// rendezvous): it leaves last, once every other rank has said it is past its wait."""
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.set(f"rmflow/done/{rank}", "1")
    store.wait([f"rmflow/done/{r}" for r in range(world)], timeout)
    if rank:
        store.set(f"rmflow/left/{rank}", "1")
    else:
        store.wait([f"rmflow/left/{r}" for r in range(1, world)], timeout)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("rmflow.infra.torchrun runs under torchrun (or python -m torch.distributed.run), which sets RANK and WORLD_SIZE")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    cfg = run_config(args, world)
    prepare_out_dir(args.out)
    resume_dir = newest_checkpoint(args.checkpoints)
    if resume_dir is not None and not (restarts or args.resume):
        raise SystemExit(f"{args.checkpoints} holds checkpoints of another run: pass --resume to continue it, or another --checkpoints")
    if cfg.scale.use_gpu:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    timeout = timedelta(seconds=args.timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout, rank=rank, world_size=world,
                            store=attempt_store(restarts, world, timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        # full tensors on the CPU under fsdp (the whole model may not fit one device)
        state_device = torch.device("cpu") if cfg.scale.parallel_strategy == "fsdp" else device
        ctx = WorkerContext(rank=rank, world_size=world, device=device, prepare_model=prepare_for(cfg, device),
                            save_checkpoint=checkpoint_saver(args.checkpoints, rank), show_progress=False,
                            resume=read_checkpoint(resume_dir, rank, state_device) if resume_dir else None)
        summary = train_reward_model(cfg, args.data, args.out if rank == 0 else None, ctx)
        summary = merge_ranks(summary, device, socket.gethostname())
        summary |= {"workers": world, "restarts": restarts, "launcher": "torchrun", "backend": dist.get_backend(),
                    "checkpoints": str(args.checkpoints)}
        leave_together(rank, world, timeout)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    if args.summary:
        args.summary.write_text(json.dumps(summary, default=float))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("group_train_counts", "history")}, default=float), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    # A finished rank leaves without finalizing the interpreter: torch's own threads (gloo's workers,
    # the autograd engine's) can still drop tensors while Python tears the GIL down, which aborts the
    # process ("terminate called without an active exception", pytorch/pytorch#190489) after its work
    # is written, and torchrun then fails the whole run (seen once in CI, FSDP on gloo). Everything
    # this process writes is closed by now; only the standard streams and log handlers need flushing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
