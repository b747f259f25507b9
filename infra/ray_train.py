"""Training one reward model: in-process for one worker, else Ray Train's TorchTrainer over the
same rmcore loop (several workers, `scale.ray`, or fsdp: `ScaleConfig.on_ray_train`). The train and
strength stages both train through `fit`.

Ray notes that shaped this file:
- Train V2 (default in Ray ≥ 2.50) rejects Tune callbacks; MLflow logging happens on the driver from
  the reported metrics.
- `ray.train.report` is a barrier: every worker reports the same number of times. Checkpoints from
  all workers merge into one directory: rank 0 writes model/optimizer/scheduler state, every rank
  writes its own sampler accounting (which prompt groups it trained).
- Data and `storage_path` are read by every worker: on a multi-node cluster both must be shared
  storage; on one machine a local folder is fine. Both may be in the team's bucket (s3://…,
  infra/team.py): each worker copies the dataset version into its own temp folder, and checkpoints
  go to the bucket through pyarrow's S3 filesystem, with the node's own AWS_* / endpoint variables.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmcore.atomic import write_atomic
from rmcore.config import RunConfig, ScaleConfig
from rmcore.inference import resolve_device
from rmcore.model import META_FILE
from rmcore.parallel import replicate, shard
from rmcore.paths import rmflow_home
from rmcore.records import content_hash
from rmcore.train import WorkerContext, train_reward_model
from rmflow.infra.process import ServiceError
from rmflow.infra.team import RAY_RESULTS, fetch_dataset, is_bucket_uri, storage_for, team_storage

STATE_FILE = "state.pt"
FINAL_METRICS = "final_metrics.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from."""


