"""The full evaluation of a reward model on one evaluation set: metrics, plots, markdown report.

Beyond accuracy it measures what bites reward models in RL: calibration (ECE + reliability),
length bias (Spearman between reward and response length; accuracy when the chosen response is
the shorter one), accuracy per rank distance and per preference-strength bucket, and a per-token
probe (reward of every prefix of a few fixed responses).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from rmcore.metrics import pair_metrics, reliability_curve
from rmcore.scoring import RewardScorer

PROBE_RESPONSES = 3


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    correct: np.ndarray  # per strict pair, in a fixed order: the unit of the paired bootstrap
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    reliability: list[dict[str, float]]
    probes: list[dict[str, Any]] = field(default_factory=list)


def evaluate_rows(scorer: RewardScorer, rows: list[dict[str, Any]]) -> Evaluation:
    """Scores every completion of every group once and derives all metrics from those scores."""
    prompts = [r["prompt"] for r in rows for _ in r["completions"]]
    texts = [c for r in rows for c in r["completions"]]
    rewards = scorer.score(prompts, texts)
    diffs, tie_diffs, chosen, rejected, distance, strength, len_c, len_r = [], [], [], [], [], [], [], []
    base = 0
    for r in rows:
        k = len(r["completions"])
        rw = rewards[base:base + k]
        for n, (w, l) in enumerate(r["pairs"]):
            diffs.append(rw[w] - rw[l])
            chosen.append(rw[w])
            rejected.append(rw[l])
            distance.append(r["blocks"][l] - r["blocks"][w])
            strength.append((r.get("strengths") or [np.nan] * len(r["pairs"]))[n])
            len_c.append(len(r["completions"][w].split()))
            len_r.append(len(r["completions"][l].split()))
        tie_diffs += [rw[a] - rw[b] for a, b in r["ties"]]
        base += k
    d = np.array(diffs)
    metrics = pair_metrics(d, np.array(tie_diffs), rewards)
    lengths = np.array([len(t.split()) for t in texts])
    metrics["length_bias"] = float(spearmanr(rewards, lengths).statistic) if len(set(lengths)) > 1 else 0.0
    shorter = np.array(len_c) < np.array(len_r)
    metrics["accuracy_chosen_shorter"] = float((d[shorter] > 0).mean()) if shorter.any() else float("nan")
    metrics["accuracy_by_rank_distance"] = _bucketed(d, np.array(distance), lambda v: str(int(v)))
    s = np.array(strength, dtype=float)
    if np.isfinite(s).any():
        edges = np.nanquantile(s, [0.25, 0.5, 0.75])
        metrics["accuracy_by_strength_quartile"] = _bucketed(d, s, lambda v: f"q{int(np.searchsorted(edges, v)) + 1}")
    return Evaluation(metrics, (d > 0).astype(np.int8), np.array(chosen), np.array(rejected), reliability_curve(d))


def _bucketed(diffs: np.ndarray, keys: np.ndarray, name) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    labels = np.array([name(k) for k in keys]) if len(keys) else np.array([])
    for label in sorted(set(labels)):
        m = labels == label
        out[label] = {"accuracy": float((diffs[m] > 0).mean()), "n": int(m.sum())}
    return out


def add_probes(scorer: RewardScorer, rows: list[dict[str, Any]], evaluation: Evaluation) -> None:
    """Per-token probes on the best completion of the first few prompts (a fixed choice, so
    successive model versions are probed on the same text)."""
    for r in rows[:PROBE_RESPONSES]:
        tokens, rewards = scorer.prefix_rewards(r["prompt"], r["completions"][0])
        evaluation.probes.append({"prompt": r["prompt"][-200:], "tokens": tokens, "rewards": rewards.tolist()})


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
    for key in ("accuracy_by_rank_distance", "accuracy_by_strength_quartile"):
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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

