"""Stage 3b, tune (optional): a Ray Tune sweep over the run config on a dataset version, the best
configuration written as a RunConfig YAML (what `rmflow train --config` and the train stage take).
The pipeline re-tunes every R runs and otherwise reuses the last best configuration it recorded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from pydantic import BaseModel, Field, ValidationError

from rmcore.atomic import write_atomic
from rmcore.config import RunConfig
from rmcore.sweep import SweepConfig
from rmflow.infra.ray_tune import resume_sweep, run_sweep

BEST_FILE = "best.yaml"
STATE_FILE = "tune_state.json"  # per model: the last best config and the runs since it was tuned


class TunedConfig(BaseModel):
    """A sweep's outcome (or the reused one): the config to train with and where it came from."""

    run: RunConfig
    config_file: str = Field(description="The best RunConfig as YAML.")
    tuned: bool = Field(description="A sweep ran now (False: the last best config was reused).")
    sweep: str | None = Field(None, description="The sweep's folder (Ray Tune experiment).")
    parent_run_id: str | None = Field(None, description="The sweep's MLflow parent run.")
    best_val_accuracy: float | None = Field(None, description="The best trial's accuracy on the selection set it was ranked on.")
    best_val_loss: float | None = Field(None, description="Its loss there.")
    selected_by: str | None = Field(None, description="The metric the sweep chose the best trial by (val_accuracy or val_loss, optim.select_by's), "
                                       "measured on the trials' validation split: the selection set.")
    selection_pairs: int | None = Field(None, description="The validation pairs it ranked the trials on (sweep.selection_fraction).")
    trials: list[dict[str, Any]] = Field(default_factory=list)


def write_config(cfg: RunConfig, path: Path) -> Path:
    write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def tune_config(base: RunConfig, data_dir: Path, sweep: SweepConfig, name: str | None = None,
                storage: str | None = None, resume: Path | None = None) -> TunedConfig:
    """Runs (or, with `resume`, continues) a sweep and writes its best config to `<sweep>/best.yaml`."""
    result = resume_sweep(resume) if resume else run_sweep(base, data_dir, sweep, name, storage)
    path = write_config(result.best, Path(result.path) / BEST_FILE)
    return TunedConfig(run=result.best, config_file=str(path), tuned=True, sweep=result.path,
                       parent_run_id=result.parent_run_id, best_val_accuracy=result.best_val_accuracy,
                       best_val_loss=result.best_val_loss, selected_by=result.selected_by,
                       selection_pairs=result.selection_pairs, trials=result.trials)


def tune_or_reuse(base: RunConfig, data_dir: Path, sweep: SweepConfig, state_dir: Path, retune_every: int) -> TunedConfig:
    """The pipeline's tune stage: a sweep when none was recorded in `state_dir`, when `retune_every`
    runs have used the last one, or when the base config changed; else the recorded best config.
    Training and search settings not in the space (backbone, scale, …) always come from `base`."""
    state_file = Path(state_dir) / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    base_key, sweep_key = base.model_dump(mode="json"), sweep.model_dump(mode="json")
    fresh = (not state or _as_now(state.get("base")) != base_key or _sweep_as_now(state.get("sweep")) != _sweep_as_now(sweep_key)
             or state.get("runs_since", 0) + 1 > max(1, retune_every) or not Path(state.get("config_file", "")).is_file())
    if fresh:
        tuned = tune_config(base, data_dir, sweep)
        state = {"base": base_key, "sweep": sweep_key, "config_file": tuned.config_file,
                 "parent_run_id": tuned.parent_run_id, "best_val_accuracy": tuned.best_val_accuracy,
                 "best_val_loss": tuned.best_val_loss, "selected_by": tuned.selected_by,
                 "selection_pairs": tuned.selection_pairs, "runs_since": 1}
    else:
        run = RunConfig.model_validate(yaml.safe_load(Path(state["config_file"]).read_text()))
        tuned = TunedConfig(run=run, config_file=state["config_file"], tuned=False, parent_run_id=state.get("parent_run_id"),
                            best_val_accuracy=state.get("best_val_accuracy"), best_val_loss=state.get("best_val_loss"),
                            selected_by=state.get("selected_by"), selection_pairs=state.get("selection_pairs"))
        state["runs_since"] = state.get("runs_since", 0) + 1
    write_atomic(state_file, json.dumps(state, indent=1))
    return tuned


def _as_now(recorded: Any) -> Any:
    """A base RunConfig recorded by an earlier rmflow as this one reads it (the settings added since at
    their defaults, which are what that rmflow did), so an upgrade alone does not re-tune; None if
    unreadable. (Not for the SweepConfig: see _sweep_as_now.)"""
    try:
        return RunConfig.model_validate(recorded).model_dump(mode="json")
    except ValidationError:
        return None


def _sweep_as_now(recorded: Any) -> Any:
    """Sweep settings recorded by an earlier rmflow (or dumped now), compared by the space they search: the
    default entries a user removed are dumped as null today and were left out before, so nulls are dropped;
    the settings added since are at what that rmflow did: before `selection_fraction`, trials were ranked on
    the validation split alone (0), so under today's default (0.25) such a state is re-tuned once, as any
    change of sweep settings is."""
    if not isinstance(recorded, dict):
        return recorded
    space = recorded.get("space")
    searched = {k: v for k, v in space.items() if v is not None} if isinstance(space, dict) else space
    return {"selection_fraction": 0.0} | recorded | {"space": searched}


tune_task = task(tune_or_reuse, name="tune", tags=["rmflow-training"])