def prepare_out_dir(out_dir: Path) -> None:
    """Refuses a non-empty folder that is not an rmflow model folder: rmflow never deletes what it
    did not create. An earlier rmflow model there is replaced when the new one is written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file())):
        raise FileExistsError(f"{out_dir} exists and is not an rmflow model folder: choose an empty or new --out "
                              "(rmflow never deletes files it did not write)")


def fit(cfg: RunConfig, data_dir: Path | str, out_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    """Trains and saves the model to `out_dir`; the summary gains `workers` and `restarts`.
    `data_dir` is a dataset folder or a dataset version in the bucket (s3://…). `run_name`: the
    Ray Train run under `scale.storage_path` (see `run_ray_training`); only for Ray Train runs."""
    out_dir = Path(out_dir)
    if run_name is not None and not cfg.scale.on_ray_train:
        raise ValueError("a run name names a Ray Train run: train on Ray Train (--workers > 1 or --ray) to give one")
    if not is_bucket_uri(data_dir):
        data_dir = Path(data_dir)
        if not (data_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{data_dir} is not an rmflow dataset (no manifest.json); run `rmflow convert` first")
    prepare_out_dir(out_dir)
    if not cfg.scale.on_ray_train:
        ctx = WorkerContext(device=resolve_device(cfg.device))
        with local_dataset(str(data_dir)) as local:
            return train_reward_model(cfg, local, out_dir, ctx) | {"workers": 1, "restarts": 0}
    return run_ray_training(cfg, data_dir, out_dir, run_name)


@contextlib.contextmanager
def local_dataset(data: str) -> Iterator[Path]:
    """A dataset folder as it is, or a bucket URI copied into a temp folder of this process's own
    (deleted afterwards): a worker never reads the driver's disk."""
    if not is_bucket_uri(data):
        yield Path(data)
        return
    with tempfile.TemporaryDirectory(prefix="rmflow-data-") as tmp:
        yield fetch_dataset(data, Path(tmp) / "data")


def default_storage_path() -> str:
    """Ray Train's storage when `scale.storage_path` is unset: the team bucket's ray_results/ when
    RMFLOW_STORAGE_URL names one (every node reaches it), else RMFLOW_HOME/ray_results."""
    store = team_storage()
    return store.uri(RAY_RESULTS) if store is not None else str(rmflow_home() / RAY_RESULTS)


def _storage(uri: str):
    """(pyarrow filesystem, path in it) for a Ray Train storage_path: a bucket URI or a local folder."""
    from pyarrow import fs

    if is_bucket_uri(uri):
        # this environment's endpoint travels with the filesystem (every node must reach it); the
        # keys do not: each process that unpickles it reads its own environment's
        store = storage_for(uri)
        return store.pyarrow_fs(own_keys=False), "/".join(p for p in (store.bucket, store.prefix) if p)
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def init_ray(address: str | None) -> dict[str, Any]:
    """Connects to `address` / RAY_ADDRESS when one is given, else starts a runtime of our own sized
    to this machine (`address="local"`: a cluster Ray would otherwise find by itself — a running
    `ray start`, or the address file a killed one leaves behind — is not joined by accident).
    Returns which it did."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return {"ray": "cluster" if address else "local"}
    # Slow 2-core machines take a while to start a worker group; Ray's default times out.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    if address:
        _token_mode_if_token_at_hand()
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address} ({type(e).__name__}: {str(e)[:300]}). Is it running? If it uses "
                "token authentication, its token must be in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or "
                "~/.ray/auth_token (see infra/README.md)") from None
        return {"ray": "cluster", "ray_address": address}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]}})
    return {"ray": "local"}


def _token_mode_if_token_at_hand() -> None:
    """Ray ≥ 2.52 clusters started with a token (`RAY_AUTH_MODE=token`, or by default when a token
    exists) refuse clients that send none, and Ray turns the client side on by itself only for a
    cluster it finds on its own, never for an explicit address. A team's driver has the token where
    the cluster's nodes read it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): with
    RAY_AUTH_MODE unset and a token there, token mode is turned on, as `ray start` does.
    RAY_AUTH_MODE set (`disabled` included) is left as it is."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # Ray before token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def run_ray_training(cfg: RunConfig, data_dir: Path, out_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    """Trains on Ray Train as run `run_name` (default: a new name) under `scale.storage_path`. A
    run started again with the name and storage of one that failed resumes from the last checkpoint
    its controller registered there (Ray Train V2 restores a run from the checkpoint-manager snapshot
    it finds under that name); `restarts` counts every worker-group start under the name. When the
    bucket holding the run stops answering, the error names the store and the run to resume."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    prepare_out_dir(out_dir)
    from pyarrow import fs

    runtime = init_ray(cfg.scale.ray_address)
    storage_uri = cfg.scale.storage_path or default_storage_path()
    filesystem, storage = _storage(storage_uri)
    run_name = run_name or f"rmflow-{uuid.uuid4().hex[:8]}"
    # one empty file per worker-group start, written by rank 0 wherever it runs: restarts = files - 1
    attempts = f"{storage}/{run_name}/attempts"
    data = str(data_dir) if is_bucket_uri(data_dir) else str(Path(data_dir).resolve())
    try:
        filesystem.create_dir(attempts)
        _claim_run(filesystem, f"{storage}/{run_name}/{RUN_IDENTITY}", run_identity(cfg, data), run_name)
    except OSError as e:
        raise _storage_failure(storage_uri, run_name, e) or e
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "attempts": attempts, "storage": storage_uri,
                           "data_dir": data},
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=max(1, cfg.scale.workers),
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if cfg.scale.use_gpu else {})},
            placement_strategy=cfg.scale.placement_strategy,
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage,
            storage_filesystem=filesystem if is_bucket_uri(storage_uri) else None,
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"Ray training failed: {result.error}")
        with result.checkpoint.as_directory() as ckpt:  # the final checkpoint, read back from the storage
            summary = json.loads((Path(ckpt) / FINAL_METRICS).read_text())
            if out_dir.exists():  # an earlier rmflow model (prepare_out_dir refused anything else)
                shutil.rmtree(out_dir)
            shutil.copytree(Path(ckpt) / "model", out_dir)
        restarts = len(filesystem.get_file_info(fs.FileSelector(attempts))) - 1
    except Exception as e:  # noqa: BLE001 — Ray's error, unless the bucket it writes to is what went away
        raise _storage_failure(storage_uri, run_name, e) or e
    summary.update(model_dir=str(out_dir), workers=cfg.scale.workers, restarts=restarts,
                   ray_run=f"s3://{storage}/{run_name}" if is_bucket_uri(storage_uri) else f"{storage}/{run_name}", **runtime)
    return summary


