"""`rmflow bench slices`: "Secrets of RLHF", impact of different data — one reward model per
preference-strength slice.

Per dataset: an ensemble of M models (parallel Ray tasks, trained on the train split) gives every
train pair a mean strength; the train pairs are sorted by it and cut into N equal slices (lowest
first); one model per slice is trained from scratch on that slice alone, with the same config and
the same step budget (equal pairs per slice, same epochs and pairs per step), again as parallel
Ray tasks. By default each slice model gets the steps of one full-data model (`--slice-epochs`
= slices × epochs): a tenth of the data for one epoch is a dozen steps, too few to learn anything. Each slice model's validation and test accuracy get 95% bootstrap intervals.

Output: one JSON line per slice, a table on stderr, a PNG like the paper's (accuracy by slice,
chance line at 0.5) and, last, one JSON object with every table. With MLflow configured
(MLFLOW_TRACKING_URI or RMFLOW_HOME), each dataset is one parent run holding the table, the
figure and the strength dataset version, with one child run per slice.

Data: `--datasets qa-feedback,hh-rlhf` (the shared human data) or `--data DIR` (any rmflow dataset
folder, e.g. your own collected labels).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rmcore.config import RunConfig
from rmcore.dataset import load_groups, read_manifest, write_derived_dataset
from rmcore.evaluate import evaluate_rows
from rmcore.scoring import RewardScorer
from rmcore.strength import slice_by_strength
from rmflow.bench.secrets import accuracy_with_ci
from rmflow.bench.train_vs_trl import common_args, emit, prepare
from rmflow.infra.ray_train import fit_parallel
from rmflow.tasks.strength import ensemble_strengths, write_strength_dataset


def slice_experiment(cfg: RunConfig, data: Path, slices: int, work: Path, name: str,
                     slice_epochs: float | None = None) -> dict[str, Any]:
    """Ensemble → strength slices → one model per slice (`slice_epochs` passes over its slice,
    default slices × the members' epochs) → held-out accuracy per slice."""
    ensemble = ensemble_strengths(cfg, data)
    strength = write_strength_dataset(cfg.model_copy(update={"strength": cfg.strength.model_copy(update={"strategy": "none"})}),
                                      data, ensemble, work)
    train = ensemble["splits"]["train"]
    parts = slice_by_strength(train["rows"], train["mean"], slices)
    order = np.sort(train["mean"])
    bounds = np.array_split(order, slices)
    model_cfg = cfg.model_copy(update={"strength": cfg.strength.model_copy(update={"ensemble": 0}),
                                       "optim": cfg.optim.model_copy(update={"epochs": slice_epochs or slices * cfg.optim.epochs})})
    jobs = []
    for k, rows in enumerate(parts):
        slice_dir = work / f"{name}-slice{k:02d}"
        write_derived_dataset(data, slice_dir, {"train": rows}, {"strength_slice": k, "slices": slices,
                                                                  "strength_dataset": read_manifest(Path(strength.dataset))["version"]})
        jobs.append((model_cfg, slice_dir, work / f"{name}-slice{k:02d}-model"))
    summaries = fit_parallel(jobs)
    groups = load_groups(data)
    validation, test = groups["validation"].to_list(), groups["test"].to_list()
    table = []
    for k, ((_, _, model_dir), summary) in enumerate(zip(jobs, summaries)):
        scorer = RewardScorer(model_dir)
        row = {"dataset": name, "slice": k, "range": f"{100 * k // slices}-{100 * (k + 1) // slices}%",
               "strength_min": round(float(bounds[k].min()), 4), "strength_max": round(float(bounds[k].max()), 4),
               "train_pairs": int(summary["pairs_trained"]), "steps": int(summary["steps"]),
               "validation": accuracy_with_ci(evaluate_rows(scorer, validation)),
               "test": accuracy_with_ci(evaluate_rows(scorer, test))}
        emit(row)
        table.append(row)
    return {"dataset": name, "slices": table, "strength_dataset": strength.dataset, "slice_epochs": model_cfg.optim.epochs,
            "strength_dataset_version": strength.summary["dataset_version"], "members": cfg.strength.ensemble,
            "member_val_accuracy": [round(a, 4) for a in ensemble["member_val_accuracy"]],
            "negative_strength_fraction": round(float((train["mean"] < 0).mean()), 4)}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["slices"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, shift, marker in (("validation", -0.08, "o"), ("test", 0.08, "s")):
        acc = np.array([r[split]["accuracy"] for r in rows], dtype=float)
        ci = np.array([r[split]["ci95"] for r in rows], dtype=float)
        ax.errorbar(x + shift, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], fmt=f"{marker}-", capsize=3, label=split)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(x, [r["range"] for r in rows], rotation=45)
    ax.set(xlabel="train pairs by ensemble mean strength (lowest first)", ylabel="accuracy", ylim=(0, 1),
           title=f"{result['dataset']}: one reward model per strength slice")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    lines = ["| slice | mean strength | train pairs | validation acc [95% CI] | test acc [95% CI] |", "|---|---|---|---|---|"]
    for r in result["slices"]:
        v, t = r["validation"], r["test"]
        lines.append(f"| {r['range']} | {r['strength_min']:+.3f} … {r['strength_max']:+.3f} | {r['train_pairs']} | "
                     f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {t['accuracy']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] |")
    return "\n".join(lines)


def log_to_mlflow(cfg: RunConfig, result: dict[str, Any], figure: Path, table_md: str) -> str:
    """One parent run per dataset (table, figure, strength dataset version), a child run per slice."""
    import mlflow

    from rmflow.infra.mlflow_client import configure_mlflow

    configure_mlflow()
    with mlflow.start_run(run_name=f"strength-slices-{result['dataset']}") as parent:
        mlflow.set_tags({"rmflow.kind": "strength-slices", "strength_dataset_version": result["strength_dataset_version"]})
        mlflow.log_params({**cfg.flat_params(), "slices": len(result["slices"]), "dataset": result["dataset"]})
        mlflow.log_metrics({"negative_strength_fraction": result["negative_strength_fraction"],
                            **{f"member{m}_val_accuracy": a for m, a in enumerate(result["member_val_accuracy"])}})
        mlflow.log_dict(result, "strength_slices/slices.json")
        mlflow.log_text(table_md, "strength_slices/slices.md")
        mlflow.log_artifact(str(figure), "strength_slices")
        for r in result["slices"]:
            with mlflow.start_run(run_name=f"slice-{r['range']}", nested=True):
                mlflow.log_params({"slice": r["slice"], "range": r["range"], "train_pairs": r["train_pairs"]})
                mlflow.log_metrics({f"{s}_accuracy": r[s]["accuracy"] for s in ("validation", "test") if r[s]["pairs"]})
        return parent.info.run_id


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common_args(__doc__, "qa-feedback,hh-rlhf")
    p.add_argument("--data", type=Path, default=None, help="An rmflow dataset folder instead of --datasets.")
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--epochs", type=float, default=1.0, help="Epochs of the ensemble members over the train split.")
    p.add_argument("--slice-epochs", type=float, default=None, help="Epochs of each slice model over its slice "
                   "(default slices × epochs: every slice model takes as many steps as one full-data model).")
    p.add_argument("--out", type=Path, default=Path("out/strength-slices"), help="Where the figures and tables go.")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    cfg = RunConfig.model_validate({"model": {"backbone": args.backbone, "max_length": args.max_length},
                                    "optim": {"lr": args.lr, "epochs": args.epochs},
                                    "strength": {"ensemble": args.ensemble}})
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        sources = [("data", args.data)] if args.data else [(k, None) for k in args.datasets.split(",")]
        for kind, folder in sources:
            data = folder or prepare(kind, args.shared, Path(work), args.limit)
            name = read_manifest(data)["version"] if folder else kind
            result = slice_experiment(cfg, data, args.slices, Path(work), name, args.slice_epochs)
            figure = plot(result, args.out / f"strength_slices_{name}.png")
            table_md = markdown(result)
            print(f"\n{name}\n{table_md}", file=sys.stderr)
            result["figure"] = str(figure)
            if not args.no_mlflow:
                result["mlflow_run"] = log_to_mlflow(cfg, result, figure, table_md)
            result.pop("strength_dataset")  # a temporary folder; the version names it
            results.append(result)
    (args.out / "strength_slices.json").write_text(json.dumps(results, indent=2))
    summary = {"results": results}
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
