"""Running a reward model on token ids: device choice, autocast, length-sorted padded chunks.
Kept apart from training so that scoring (the registered pyfunc, the reward server) imports only
torch and transformers, not the dataset and metrics stack."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from rmcore.batching import pack_chunks, pad_chunks


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_for(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def score_sequences(
    model: nn.Module, seqs: list[list[int]], pad_id: int, device: torch.device, max_tokens: int, dtype: str = "auto",
    packing: bool = False,
) -> torch.Tensor:
    """Rewards of `seqs` in their given order: length-sorted padded chunks, or packed rows
    (`packing`; the model must support them, see `RewardModel.packing_unsupported`)."""
    rewards = torch.empty(len(seqs), device=device)
    parts = []
    with autocast_for(device, dtype):
        if packing:
            for members, ids, positions, last in pack_chunks(seqs, pad_id, max_tokens):
                parts.append((members, model(ids.to(device), None, positions.to(device), last.to(device))))
        else:
            for members, ids, mask in pad_chunks(seqs, pad_id, max_tokens):
                parts.append((members, model(ids.to(device), mask.to(device))))
    positions = torch.tensor([i for members, _ in parts for i in members], device=device)
    return rewards.index_put((positions,), torch.cat([r for _, r in parts]).float())