RUN_IDENTITY = "rmflow_run.json"


def run_identity(cfg: RunConfig, data: str) -> dict[str, Any]:
    """What a run resumed by name must share with the run that started it: the dataset and every
    setting that shapes the training (where it runs may change, the number of workers may not: each
    rank's checkpoint holds the prompt groups it trained)."""
    shaping = cfg.model_dump(mode="json", exclude={"scale", "device"}) | {"workers": cfg.scale.workers}
    return {"data": data, "config_hash": content_hash(shaping)}


def _claim_run(filesystem, path: str, identity: dict[str, Any], run_name: str) -> None:
    """Records the run's identity at its first start; a later start under the same name with another
    dataset or config is refused (Ray Train would restore that run's checkpoint into this one). The
    record is written whole; on local storage the first of two concurrent first starts wins (and the
    other is compared with it), in a bucket two first starts at the same moment are not told apart."""
    from pyarrow import fs

    if isinstance(filesystem, fs.LocalFileSystem):
        write_atomic(Path(path), json.dumps(identity), replace=False)
    elif filesystem.get_file_info(path).type == fs.FileType.NotFound:
        with filesystem.open_output_stream(path) as f:  # an S3 object is written whole or not at all
            f.write(json.dumps(identity).encode())
    try:
        with filesystem.open_input_stream(path) as f:
            first = json.loads(f.read())
        first = first if isinstance(first, dict) else {}
    except ValueError:
        raise ValueError(f"Ray Train run {run_name}: its {RUN_IDENTITY} is unreadable; give another --run-name") from None
    if first != identity:
        what = "another dataset" if first.get("data") != identity["data"] else "other training settings"
        raise ValueError(f"Ray Train run {run_name} was started with {what} ({first.get('data')}, config "
                         f"{str(first.get('config_hash', '?'))[:8]}; now {identity['data']}, {identity['config_hash'][:8]}): resuming "
                         "it would restore its checkpoint into this run. Give another --run-name (or none: a new run).")


def _storage_failure(storage_uri: str, run_name: str, error: Exception) -> ServiceError | None:
    """When `storage_uri` is in a bucket that does not answer now, the error naming the store (never
    its secret) and how to resume the run once it is back; else None (the error is Ray's to tell)."""
    if not is_bucket_uri(storage_uri):
        return None
    store = storage_for(storage_uri)
    try:
        store.client(timeout_s=5, retries=1).head_bucket(Bucket=store.bucket)
        return None
    except Exception as probe:  # noqa: BLE001 — any failure to reach it is the answer
        down = store.describe_error(probe, f"Ray Train wrote run {run_name} under {storage_uri}")
    return ServiceError(f"{down}. Training failed ({type(error).__name__}); once the store is back, run it again with "
                        f"--run-name {run_name} and --storage-path {storage_uri}: it resumes from the run's last checkpoint")


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["cfg"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    if rank == 0:
        _storage(config["storage"])[0].open_output_stream(f"{config['attempts']}/{uuid.uuid4().hex}").close()

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
        device=device,
        prepare_model=prepare_for(cfg, device),
        save_checkpoint=save_checkpoint,
        report=lambda metrics: ray.train.report(metrics),
        # full tensors: on the CPU under fsdp (the whole model may not fit one device)
        resume=_resume_state(ray.train.get_checkpoint(), rank, torch.device("cpu") if cfg.scale.parallel_strategy == "fsdp" else device),
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp, local_dataset(config["data_dir"]) as data:
        model_dir = Path(tmp) / "model" if rank == 0 else None
        summary = merge_ranks(train_reward_model(cfg, data, model_dir, ctx), device,
                              ray.get_runtime_context().get_node_id())
        checkpoint = None
        if rank == 0:
            (Path(tmp) / FINAL_METRICS).write_text(json.dumps(summary, default=float))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in summary.items() if np.isscalar(v)}, checkpoint=checkpoint)


