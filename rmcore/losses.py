"""Reward-model losses over one batch of scored completions.

Every unique completion of a batch is scored once; pairs and rankings are index tensors into that
score vector, so a K-wise group costs K forward sequences however many pairs it holds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rmcore.config import LossConfig, LossName


@dataclass
class PairIndex:
    """The comparisons of a batch, as indices into its reward vector.

    chosen/rejected/margin/weight/strength/smoothing/group: one entry per strict pair.
    rank_seq/rank_block: (G, Kmax) each group's sequences best→worst and their tie blocks,
    -1 where a group has fewer than Kmax completions (used by plackett_luce).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor
    weight: torch.Tensor
    strength: torch.Tensor
    smoothing: torch.Tensor
    group: torch.Tensor
    rank_seq: torch.Tensor
    rank_block: torch.Tensor

    def to(self, device: torch.device | str) -> PairIndex:
        return PairIndex(**{k: v.to(device) for k, v in vars(self).items()})

    @property
    def num_groups(self) -> int:
        return int(self.rank_seq.shape[0])


def smoothed_logsigmoid_loss(diff: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """-(1-α) log σ(d) - α log σ(-d); α = 0 is Bradley-Terry."""
    return -(1 - alpha) * F.logsigmoid(diff) - alpha * F.logsigmoid(-diff)


def smoothed_softplus_loss(diff: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The log(1 + e^(r_l - r_w)) form: softplus(-d) = -log σ(d), stable for any d."""
    return (1 - alpha) * F.softplus(-diff) + alpha * F.softplus(diff)


def _pair_diffs(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig, use_data_margin: bool) -> torch.Tensor:
    diff = rewards[idx.chosen] - rewards[idx.rejected]
    if use_data_margin:
        diff = diff - cfg.margin_scale * idx.margin
    if cfg.adaptive_margin:  # a pair the ensemble doubts gets no margin, not a negative one
        diff = diff - cfg.adaptive_margin * idx.strength.clamp_min(0)
    return diff


def _weighted_mean(per_pair: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_pair * weight).sum() / weight.sum().clamp_min(1e-8)


def bt_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig) -> torch.Tensor:
    return _weighted_mean(smoothed_logsigmoid_loss(_pair_diffs(rewards, idx, cfg, False), idx.smoothing), idx.weight)


def bt_logexp_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig) -> torch.Tensor:
    return _weighted_mean(smoothed_softplus_loss(_pair_diffs(rewards, idx, cfg, False), idx.smoothing), idx.weight)


def margin_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig) -> torch.Tensor:
    return _weighted_mean(smoothed_logsigmoid_loss(_pair_diffs(rewards, idx, cfg, True), idx.smoothing), idx.weight)


def kwise_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig) -> torch.Tensor:
    """InstructGPT: each prompt's pairs weighted 1/(its number of strict pairs) — 1/C(K,2) for a
    strict ranking — so every prompt counts once, whatever its K."""
    per_pair = smoothed_logsigmoid_loss(_pair_diffs(rewards, idx, cfg, False), idx.smoothing) * idx.weight
    pairs_in_group = torch.bincount(idx.group, minlength=idx.num_groups)
    has_pairs = pairs_in_group > 0
    per_group = torch.zeros(idx.num_groups, device=rewards.device, dtype=per_pair.dtype).index_add(0, idx.group, per_pair)
    return (per_group[has_pairs] / pairs_in_group[has_pairs]).sum() / has_pairs.sum().clamp_min(1)


def plackett_luce_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig) -> torch.Tensor:
    """-Σ_i [r_i - log Σ_{j ranked at or below i's tie block} e^{r_j}], per group divided by its
    K-1 choices. Tied completions share one risk set (Breslow), so a tie asks for equal rewards
    instead of an arbitrary order."""
    valid = idx.rank_seq >= 0
    r = torch.where(valid, rewards[idx.rank_seq.clamp_min(0)], torch.zeros((), device=rewards.device))
    if cfg.adaptive_margin:  # strength is per pair; PL has no pair to apply it to
        raise ValueError("adaptive_margin applies to pairwise losses, not plackett_luce")
    block = idx.rank_block
    in_risk = valid.unsqueeze(1) & (block.unsqueeze(1) >= block.unsqueeze(2))  # [g, i, j]: j at/below i
    scores = r.unsqueeze(1).expand_as(in_risk).masked_fill(~in_risk, float("-inf"))
    log_risk = torch.logsumexp(scores, dim=-1)
    terms = torch.where(valid, r - log_risk, torch.zeros((), device=rewards.device))
    choices = (valid.sum(-1) - 1).clamp_min(1)
    ranked = valid.sum(-1) >= 2
    return -(terms.sum(-1) / choices)[ranked].sum() / ranked.sum().clamp_min(1)


def reward_centering(rewards: torch.Tensor, idx: PairIndex) -> torch.Tensor:
    return ((rewards[idx.chosen] + rewards[idx.rejected]) ** 2).mean()


LOSSES: dict[str, Callable[[torch.Tensor, PairIndex, LossConfig], torch.Tensor]] = {
    LossName.bt: bt_loss,
    LossName.bt_logexp: bt_logexp_loss,
    LossName.margin: margin_loss,
    LossName.kwise: kwise_loss,
    LossName.plackett_luce: plackett_luce_loss,
}
assert set(LOSSES) == set(LossName), "every LossName needs its loss function"


def normalisers(idx: PairIndex, cfg: LossConfig) -> tuple[torch.Tensor, int]:
    """What the configured loss and the centering term divide their sums by over `idx`'s batch:
    the pairs' total weight (bt, bt_logexp, margin), the groups with a strict pair (kwise), the groups
    with a ranking (plackett_luce); the number of pairs (centering). Each is a sum over whole groups."""
    if cfg.name == LossName.kwise:
        loss = (torch.bincount(idx.group, minlength=idx.num_groups) > 0).sum().clamp_min(1)
    elif cfg.name == LossName.plackett_luce:
        loss = ((idx.rank_seq >= 0).sum(-1) >= 2).sum().clamp_min(1)
    else:
        loss = idx.weight.sum().clamp_min(1e-8)
    return loss.float(), int(idx.chosen.numel())


def compute_loss(rewards: torch.Tensor, idx: PairIndex, cfg: LossConfig, part_of: PairIndex | None = None) -> torch.Tensor:
    """The configured loss plus the optional centering term. `part_of`: the batch `idx` is a part of
    (whole prompt groups of it): the loss is then this part's share of the batch's loss, its own sums
    over the batch's normalisers, so the parts' losses add up to the batch's (micro-batches)."""
    loss = LOSSES[cfg.name](rewards, idx, cfg)
    own = whole = None
    if part_of is not None:
        own, whole = normalisers(idx, cfg), normalisers(part_of, cfg)
        loss = loss * (own[0].to(loss.device) / whole[0].to(loss.device))
    if cfg.center_rewards and idx.chosen.numel():
        center = reward_centering(rewards, idx)
        loss = loss + cfg.center_rewards * (center * (own[1] / whole[1]) if part_of is not None else center)
    return loss
