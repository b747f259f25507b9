"""Hyper-parameter sweeps on Ray Tune: trials of the rmcore loop, each reporting validation metrics at
every evaluation (with a checkpoint), ASHA stopping the weak ones early on the metric `optim.select_by`
names, every trial an MLflow child run of the sweep's parent run, the best configuration returned as a
RunConfig. Trials train on the training split less `selection_fraction` of its prompts and are ranked on
the validation split plus those prompts (rmcore.sweep.write_selection_dataset); they never see the test split.

Ray notes that shaped this file:
- Trials are Tune function trainables running the loop in-process (one model each, torch threads =
  scale.cpus_per_worker): Train V2's TorchTrainer is not nested in them, so multi-worker trials are
  refused rather than half-supported.
- Fault tolerance is Tune's: FailureConfig(max_failures) restarts a trial whose actor died from its
  last reported checkpoint (`tune.get_checkpoint()`); `Tuner.restore` resumes an interrupted sweep.
  Every attempt leaves a file named by its pid in `<sweep>/attempts/<trial id>/`: restarts are counted
  from them, and an operator can see which process runs which trial.
- MLflow logging is a Tune Callback on the driver (trials never talk to MLflow). It finds a trial's run
  by tag, so a restarted trial or a restored sweep logs into the same child run.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray.tune import Callback

from rmcore.config import RunConfig, SelectBy
from rmcore.dataset import read_manifest
from rmcore.paths import rmflow_home
from rmcore.sweep import SweepConfig, trial_config, write_selection_dataset
from rmcore.train import SELECT_METRIC, WorkerContext, selection_rank, train_reward_model
from rmflow.infra.ray_train import STATE_FILE, init_ray, read_checkpoint

SWEEP_FILE = "rmflow_sweep.json"  # what the sweep was started with: a restore needs nothing else


@dataclass
class SweepResult:
    best: RunConfig
    best_trial: str
    best_val_accuracy: float
    best_val_loss: float | None
    selected_by: str  # the metric the sweep ranked its trials by on their validation split, the selection set (optim.select_by's)
    selection_pairs: int  # the pairs it ranked them on (validation + the training prompts set aside: selection_fraction)
    path: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)


def sweep_dir(name: str, storage: str | None = None) -> Path:
    return Path(storage or rmflow_home() / "tune").resolve() / name


def run_sweep(base: RunConfig, data_dir: Path, sweep: SweepConfig, name: str | None = None,
              storage: str | None = None) -> SweepResult:
    """Samples `sweep.trials` configurations of `base` over `sweep.space` and trains each on Ray Tune."""
    from ray import tune

    if base.scale.on_ray_train:
        raise ValueError("rmflow tune trains each trial in-process: use scale.workers 1 without scale.ray or fsdp "
                         "(trials run side by side instead)")
    if base.strength.ensemble:
        raise ValueError("rmflow tune does not train strength ensembles: build the strength dataset first "
                         "(rmflow train --ensemble M) and tune on it with strength.ensemble 0")
    data_dir = Path(data_dir).resolve()
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not an rmflow dataset (no manifest.json); run `rmflow convert` first")
    name = name or f"tune-{uuid.uuid4().hex[:8]}"
    path = sweep_dir(name, storage)
    path.mkdir(parents=True, exist_ok=True)
    trial_data = _trial_data(data_dir, sweep, path)
    parent = _parent_run(name, base, sweep, data_dir, trial_data)
    started = {"base": base.model_dump(mode="json"), "sweep": sweep.model_dump(mode="json"), "data_dir": str(data_dir),
               "trial_data_dir": str(trial_data), "parent_run_id": parent}
    (path / SWEEP_FILE).write_text(json.dumps(started, indent=1))
    runtime = init_ray(base.scale.ray_address)
    space = {dotted: tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
             for dotted, spec in sweep.space.items() for kind, args in spec.items()}
    metric, mode = SELECT_METRIC[base.optim.select_by]
    tuner = tune.Tuner(
        _trainable(base),
        param_space={"space": space, "base": started["base"], "data_dir": str(trial_data), "attempts": str(path / "attempts")},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=sweep.trials, time_budget_s=sweep.time_budget_s,
            max_concurrent_trials=_concurrency(base, sweep), scheduler=_scheduler(base, sweep),
            search_alg=tune.search.BasicVariantGenerator(random_state=sweep.seed),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(path.parent), failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[MlflowTrials(parent, name)], verbose=0,
        ),
    )
    return _finish(_fit(tuner, parent), path, parent, runtime, base.optim.select_by, trial_data)


def _trial_data(data_dir: Path, sweep: SweepConfig, path: Path) -> Path:
    """The dataset the trials train and are ranked on: `data_dir` itself, or with selection_fraction of its
    training prompts moved to validation (and no test split), written once into the sweep's folder."""
    if not sweep.selection_fraction:
        return data_dir
    out = path / "selection"
    write_selection_dataset(data_dir, out, sweep.selection_fraction, sweep.seed)
    return out