def prepare_for(cfg: RunConfig, device: torch.device) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """How a worker wraps the model (every launcher: Ray Train, torchrun): FSDP2 shards or DDP."""
    if cfg.scale.parallel_strategy == "fsdp":
        return lambda m: shard(m, device, cfg.model.dtype)
    return lambda m: replicate(m, device)


def merge_ranks(summary: dict[str, Any], device: torch.device, node: str) -> dict[str, Any]:
    """Every rank's accounting summed (a collective), so rank 0 reports the whole run. pairs/s is
    this attempt's pairs over this attempt's time: pairs restored from a checkpoint were trained by
    an earlier attempt, in time not counted here. `node`: where this rank ran (`worker_nodes`)."""
    summary["group_train_counts"] = _all_reduce(summary["group_train_counts"], device)
    for key in ("pairs_trained", "pairs_truncated", "pairs_this_attempt"):
        summary[key] = _all_reduce([summary[key]], device)[0]
    summary["pairs_per_s"] = round(summary["pairs_this_attempt"] / max(summary["train_s"], 1e-9), 3)
    summary["worker_nodes"] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(summary["worker_nodes"], node)
    return summary


def _all_reduce(values: list[int], device: torch.device) -> list[int]:
    # on the worker's device: nccl only reduces CUDA tensors
    t = torch.tensor(values, dtype=torch.long, device=device)
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def _resume_state(checkpoint, rank: int, device: torch.device) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return read_checkpoint(Path(d), rank, device)


def read_checkpoint(d: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """The saved state, read as tensors only (checkpoints may sit on shared storage: no pickled
    code is ever loaded) onto this worker's device; the RNG state stays on the CPU."""
    try:
        state = torch.load(d / STATE_FILE, map_location=device, weights_only=True)
        state["rng"] = state["rng"].cpu()
        state["trained"] = json.loads((d / f"trained_rank{rank}.json").read_text())
    except Exception as e:  # truncated, corrupted or not tensors-only: never resume from it
        raise CheckpointError(f"checkpoint {d} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                              "start a new run (another run name) or restore the checkpoint") from None
    return state


def fit_parallel(jobs: list[tuple[RunConfig, Path, Path]]) -> list[dict[str, Any]]:
    """`fit` for several independent models: in-process jobs as Ray tasks (`map_on_ray`); jobs on
    Ray Train (several workers, `ray`, fsdp) one after another. Summaries come back in the jobs' order."""
    if not jobs:
        return []
    if any(cfg.scale.on_ray_train for cfg, _, _ in jobs):
        return [fit(cfg, data, out) for cfg, data, out in jobs]
    return map_on_ray(fit, [(cfg, Path(data).resolve(), Path(out).resolve()) for cfg, data, out in jobs], jobs[0][0].scale)


def map_on_ray(fn: Callable[..., Any], jobs: list[tuple], scale: ScaleConfig) -> list[Any]:
    """`fn(*job)` for every job as a Ray task reserving `scale.cpus_per_worker` CPUs (torch uses as
    many threads) or one GPU (`scale.use_gpu`), as many at once as the cluster allows. Paths in
    the jobs must be absolute: tasks may run elsewhere. Results come back in the jobs' order."""
    import ray

    init_ray(scale.ray_address)
    resources = {"num_gpus": 1} if scale.use_gpu else {}
    remote = ray.remote(num_cpus=scale.cpus_per_worker, max_retries=scale.max_failures, **resources)(_with_threads)
    return ray.get([remote.remote(fn, int(scale.cpus_per_worker), *job) for job in jobs])


def _with_threads(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    torch.set_num_threads(max(1, threads))
    return fn(*args)
