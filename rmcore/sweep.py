"""What `rmflow tune` searches, declared once as plain data (rmcore knows nothing of Ray): a search
space over `RunConfig` fields (`section.field` → a distribution), the sweep's settings, and the
selection set its trials are ranked on. The search itself is Ray Tune's (rmflow.infra.ray_tune); a
YAML file overrides any entry of the space."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from rmcore.config import RunConfig, set_dotted
from rmcore.dataset import load_groups, unit_hash, write_derived_dataset
from rmcore.strength import as_annotated

# section.field → {distribution: arguments}. Distributions: loguniform [lo, hi], uniform [lo, hi],
# randint [lo, hi) and choice [values]. The defaults are the knobs that matter most for a small
# encoder reward model (learning rate, epochs, warm-up, weight decay); loss, margin, label smoothing,
# max length and the rest are added from YAML, e.g. `loss.name: {choice: [bt, margin]}`.
DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    "optim.lr": {"loguniform": [1e-5, 2e-4]},
    "optim.epochs": {"choice": [1, 2, 3]},
    "optim.warmup_ratio": {"choice": [0.0, 0.05, 0.1]},
    "optim.weight_decay": {"choice": [0.0, 0.01, 0.1]},
}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


class SweepConfig(BaseModel):
    """One hyper-parameter sweep: trials, budget, scheduler, space and selection set."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=1, description="Configurations sampled from the space (Ray Tune's num_samples).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting and running trials after this many seconds "
                                        "(None = no limit); finished trials still count.")
    concurrent: int = Field(0, ge=0, description="Trials at once; 0 = as many as the cluster's CPUs (or GPUs with "
                            "scale.use_gpu) hold at scale.cpus_per_worker each.")
    grace_epochs: float = Field(0.4, gt=0, description="ASHA: epochs every trial trains before it may be stopped for "
                                "scoring in the bottom of its rung on the selection set's metric (optim.select_by).")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: the fraction 1/η of trials kept at each rung.")
    max_failures: int = Field(2, ge=0, description="Restarts of a trial whose worker died, each from its last checkpoint "
                              "(one is taken at every evaluation).")
    seed: int = Field(0, description="Seeds the sampling of configurations and the choice of the prompts that "
                      "selection_fraction moves (every trial trains with the base seed).")
    selection_fraction: float = Field(
        0.25, ge=0, lt=1, description="Fraction of the training split's prompts the trials do not train on but are "
        "ranked on, with the validation split (the test split is never given to trials). Ranking on ~100 validation "
        "pairs picks noise as much as a better configuration (an accuracy there is ±10 points wide), and the best of "
        "many trials is picked by its luck; the best configuration is then trained on the whole training split, "
        "its best state chosen on the validation split as every run's is. 0 = trials train on the whole training "
        "split and are ranked on the validation split alone.",
    )
    space: dict[str, dict[str, list[Any]] | None] = Field(
        default_factory=lambda: dict(DEFAULT_SPACE), description="`section.field` → {loguniform|uniform|randint|choice: "
        "args}; merged over the default space (an entry set to null removes a default one)."
    )

    @field_validator("space", mode="before")
    @classmethod
    def _merge_defaults(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        merged = {**DEFAULT_SPACE, **v}
        return {k: spec for k, spec in merged.items() if spec is not None}

    @field_validator("space")
    @classmethod
    def _fields_exist(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        known = set(RunConfig().flat_params())
        for dotted, spec in v.items():
            if dotted not in known:
                raise ValueError(f"search space: {dotted!r} is not a RunConfig field (section.field)")
            if dotted.startswith(("strength.", "scale.")):
                raise ValueError(f"search space: {dotted!r} cannot be searched (trials train one model in-process, "
                                 "without a strength ensemble)")
            if dotted == "optim.select_by":
                raise ValueError("search space: 'optim.select_by' cannot be searched: it is how the sweep compares "
                                 "its trials (set it in the base config)")
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"search space: {dotted!r} needs one of {', '.join(DISTRIBUTIONS)}, got {spec!r}")
        return v

    @field_serializer("space")
    def _dump_removals(self, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]] | None]:
        # a removed default entry is dumped as null: validating the dump (the Prefect run form, the tune
        # state) merges the defaults in again, and must give back this space, not the default one
        return {**{k: None for k in DEFAULT_SPACE if k not in space}, **space}


def trial_config(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`base` with a trial's sampled `section.field` values, validated (a sampled combination the
    config rejects is a ValueError naming it)."""
    tree = base.model_dump(mode="json")
    for dotted, value in values.items():
        set_dotted(tree, dotted, value)
    return RunConfig.model_validate(tree)


def write_selection_dataset(data_dir: Path, out_dir: Path, fraction: float, seed: int = 0) -> dict[str, Any]:
    """What a sweep's trials train and are ranked on: `data_dir` with `fraction` of its training prompts
    moved into the validation split (picked by a seeded hash of the prompt text, so a prompt's groups move
    together and no prompt is in both; pairs a strength strategy flipped go back as annotated), and no
    test split at all. Returns the new manifest."""
    groups = load_groups(data_dir)
    train = groups["train"].to_list()
    annotated = as_annotated(train, Path(data_dir))
    kept, moved = [], []
    for row, labelled in zip(train, annotated):
        if unit_hash(f"selection:{seed}:{row['prompt']}") < fraction:
            moved.append(labelled)
        else:
            kept.append(row)
    if not kept or not moved:
        raise ValueError(f"{data_dir}: moving {fraction:g} of the {len(train)} training groups to validation leaves "
                         f"{len(kept)} to train on and moves {len(moved)}: use a larger dataset or another fraction")
    rows = {"train": kept, "validation": groups["validation"].to_list() + moved, "test": []}
    return write_derived_dataset(data_dir, out_dir, rows, {"selection_fraction": fraction, "selection_seed": seed})


def load_sweep_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A SweepConfig from an optional YAML file (its keys as above) and field overrides (None ignored)."""
    import yaml

    tree = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    tree |= {k: v for k, v in (overrides or {}).items() if v is not None}
    return SweepConfig.model_validate(tree)


class PipelineTune(BaseModel):
    """The pipeline's tune stage (off by default)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Tune the run config on Ray Tune before training; the tuned config is what "
                          "is trained, registered and logged to MLflow.")
    retune_every: int = Field(5, ge=1, description="Sweep again every R pipeline runs (and whenever the run config or these "
                              "settings change); the runs in between reuse the last best config.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Trials, time budget, concurrency, search space and "
                               "the selection set's fraction of the training prompts.")
