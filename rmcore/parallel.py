"""Sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for backbones that do not fit
one device: each transformer block (the classes a Hugging Face model lists in `_no_split_modules`)
and then the whole reward model become FSDP units, so parameters, gradients and optimiser state
are split over the workers and gathered one block at a time.

What changes for the loop: state dicts are collectives (every rank calls; rank 0 receives the full
tensors, on the CPU) and every rank must run as many forwards and backwards (the loop gives every
rank as many micro-batches, one forward each). The model is sharded from the CPU (`shard`).
Checkpoints and the saved model hold full, unsharded tensors, the same format as a DDP run.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """FSDP2 over `model.backbone`'s blocks, then the whole model (in place; returns it). On CUDA
    with bf16 (`dtype` auto/bfloat16) blocks compute and gather in bf16 and reduce in fp32.

    `model` comes on the CPU: `fully_shard` moves one unit's parameters at a time to `device` and
    keeps this rank's shard of them, so the device never holds more than one block's full weights
    (the largest unit: the embeddings, or a block), never the whole model. Each rank holds the full
    fp32 model in CPU memory while it loads (from_pretrained)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(p.device.type not in ("cpu", "meta") for p in model.parameters()):
        raise ValueError("shard() takes the model on the CPU: placed on the device whole first, it may not fit")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # fully_shard's default mesh places shards on the current device
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model.backbone, "_no_split_modules", None) or [])
    units = [m for m in model.backbone.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"{type(model.backbone).__name__} names no transformer block class (_no_split_modules) to shard by")
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` under DDP, without DDP's buffer broadcast. The buffers of rmflow's models
    are constants (position ids, rotary frequencies), equal on every rank, so nothing needs
    broadcasting; and a broadcast in every forward is a collective that must never depend on how a
    rank's batch splits into forwards (once it did: mismatched collectives, a hang under nccl). The
    loop gives every rank as many micro-batches and all-reduces gradients in the last backward of a
    step only (`no_sync` on the others)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model.to(device), device_ids=ids, broadcast_buffers=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimiser) state dicts. Sharded: a collective; rank 0 gets full CPU tensors, the
    other ranks empty dicts."""
    if not is_sharded(model):
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_full(cpu_offload=True))


def full_model_state(model: nn.Module) -> dict[str, Any] | None:
    """The model's full state dict (a collective when sharded; rank 0 gets it); None unsharded
    (the module itself holds full tensors)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict[str, Any], opt_state: dict[str, Any]) -> None:
    """Loads full state dicts (as `full_state` returned them on rank 0; every rank passes them)."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state, options=_full())
