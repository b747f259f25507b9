"""rmflow's loop under torchrun (`rmflow.infra.torchrun`), two gloo CPU workers: no Ray involved."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rmcore.batching import Encoder, encode_groups, group_micro_batches
from rmcore.config import load_run_config
from rmcore.model import RewardModel, load_tokenizer
from rmcore.train import ShardedPlan, TrainLoop, WorkerContext, seed_everything, split_rows
from rmflow.bench.faults import kill_a_worker_after_first_checkpoint
from rmflow.options import parse_sets

pytestmark = pytest.mark.slow
MAX_TOKENS = 384  # small enough that a step needs several micro-batches, a different number per rank


def torchrun(nproc: int, *args: str, timeout: float = 600, restarts: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "--max-restarts", str(restarts), "-m", "rmflow.infra.torchrun", *args],
                          capture_output=True, text=True, timeout=timeout)


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


def test_a_killed_rank_restarts_both_and_they_resume_and_train_each_group_once(tiny_bert, synthetic_dataset, tmp_path):
    """torchrun --max-restarts with 2 gloo ranks, one SIGKILLed after the first checkpoint: the agent
    restarts the group, which resumes from the newest complete checkpoint and finishes. The restarted
    ranks used to hang in gloo's connectFullMesh: torchrun keeps one store for every restart, and they
    read the dead attempt's addresses from it (`attempt_store`)."""
    killed: list[int] = []
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint,
                               args=(tmp_path / "model.checkpoints", killed, 200, "torchrun"), daemon=True)
    watcher.start()
    out = torchrun(2, "--data", str(synthetic_dataset), "--out", str(tmp_path / "model"), "--timeout-s", "60",
                   "--summary", str(tmp_path / "summary.json"), "--set", f"model.backbone={tiny_bert}",
                   "--set", "model.max_length=128", "--set", "optim.lr=3e-3", "--set", "scale.checkpoint_every=2",
                   restarts=2, timeout=240)
    watcher.join(timeout=5)
    assert killed, "no rank was killed: the run ended before its first checkpoint"
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["restarts"] >= 1 and summary["resumed_from_step"] >= 2
    assert all(c == 1 for c in summary["group_train_counts"]), "a prompt group was trained twice or never"
    expected = sum(len(r["pairs"]) for r in split_rows(synthetic_dataset, "train"))
    assert summary["pairs_trained"] == expected > summary["pairs_this_attempt"]
    assert (tmp_path / "model" / "rmflow_model.json").is_file()


def test_the_process_group_store_is_per_attempt_and_several_nodes_with_restarts_are_refused(monkeypatch):
    from rmflow.infra.torchrun import attempt_store

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert attempt_store(1, 2, timedelta(seconds=5)) is None  # torchrun gave the attempt a fresh store: env:// as usual
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with pytest.raises(SystemExit, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        attempt_store(1, 4, timedelta(seconds=5))
    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    first, second = attempt_store(0, 1, timedelta(seconds=5)), attempt_store(1, 1, timedelta(seconds=5))
    first.set("default_pg/0/rank_0", "attempt 0")
    second.set("default_pg/0/rank_0", "attempt 1")
    assert first.get("default_pg/0/rank_0") == b"attempt 0" and second.get("default_pg/0/rank_0") == b"attempt 1"


def test_two_ranks_after_one_step_hold_the_parameters_of_one_process_on_both_their_batches(tiny_bert, synthetic_dataset, tmp_path):
    """DDP's gradient all-reduce: 2 gloo ranks under torchrun, one optimiser step (rank r trains batch r
    of the plan, in a different number of token-capped forwards) end with the parameters of one
    process taking one step over both batches (gradient accumulation of the two: the mean DDP takes).
    Rank 0's batch alone gives other parameters, so a missing all-reduce fails the test."""
    sets = [f"model.backbone={tiny_bert}", "model.max_length=128", "optim.lr=3e-3", "optim.pairs_per_step=32", "optim.warmup_ratio=0",
            f"optim.max_tokens_per_forward={MAX_TOKENS}", "scale.checkpoint_every=0"]
    cfg = load_run_config(None, parse_sets(sets) | {"device": "cpu"})
    tok = load_tokenizer(str(tiny_bert))
    groups = encode_groups(split_rows(synthetic_dataset, "train"), Encoder(tok, 128))
    plan = [b for b, _ in ShardedPlan(groups, 16, cfg.optim.seed, 0, 1).steps(0)]  # both runs' micro-batches of 16 pairs
    # 1.5 batches of the epoch: one step of one batch a rank (the rest of the epoch not run)
    out = torchrun(2, "--data", str(synthetic_dataset), "--out", str(tmp_path / "model"), "--timeout-s", "60",
                   "--summary", str(tmp_path / "summary.json"), *[a for s in sets + [f"optim.epochs={1.5 / len(plan)}"]
                                                                  for a in ("--set", s)], timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_run"] == 1 and summary["workers"] == 2
    assert sum(summary["group_train_counts"]) == len(plan[0]) + len(plan[1])
    two_ranks = RewardModel.load(tmp_path / "model")[0].state_dict()

    def one_process(batches: list[list[int]]) -> dict[str, torch.Tensor]:
        one = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"grad_accum": len(batches), "epochs": 1.0})})
        seed_everything(one.optim.seed)  # as train_reward_model does: the same initial weights
        model = RewardModel.from_backbone(one.model, tok.pad_token_id)
        loop = TrainLoop(one, model, model, groups, ([], []), tok.pad_token_id, WorkerContext(show_progress=False), False)
        loop.step(batches)
        return model.state_dict()

    union, rank0_alone = one_process(plan[:2]), one_process(plan[:1])
    assert two_ranks.keys() == union.keys() and len(union) > 10
    lr = cfg.optim.lr  # AdamW's first step moves a weight by about lr: differences far below it are rounding
    for name in union:
        torch.testing.assert_close(two_ranks[name], union[name], rtol=0, atol=1e-3 * lr, msg=name)
    assert max((two_ranks[n] - rank0_alone[n]).abs().max().item() for n in union) > 0.5 * lr
