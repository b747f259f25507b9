"""Running a reward model on token ids: device choice, autocast, length-sorted padded chunks.
Kept apart from training so that scoring (the registered pyfunc, the reward server) imports only
torch and transformers, not the dataset and metrics stack."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from rmcore.batching import pack_chunks, pad_chunks

PACKING_FLOORS = {"transformers": "4.54", "torch": "2.6"}


def packing_version_problem(torch_version: str | None = None, transformers_version: str | None = None) -> str | None:
    """Why these torch/transformers versions cannot run packed rows, or None. Packing needs
    transformers to read sequence boundaries off restarting position ids when no attention mask is
    given (masking_utils' packed-sequence detection, transformers 4.54) and, for SDPA and eager
    attention, to build that block-diagonal mask, which it does on torch >= 2.6 only; older versions
    silently attend across the packed sequences. Defaults: the installed versions."""
    import transformers
    from packaging.version import Version

    found = {"torch": torch_version or torch.__version__, "transformers": transformers_version or transformers.__version__}
    old = [f"{name} {found[name]} < {floor}" for name, floor in PACKING_FLOORS.items()
           if Version(found[name].split("+")[0]).release < Version(floor).release]
    return f"{', '.join(old)}: packed rows would attend across sequences" if old else None


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
