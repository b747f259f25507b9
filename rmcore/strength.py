"""Preference strength and what to do with it ("Secrets of RLHF", Part II).

An ensemble of M reward models, trained on the same data with different seeds and data orders,
scores every training pair; the strength of a pair is the mean (and std) over members of
r_chosen - r_rejected. Low-strength pairs — negative mean: the ensemble disagrees with the label —
are the likely label noise. Strategies:
- flip: swap chosen and rejected of the selected pairs;
- soft: label smoothing `soft_alpha` on the selected pairs only;
- margin: adaptive margin = margin_coef × max(mean strength, 0) on every pair;
- flip+margin, soft+margin: both.
Pairs are selected by mean strength below `flip_below`, or the bottom `flip_fraction` when set.

Active labelling: the pairs the ensemble doubts most — negative mean strength, or a std in the top
`reannotate_std_quantile` — go back to annotators: most negative first, then most disputed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from rmcore.config import RunConfig, StrengthConfig
from rmcore.dataset import read_manifest
from rmcore.records import ReannotationRequest

# files of a strength-annotated dataset version beside its splits
STRENGTH_FILE = "strength.json"  # the ensemble's view: per split, mean and std in the parent's pair order
REANNOTATION_FILE = "reannotation.jsonl"  # doubtful train pairs, most doubtful first


def strength_stats(member_diffs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) over ensemble members of each pair's reward difference."""
    stacked = np.stack(member_diffs)
    return stacked.mean(0), stacked.std(0)


def low_strength_mask(mean: np.ndarray, cfg: StrengthConfig) -> np.ndarray:
    if cfg.flip_fraction > 0:
        k = int(round(cfg.flip_fraction * len(mean)))
        mask = np.zeros(len(mean), dtype=bool)
        mask[np.argsort(mean, kind="stable")[:k]] = True
        return mask
    return mean < cfg.flip_below


def flip_pairs(pairs: list[list[int]], selected: np.ndarray) -> list[list[int]]:
    """The (winner, loser) pairs with the selected ones swapped (its own inverse)."""
    return [[l, w] if s else [w, l] for (w, l), s in zip(pairs, selected)]


def apply_strategy(rows: list[dict[str, Any]], mean: np.ndarray, std: np.ndarray, cfg: StrengthConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New group rows with the strategy applied; `mean`/`std` follow the rows' pairs in order.
    Adds per-pair columns `strengths` (mean strength of the pair as now oriented), `strength_std`
    and `smoothing`."""
    selected = low_strength_mask(mean, cfg)
    flip, soft = cfg.strategy.startswith("flip"), cfg.strategy.startswith("soft")
    out, n = [], 0
    for row in rows:
        row = copy.deepcopy(row)
        k = len(row["pairs"])
        sel, m = selected[n:n + k], mean[n:n + k].astype(float)
        if flip:
            row["pairs"] = flip_pairs(row["pairs"], sel)
            m = np.where(sel, -m, m)
        row["strengths"] = m.tolist()
        row["strength_std"] = std[n:n + k].astype(float).tolist()
        row["smoothing"] = [cfg.soft_alpha if (soft and s) else 0.0 for s in sel]
        out.append(row)
        n += k
    counts = {"pairs": int(len(mean)), "low_strength": int(selected.sum()), "flipped": int(selected.sum()) if flip else 0,
              "smoothed": int(selected.sum()) if soft else 0, "negative_mean": int((mean < 0).sum())}
    return out, counts


def final_run_config(cfg: RunConfig) -> RunConfig:
    """The run config for the model trained on strength-annotated data: strategies with a margin
    turn on the loss's adaptive margin."""
    if not cfg.strength.strategy.endswith("margin"):
        return cfg
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"adaptive_margin": cfg.strength.margin_coef})})


def strategy_counts(mean: np.ndarray, cfg: StrengthConfig) -> dict[str, int]:
    """How many train pairs each strategy changes under `cfg`'s selection rule (margin changes every
    pair with a positive mean strength: the others get a zero margin)."""
    low, positive = low_strength_mask(mean, cfg), mean > 0
    changed = {"flip": low, "soft": low, "margin": positive, "flip+margin": low | positive, "soft+margin": low | positive}
    return {k: int(v.sum()) for k, v in changed.items()}


