"""Launching training: in-process for 0/1 workers, else Ray Train's TorchTrainer.

Ray notes that shaped this file:
- Train V2 (default in Ray ≥ 2.50) rejects Tune callbacks; MLflow logging happens on the driver from
  the reported metrics.
- `ray.train.report` is a barrier: every worker reports the same number of times. Checkpoints from
  all workers merge into one directory: rank 0 writes model/optimizer/scheduler state, every rank
  writes its own sampler accounting (which prompt groups it trained).
- Data and `storage_path` are read by every worker: on a multi-node cluster both must be shared
  storage (NFS, S3); on one machine a local folder is fine.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmcore.config import RunConfig
from rmcore.train import WorkerContext, resolve_device, train_reward_model
from rmcore.paths import rmflow_home

STATE_FILE = "state.pt"
FINAL_METRICS = "final_metrics.json"


def run_training(cfg: RunConfig, data_dir: Path, out_dir: Path, track_members: bool = False) -> dict[str, Any]:
    """Trains and saves the model to `out_dir`; the summary gains `workers` and `restarts`. With a
    strength ensemble it first trains the members (logged to MLflow with `track_members`) and
    trains on the strength-annotated dataset version they produce."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not an rmflow dataset (no manifest.json); run `rmflow convert` first")
    strength: dict[str, Any] = {}
    if cfg.strength.ensemble:
        from rmcore.strength import final_run_config
        from tasks.strength import build_strength_dataset

        data_dir, strength = build_strength_dataset(cfg, data_dir, track=track_members)
        cfg = final_run_config(cfg)
    if cfg.scale.workers <= 1:
        ctx = WorkerContext(device=resolve_device(cfg.device))
        summary = train_reward_model(cfg, data_dir, out_dir, ctx) | {"workers": 1, "restarts": 0}
    else:
        summary = run_ray_training(cfg, data_dir, out_dir)
    if strength:
        from tasks.strength import strength_report

        report_dir = out_dir.parent / f"{out_dir.name}-strength-report"
        strength_report(data_dir, out_dir, report_dir)
        summary |= {"strength": strength | {"report_dir": str(report_dir)}, "data_dir": str(data_dir)}
    return summary


def init_ray(address: str | None) -> None:
    """Connects to RAY_ADDRESS / `address`, else starts a local runtime sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Slow 2-core machines take a while to start a worker group; Ray's default times out.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]}})


def run_ray_training(cfg: RunConfig, data_dir: Path, out_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.scale.ray_address)
    storage = Path(cfg.scale.storage_path or rmflow_home() / "ray_results").resolve()
    run_name = run_name or f"rmflow-{uuid.uuid4().hex[:8]}"
    attempts = storage / run_name / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data_dir": str(data_dir.resolve()), "attempts": str(attempts)},
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if cfg.scale.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        summary = json.loads((Path(ckpt) / FINAL_METRICS).read_text())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(Path(ckpt) / "model", out_dir)
    summary.update(model_dir=str(out_dir), workers=cfg.scale.workers,
                   restarts=len(list(attempts.iterdir())) - 1, ray_run=str(storage / run_name))
    return summary


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["cfg"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    if rank == 0:
        (Path(config["attempts"]) / uuid.uuid4().hex).touch()

    def save_checkpoint(state: dict[str, Any], metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trained = state.pop("trained")
            if rank == 0:
                torch.save(state, Path(tmp) / STATE_FILE)
            (Path(tmp) / f"trained_rank{rank}.json").write_text(json.dumps(trained))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        save_checkpoint=save_checkpoint,
        report=lambda metrics: ray.train.report(metrics),
        resume=_resume_state(ray.train.get_checkpoint(), rank),
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model" if rank == 0 else None
        summary = train_reward_model(cfg, Path(config["data_dir"]), model_dir, ctx)
        counts = torch.tensor(summary["group_train_counts"], dtype=torch.long)
        torch.distributed.all_reduce(counts)  # every rank's accounting, so rank 0 reports the whole epoch
        summary["group_train_counts"] = counts.tolist()
        summary["pairs_trained"] = _global_sum(summary["pairs_trained"])
        summary["pairs_truncated"] = _global_sum(summary["pairs_truncated"])
        summary["pairs_per_s"] = round(summary["pairs_trained"] / max(summary["train_s"], 1e-9), 3)
        checkpoint = None
        if rank == 0:
            (Path(tmp) / FINAL_METRICS).write_text(json.dumps(summary, default=float))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in summary.items() if np.isscalar(v)}, checkpoint=checkpoint)


def _global_sum(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t)
    return int(t.item())


def _resume_state(checkpoint, rank: int) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        state["trained"] = json.loads((Path(d) / f"trained_rank{rank}.json").read_text())
    return state