def _fit(tuner, parent: str):
    try:
        return tuner.fit()
    except BaseException:
        from rmflow.infra.mlflow_client import configure_mlflow

        configure_mlflow().set_terminated(parent, "FAILED")
        raise


def resume_sweep(path: Path) -> SweepResult:
    """Continues an interrupted sweep (`Tuner.restore`): finished trials are kept, unfinished ones resume
    from their last checkpoint, errored ones are retried."""
    from ray import tune

    path = Path(path).resolve()
    if not (path / SWEEP_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an rmflow sweep (no {SWEEP_FILE})")
    started = json.loads((path / SWEEP_FILE).read_text())
    base = RunConfig.model_validate(started["base"])
    runtime = init_ray(base.scale.ray_address)
    if not tune.Tuner.can_restore(str(path)):
        raise FileNotFoundError(f"{path}: Ray Tune left no experiment state to restore (was the sweep started?)")
    tuner = tune.Tuner.restore(str(path), trainable=_trainable(base), resume_errored=True)
    return _finish(_fit(tuner, started["parent_run_id"]), path, started["parent_run_id"], runtime, base.optim.select_by,
                   Path(started.get("trial_data_dir", started["data_dir"])))


def _trainable(base: RunConfig):
    from ray import tune

    resources = {"cpu": base.scale.cpus_per_worker, **({"gpu": 1} if base.scale.use_gpu else {})}
    return tune.with_resources(run_trial, resources)


def _concurrency(base: RunConfig, sweep: SweepConfig) -> int:
    import ray

    if sweep.concurrent:
        return sweep.concurrent
    cluster = ray.cluster_resources()
    if base.scale.use_gpu:
        return max(1, int(cluster.get("GPU", 1)))
    return max(1, int(cluster.get("CPU", 1) // base.scale.cpus_per_worker))


def _scheduler(base: RunConfig, sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler

    epochs = sweep.space.get("optim.epochs")
    values = next(iter(epochs.values())) if epochs else [base.optim.epochs]
    most = max(float(v) for v in values)
    # rungs in epochs: a trial may be stopped after grace_epochs, 2·grace_epochs, … when in the bottom (1 - 1/η)
    return ASHAScheduler(time_attr="epoch", max_t=max(most, sweep.grace_epochs), grace_period=sweep.grace_epochs,
                         reduction_factor=sweep.reduction_factor)


def run_trial(config: dict[str, Any]) -> None:
    """One trial (a Ray actor): the rmcore loop with every evaluation reported to Tune with a checkpoint
    (resumed from the last one after a restart), then the run's final, selected state's metrics."""
    from ray import tune

    base = RunConfig.model_validate(config["base"])
    cfg = trial_config(base, config["space"])
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    trial = tune.get_context().get_trial_id()
    attempts = Path(config["attempts"]) / trial
    attempts.mkdir(parents=True, exist_ok=True)
    (attempts / str(os.getpid())).touch()

    def save_checkpoint(state: dict[str, Any], metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "trained_rank0.json").write_text(json.dumps(state.pop("trained")))
            torch.save(state, Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = read_checkpoint(Path(d), 0, torch.device("cpu"))
    device = torch.device("cuda") if cfg.scale.use_gpu else torch.device("cpu")
    ctx = WorkerContext(device=device, save_checkpoint=save_checkpoint, report=tune.report, resume=resume,
                        show_progress=False, checkpoint_at_eval=True)
    summary = train_reward_model(cfg, Path(config["data_dir"]), None, ctx)
    tune.report({"step": summary["steps_run"], "epoch": float(cfg.optim.epochs), "val_accuracy": summary["val_accuracy"],
                 "val_loss": summary["val_loss"], "best_step": summary["best_step"] or summary["steps_run"],
                 "pairs_per_s": summary["pairs_per_s"], "final": 1})


def _finish(grid, path: Path, parent: str, runtime: dict[str, Any], by: SelectBy, trial_data: Path) -> SweepResult:
    """The best trial among those that trained to the end (ASHA's stopped ones were behind at a rung),
    ranked as the base config's `optim.select_by` ranks a run's states; logged to the parent run."""
    trials = []
    for result in grid:
        m = result.metrics or {}
        trials.append({"trial": m.get("trial_id") or Path(result.path).name, "values": (result.config or {}).get("space", {}),
                       "val_accuracy": m.get("val_accuracy"), "val_loss": m.get("val_loss"), "epoch": m.get("epoch"),
                       "finished": bool(m.get("final")), "error": str(result.error)[:300] if result.error else None,
                       "restarts": max(0, len(list((path / "attempts" / str(m.get("trial_id"))).glob("*"))) - 1),
                       "base": (result.config or {}).get("base")})
    scored = [t for t in trials if isinstance(t["val_accuracy"], float) and not math.isnan(t["val_accuracy"])]
    finished = [t for t in scored if t["finished"]] or scored
    if not finished:
        raise RuntimeError(f"no trial of the sweep at {path} reported a validation accuracy: "
                           + "; ".join(t["error"] or "no result" for t in trials)[:600])
    best = max(finished, key=lambda t: selection_rank({"accuracy": t["val_accuracy"], "loss": t["val_loss"]}, by))
    best_cfg = trial_config(RunConfig.model_validate(best["base"]), best["values"])
    _log_parent(parent, best_cfg, best, trials, by)
    for t in trials:
        t.pop("base")
    return SweepResult(best=best_cfg, best_trial=best["trial"], best_val_accuracy=best["val_accuracy"], best_val_loss=best["val_loss"],
                       selected_by=SELECT_METRIC[by][0], selection_pairs=read_manifest(trial_data)["splits"]["validation"],
                       path=str(path), parent_run_id=parent, trials=trials, runtime=runtime)


def _parent_run(name: str, base: RunConfig, sweep: SweepConfig, data_dir: Path, trial_data: Path) -> str:
    from rmflow.infra.mlflow_client import configure_mlflow, git_commit

    client = configure_mlflow()
    experiment = client.get_experiment_by_name("rmflow").experiment_id
    run = client.create_run(experiment, run_name=name, tags={"rmflow.kind": "tune", "rmflow.sweep": name,
                                                              "git_commit": git_commit(), "data_dir": str(data_dir)})
    splits = read_manifest(trial_data)["splits"]
    client.log_batch(run.info.run_id, params=_params({f"base.{k}": v for k, v in base.flat_params().items()}
                                                      | {f"sweep.{k}": v for k, v in sweep.model_dump(mode="json").items()}
                                                      | {"trial_train_pairs": splits["train"], "selection_pairs": splits["validation"]}))
    return run.info.run_id


def _log_parent(parent: str, best: RunConfig, trial: dict[str, Any], trials: list[dict[str, Any]], by: SelectBy) -> None:
    from mlflow import MlflowClient

    from rmflow.infra.mlflow_client import configure_mlflow

    client: MlflowClient = configure_mlflow()
    client.log_metric(parent, "best_val_accuracy", float(trial["val_accuracy"]))
    if trial["val_loss"] is not None:
        client.log_metric(parent, "best_val_loss", float(trial["val_loss"]))
    client.set_tag(parent, "selected_by", SELECT_METRIC[by][0])
    client.log_metric(parent, "trials", len(trials))
    client.log_metric(parent, "trials_finished", sum(t["finished"] for t in trials))
    client.log_metric(parent, "trial_restarts", sum(t["restarts"] for t in trials))
    client.set_tag(parent, "best_trial", trial["trial"])
    client.log_dict(parent, best.model_dump(mode="json"), "best_config.json")
    client.set_terminated(parent, "FINISHED")


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class MlflowTrials(Callback):
    """Every trial an MLflow child run of the sweep's parent run: its configuration as params, each
    report's metrics at its training step (the validation curve), FINISHED or FAILED at its end."""

    def __init__(self, parent: str, sweep: str) -> None:
        self.parent, self.sweep = parent, sweep
        self.runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment state for Tuner.restore
        return {"parent": self.parent, "sweep": self.sweep, "runs": {}}

    def _client(self):
        from rmflow.infra.mlflow_client import configure_mlflow

        return configure_mlflow()

    def _run(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        client = self._client()
        experiment = client.get_experiment_by_name("rmflow").experiment_id
        key = f"{self.sweep}/{trial.trial_id}"
        found = client.search_runs([experiment], f"tags.`rmflow.trial` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(experiment, run_name=f"{self.sweep}-{trial.trial_id}", tags={
                "mlflow.parentRunId": self.parent, "rmflow.kind": "tune-trial", "rmflow.trial": key}).info.run_id
            cfg = trial_config(RunConfig.model_validate(trial.config["base"]), trial.config["space"])
            client.log_batch(run_id, params=_params(cfg.flat_params()))
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(result.get("step", 0))
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k.startswith("val_") or k in ("lr", "epoch", "pairs_per_s") if isinstance(v, (int, float))
                   and not isinstance(v, bool) and not math.isnan(float(v))]
        if metrics:
            self._client().log_batch(self._run(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._client().set_terminated(self._run(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._client().set_terminated(self._run(trial), "FAILED")