def reannotation_candidates(split_rows: dict[str, list[dict[str, Any]]], split_strength: dict[str, tuple[np.ndarray, np.ndarray]],
                            std_quantile: float = 0.9, splits: tuple[str, ...] = ("train",)) -> list[ReannotationRequest]:
    """Doubtful pairs of `splits`, most doubtful first, one per (prompt, pair of texts). Only the
    train split by default: relabelling exactly the held-out pairs a model doubts would make later
    test accuracy depend on that model, and change the evaluation labels registered versions were
    gated on."""
    found: dict[tuple[str, frozenset[str]], ReannotationRequest] = {}
    stds = np.concatenate([split_strength[k][1] for k in splits if k in split_strength] or [np.zeros(0)])
    std_cut = float(np.quantile(stds, std_quantile)) if len(stds) else np.inf
    for split in splits:
        if split not in split_rows:
            continue
        rows, (mean, std) = split_rows[split], split_strength[split]
        n = 0
        for row in rows:
            for w, l in row["pairs"]:
                m, s = float(mean[n]), float(std[n])
                n += 1
                if m >= 0 and s < std_cut:
                    continue
                req = ReannotationRequest(row["prompt_id"], row["prompt"], row["completions"][w], row["completions"][l], m, s, split)
                key = (row["prompt_id"], frozenset((req.chosen, req.rejected)))
                if key not in found or _doubt(req) < _doubt(found[key]):
                    found[key] = req
    return sorted(found.values(), key=_doubt)


def _doubt(r: ReannotationRequest) -> tuple[int, float]:
    """Sort key: negative mean strength first, most negative first; then by disagreement. (A z-score
    mean/std ranks worse: with M ≈ 3 members the std is too noisy to divide by.)"""
    return (0, r.mean_strength) if r.mean_strength < 0 else (1, -r.strength_std)


def read_reannotation_candidates(strength_dir: Path) -> list[ReannotationRequest]:
    path = Path(strength_dir) / REANNOTATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{strength_dir} has no {REANNOTATION_FILE}: train with an ensemble (strength.ensemble > 0) first")
    return [ReannotationRequest(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def read_strengths(strength_dir: Path) -> dict[str, dict[str, list[float]]] | None:
    """split → {"mean", "std"} of a strength-annotated dataset version (None for a plain one)."""
    path = Path(strength_dir) / STRENGTH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def as_annotated(rows: list[dict[str, Any]], strength_dir: Path) -> list[dict[str, Any]]:
    """A strength dataset version's training rows (all of them, in its order) with the pairs its strategy
    flipped put back as the annotators ordered them, and their strengths negated back. Rows of a plain
    dataset, or of a strategy that flips nothing, come back as they are. (A sweep ranks its trials on
    training prompts it sets aside: against the human labels, not the ensemble's flips.)"""
    strengths = read_strengths(strength_dir)
    derivation = read_manifest(strength_dir).get("derivation") or {}
    if strengths is None or "strength" not in derivation:
        return rows
    cfg = StrengthConfig.model_validate(derivation["strength"])
    if not cfg.strategy.startswith("flip"):
        return rows
    mean = np.asarray(strengths["train"]["mean"], dtype=float)
    flipped = low_strength_mask(mean, cfg)  # as apply_strategy chose them
    stored = np.asarray([x for r in rows for x in r["strengths"]], dtype=np.float32)
    # each pair's stored strength is the ensemble's mean as the pair is now oriented: a check that these
    # are the rows, in the order, that the mask was computed for
    if len(stored) != len(mean) or not np.array_equal(stored, np.where(flipped, -mean, mean).astype(np.float32)):
        raise ValueError(f"{strength_dir}: the training rows do not match its {STRENGTH_FILE} (which pairs were flipped "
                         "cannot be told)")
    out, n = [], 0
    for row in rows:
        k = len(row["pairs"])
        sel = flipped[n:n + k]
        n += k
        if sel.any():
            row = {**row, "pairs": flip_pairs(row["pairs"], sel), "strengths": [-x if s else x for x, s in zip(row["strengths"], sel)]}
        out.append(row)
    return out


def slice_by_strength(rows: list[dict[str, Any]], mean: np.ndarray, slices: int) -> list[list[dict[str, Any]]]:
    """The train pairs sorted by ensemble mean strength and cut into `slices` equal parts (lowest
    first), each part as group rows holding only its pairs ("Secrets of RLHF", impact of different
    data: one model per slice). Ties are left out: only strict preferences carry a strength."""
    pair_of = [(n, p) for n, row in enumerate(rows) for p in range(len(row["pairs"]))]
    if len(pair_of) != len(mean):
        raise ValueError(f"{len(mean)} strengths for {len(pair_of)} pairs")
    if slices < 1 or slices > len(pair_of):
        raise ValueError(f"cannot cut {len(pair_of)} pairs into {slices} slices")
    order = np.argsort(mean, kind="stable")
    out = []
    for part in np.array_split(order, slices):
        keep: dict[int, list[int]] = {}
        for i in sorted(part.tolist()):
            n, p = pair_of[i]
            keep.setdefault(n, []).append(p)
        out.append([{**rows[n], "pairs": [rows[n]["pairs"][p] for p in ps], "margins": [rows[n]["margins"][p] for p in ps],
                     "ties": []} for n, ps in keep.items()])
    return out
