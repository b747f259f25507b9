"""rmflow's loop under torchrun (`rmflow.infra.torchrun`), two gloo CPU workers: no Ray involved."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rmcore.batching import Encoder, encode_groups, group_micro_batches
from rmcore.model import load_tokenizer
from rmcore.train import ShardedPlan, split_rows

pytestmark = pytest.mark.slow
MAX_TOKENS = 384  # small enough that a step needs several micro-batches, a different number per rank


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "rmflow.infra.torchrun", *args], capture_output=True, text=True, timeout=timeout)


def forwards_per_rank(backbone: Path, data: Path, max_length: int, pairs_per_step: int, world: int) -> list[list[int]]:
    """Micro-batches (one forward each) each rank's step of epoch 0 splits into, before the loop
    evens them out across ranks."""
    encoder = Encoder(load_tokenizer(str(backbone)), max_length)
    groups = encode_groups(split_rows(data, "train"), encoder)
    per_rank = []
    for rank in range(world):
        steps = ShardedPlan(groups, pairs_per_step // world, 0, rank, world).steps(0)
        per_rank.append([len(group_micro_batches([groups[i] for i in b], MAX_TOKENS)) for b, _ in steps])
    return per_rank


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_with_different_forward_counts_train_to_the_end(tiny_bert, synthetic_dataset, tmp_path, strategy):
    """DDP used to broadcast buffers in every forward: ranks whose steps split into a different
    number of forward chunks issued mismatched collectives (a hang under nccl, a stuck or failed
    run under gloo); FSDP gathers and reduces in every forward and backward, so it ran without a
    token budget. Two gloo workers with such steps must finish and train every group once."""
    counts = forwards_per_rank(tiny_bert, synthetic_dataset, 128, 16, 2)
    assert any(a != b for a, b in zip(*counts)), "the test data no longer gives the ranks different forward counts"
    out = torchrun(2, "--data", str(synthetic_dataset), "--out", str(tmp_path / "model"), "--timeout-s", "120",
                   "--set", f"scale.parallel_strategy={strategy}",
                   "--set", f"model.backbone={tiny_bert}", "--set", "model.max_length=128", "--set", "optim.lr=3e-3",
                   "--set", f"optim.max_tokens_per_forward={MAX_TOKENS}", "--set", "scale.checkpoint_every=3")
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["backend"] == "gloo" and summary["restarts"] == 0
    assert summary["pairs_trained"] == summary["pairs_this_attempt"] > 0 and summary["pairs_per_s"] > 0
    assert summary["val_accuracy"] > 0.6
    assert (tmp_path / "model" / "rmflow_model.json").is_file()
    kept = sorted(p.name for p in (tmp_path / "model.checkpoints").iterdir())
    assert len(kept) == 2 and all((tmp_path / "model.checkpoints" / k / "complete").is_file() for k in kept)


def test_a_second_launch_refuses_another_runs_checkpoints_unless_resumed(tiny_bert, synthetic_dataset, tmp_path):
    args = ["--data", str(synthetic_dataset), "--out", str(tmp_path / "model"), "--set", f"model.backbone={tiny_bert}",
            "--set", "model.max_length=64", "--set", "scale.checkpoint_every=5", "--summary", str(tmp_path / "summary.json")]
    assert torchrun(1, *args).returncode == 0
    again = torchrun(1, *args)
    assert again.returncode != 0 and "holds checkpoints of another run" in again.stderr
    resumed = torchrun(1, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # resumed from the last checkpoint: the earlier attempt's pairs count as trained, not as this attempt's speed
    assert summary["resumed_from_step"] > 0 and summary["pairs_this_attempt"] < summary["pairs_trained"]
    assert summary["pairs_per_s"] == pytest.approx(summary["pairs_this_attempt"] / summary["train_s"], rel=0.01)
