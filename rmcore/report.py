"""Reports of an evaluation (`rmcore.metrics.Evaluation`): markdown and PNG plots (reward
histograms, reliability, per-token probes), and the preference-strength report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rmcore.metrics import Evaluation


def write_report(evaluation: Evaluation, out_dir: Path, title: str, gate_table: list[dict] | None = None) -> list[Path]:
    """Markdown report + PNG plots; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(evaluation.chosen_rewards, bins=30, alpha=0.6, label="chosen")
    ax.hist(evaluation.rejected_rewards, bins=30, alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="pairs", title="Chosen vs rejected rewards")
    ax.legend()
    files.append(_save(fig, out_dir / "reward_histogram.png"))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1)
    ax.plot([b["confidence"] for b in evaluation.reliability], [b["accuracy"] for b in evaluation.reliability], "o-")
    ax.set(xlabel="confidence max(σ(d), 1-σ(d))", ylabel="accuracy", title=f"Reliability (ECE {evaluation.metrics['ece']:.3f})")
    files.append(_save(fig, out_dir / "reliability.png"))
    if evaluation.probes:
        fig, ax = plt.subplots(figsize=(8, 4))
        for n, p in enumerate(evaluation.probes):
            ax.plot(range(1, len(p["rewards"]) + 1), p["rewards"], label=f"response {n + 1}")
        ax.set(xlabel="response tokens", ylabel="reward of prefix", title="Per-token reward probe")
        ax.legend()
        files.append(_save(fig, out_dir / "per_token_probe.png"))
    md = [f"# {title}", "", "| metric | value |", "|---|---|"]
    md += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.metrics.items() if not isinstance(v, dict)]
    for key in ("accuracy_by_rank_distance", "accuracy_by_strength_decile"):
        if key in evaluation.metrics:
            md += ["", f"## {key.replace('_', ' ')}", "", "| bucket | accuracy | n |", "|---|---|---|"]
            md += [f"| {b} | {v['accuracy']:.3f} | {v['n']} |" for b, v in evaluation.metrics[key].items()]
    if gate_table:
        md += ["", "## Gate", "", "| check | value | threshold | passed |", "|---|---|---|---|"]
        md += [f"| {c['check']} | {c['value']:.4f} | {c['threshold']} | {'yes' if c['passed'] else 'NO'} |" for c in gate_table]
    md += ["", "![rewards](reward_histogram.png)", "![reliability](reliability.png)"]
    if evaluation.probes:
        md += ["![per-token](per_token_probe.png)"]
    report = out_dir / "evaluation_report.md"
    report.write_text("\n".join(md) + "\n")
    (out_dir / "evaluation_metrics.json").write_text(json.dumps(evaluation.metrics, indent=2, default=float))
    return files + [report, out_dir / "evaluation_metrics.json"]


def write_strength_report(out_dir: Path, strengths: dict[str, dict[str, list[float]]], counts: dict[str, int],
                          strategy: str, heldout_deciles: dict[str, dict[str, float]] | None) -> list[Path]:
    """The preference-strength report: strength histograms (train and held-out), ensemble std
    against mean, how many train pairs each strategy changes, and the trained model's held-out
    accuracy per strength decile. `strengths` maps split → {"mean": [...], "std": [...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    train_mean, train_std = np.array(strengths["train"]["mean"]), np.array(strengths["train"]["std"])
    heldout = np.concatenate([np.array(strengths[s]["mean"]) for s in ("validation", "test") if s in strengths] or [np.zeros(0)])
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([train_mean, heldout]), bins=40)
    ax.hist(train_mean, bins=bins, alpha=0.6, density=True, label=f"train ({len(train_mean)} pairs)")
    if len(heldout):
        ax.hist(heldout, bins=bins, alpha=0.6, density=True, label=f"held-out ({len(heldout)} pairs)")
    ax.axvline(0, color="k", lw=1, ls="--")
    ax.set(xlabel="mean strength  r_chosen - r_rejected", ylabel="density", title="Preference strength (ensemble mean)")
    ax.legend()
    files = [_save(fig, out_dir / "strength_histogram.png")]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(train_mean, train_std, s=4, alpha=0.4)
    ax.set(xlabel="mean strength", ylabel="ensemble std", title="Ensemble disagreement (train pairs)")
    files.append(_save(fig, out_dir / "strength_mean_std.png"))
    negative = float((train_mean < 0).mean()) if len(train_mean) else float("nan")
    md = ["# Preference strength", "", f"Strategy: `{strategy}`. Train pairs: {len(train_mean)}; negative mean strength: "
          f"{negative:.1%}; mean {train_mean.mean() if len(train_mean) else float('nan'):.3f}, "
          f"mean std {train_std.mean() if len(train_std) else float('nan'):.3f}.", "",
          "## Train pairs each strategy changes", "", "| strategy | pairs changed |", "|---|---|"]
    md += [f"| {k}{' (this run)' if k == strategy else ''} | {v} |" for k, v in counts.items()]
    if heldout_deciles:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(list(heldout_deciles), [v["accuracy"] for v in heldout_deciles.values()])
        ax.axhline(0.5, color="k", lw=1, ls="--")
        ax.set(xlabel="held-out strength decile (d01 = lowest)", ylabel="accuracy", ylim=(0, 1), title="Held-out accuracy by strength")
        files.append(_save(fig, out_dir / "accuracy_by_strength_decile.png"))
        md += ["", "## Held-out accuracy per strength decile (validation + test)", "", "| decile | accuracy | n |", "|---|---|---|"]
        md += [f"| {k} | {v['accuracy']:.3f} | {v['n']} |" for k, v in heldout_deciles.items()]
    md += ["", *[f"![{f.stem}]({f.name})" for f in files]]
    report = out_dir / "strength_report.md"
    report.write_text("\n".join(md) + "\n")
    return files + [report]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

