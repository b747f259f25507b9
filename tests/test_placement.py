"""Where the model is before it is wrapped: FSDP exists for backbones that do not fit one device, so
the full model must never be placed on the device before it is sharded."""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rmcore.config import RunConfig
from rmcore.model import RewardModel, load_tokenizer
from rmcore.parallel import is_sharded, shard
from rmcore.train import WorkerContext, train_reward_model


class Wrapped(Exception):
    pass


def test_prepare_model_gets_the_model_on_the_cpu_not_the_device(tiny_bert, synthetic_dataset):
    """The device here is `meta` (a device with no memory): the model used to be moved to the
    device whole (`.to(ctx.device)`) before `prepare_model` (FSDP's shard) saw it, which on a GPU
    means the full fp32 model on every GPU before sharding."""
    seen = {}

    def prepare(model):
        seen["devices"] = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
        raise Wrapped

    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 64}, "device": "cpu"})
    with pytest.raises(Wrapped):
        train_reward_model(cfg, synthetic_dataset, None, WorkerContext(device=torch.device("meta"), prepare_model=prepare))
    assert seen["devices"] == {"cpu"}


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_shard_takes_a_cpu_model_and_shards_it_unit_by_unit(tiny_bert, one_rank_group):
    from torch.distributed.tensor import DTensor

    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert)}}).model
    tok = load_tokenizer(str(tiny_bert))
    model = RewardModel.from_backbone(cfg, tok.pad_token_id)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    expected = model(ids, torch.ones_like(ids)).detach()
    sharded = shard(model, torch.device("cpu"), "float32")
    assert is_sharded(sharded) and all(isinstance(p, DTensor) for p in sharded.parameters())
    torch.testing.assert_close(sharded(ids, torch.ones_like(ids)).detach(), expected)

    class OnTheDevice(torch.nn.Module):  # what the old order handed to shard: parameters on a GPU already
        def parameters(self, recurse: bool = True):
            yield SimpleNamespace(device=torch.device("cuda", 0))

    with pytest.raises(ValueError, match="on the CPU"):
        shard(OnTheDevice(), torch.device("cpu"), "float32")
