"""Ray Train on a real local Ray runtime (no mocks): N workers, and recovery from a killed worker."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rmcore.config import RunConfig
from rmcore.converters.common import ConversionResult
from rmcore.dataset import write_preference_dataset
from rmcore.synthetic import synthetic_items, synthetic_rankings
from rmflow.bench.faults import kill_a_worker_after_first_checkpoint, ray_train_workers, wait_for_a_checkpoint
from rmflow.infra.ray_train import fit, run_ray_training

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    from rmflow.infra.ray_train import init_ray

    init_ray(None)
    yield
    ray.shutdown()


def cfg_for(backbone: Path, workers: int, epochs: float = 1, **scale) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"backbone": str(backbone), "max_length": 128},
        "optim": {"lr": 3e-3, "epochs": epochs},
        "scale": {"workers": workers, **scale},
    })


def test_two_workers_match_one_worker_accuracy(ray_runtime, tiny_bert, synthetic_dataset, tmp_path):
    one = fit(cfg_for(tiny_bert, 1, epochs=2), synthetic_dataset, tmp_path / "one")
    two = fit(cfg_for(tiny_bert, 2, epochs=2, storage_path=str(tmp_path / "ray")), synthetic_dataset, tmp_path / "two")
    assert two["workers"] == 2 and two["restarts"] == 0
    assert two["pairs_trained"] == one["pairs_trained"]
    assert all(c == 2 for c in two["group_train_counts"])
    # within noise: 3 standard errors of a difference of two accuracies on the same n pairs
    p, n = (one["val_accuracy"] + two["val_accuracy"]) / 2, one["val_pairs"]
    assert abs(two["val_accuracy"] - one["val_accuracy"]) < 3 * math.sqrt(2 * p * (1 - p) / n), (one, two)
    assert two["val_accuracy"] > 0.65
    assert (tmp_path / "two" / "rmflow_model.json").is_file()


def test_one_worker_goes_through_ray_train_when_asked(ray_runtime, tiny_bert, synthetic_dataset, tmp_path):
    """`--workers 1 --ray`: the path one GPU takes to exercise nccl, checkpoints and restarts."""
    summary = fit(cfg_for(tiny_bert, 1, epochs=1, storage_path=str(tmp_path / "ray"), ray=True), synthetic_dataset, tmp_path / "one")
    assert summary["workers"] == 1 and Path(summary["ray_run"]).parent == (tmp_path / "ray").resolve()
    assert (tmp_path / "one" / "rmflow_model.json").is_file()


@pytest.fixture(scope="module")
def slower_backbone(tmp_path_factory, tiny_bert) -> Path:
    """Wide enough that a run outlasts the moment the test kills a worker."""
    from transformers import BertConfig, BertModel

    from rmcore.model import load_tokenizer

    path = tmp_path_factory.mktemp("medium_bert")
    BertModel(BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512)).save_pretrained(path)
    load_tokenizer(str(tiny_bert)).save_pretrained(path)
    return path


def synthetic_data(path: Path, prompts: int, seed: int) -> Path:
    """A K=4 synthetic dataset of `prompts` prompts, one annotator."""
    rankings = synthetic_rankings(synthetic_items(prompts, k=4, seed=seed), annotators=1, seed=seed + 1)
    write_preference_dataset(ConversionResult(rankings=rankings), path, {"kind": "synthetic"})
    return path


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_worker_resumes_from_checkpoint_and_trains_each_pair_once(ray_runtime, slower_backbone, tmp_path, strategy):
    data = synthetic_data(tmp_path / "ds", 240, seed=7)
    storage = tmp_path / "ray"
    cfg = cfg_for(slower_backbone, 2, storage_path=str(storage), checkpoint_every=2, max_failures=2, parallel_strategy=strategy)
    killed: list[int] = []
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(storage / "killtest", killed), daemon=True)
    watcher.start()
    summary = run_ray_training(cfg, data, tmp_path / "model", run_name="killtest")
    watcher.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert summary["restarts"] >= 1
    assert summary["resumed_from_step"] >= 2
    assert all(c == 1 for c in summary["group_train_counts"]), "a prompt group was trained twice or never"


def test_a_corrupted_checkpoint_fails_naming_it_and_a_fresh_run_finishes(ray_runtime, slower_backbone, tmp_path):
    """A checkpoint damaged on storage (truncated state) is never half-loaded: the restart that
    would resume from it fails naming the checkpoint, nothing is written to the model folder, and
    a fresh run trains every prompt group once."""
    data = synthetic_data(tmp_path / "ds", 300, seed=9)
    storage = tmp_path / "ray"
    cfg = cfg_for(slower_backbone, 2, storage_path=str(storage), checkpoint_every=2, max_failures=1)
    damaged: list[str] = []

    def corrupt_then_kill() -> None:
        run_dir = storage / "corrupt"
        wait_for_a_checkpoint(run_dir, 400)
        for state in run_dir.rglob("state.pt"):
            state.write_bytes(state.read_bytes()[:64])
            damaged.append(str(state))
        for proc in ray_train_workers():
            os.kill(proc.pid, signal.SIGKILL)
            return

    watcher = threading.Thread(target=corrupt_then_kill, daemon=True)
    watcher.start()
    with pytest.raises(Exception, match="checkpoint .* is unreadable"):
        run_ray_training(cfg, data, tmp_path / "model", run_name="corrupt")
    watcher.join(timeout=5)
    assert damaged and not (tmp_path / "model").exists()
    fresh = run_ray_training(cfg, data, tmp_path / "model", run_name="fresh")
    assert fresh["restarts"] == 0 and all(c == 1 for c in fresh["group_train_counts"])


def test_a_run_name_resumed_with_another_dataset_or_config_is_refused(ray_runtime, tiny_bert, synthetic_dataset, tmp_path):
    """`--run-name NAME` resumes a failed run from its checkpoint: started again under that name with
    another dataset, or with other training settings, it is refused before anything trains (Ray
    Train would restore the other run's checkpoint into it), naming what differs."""
    from pyarrow import fs

    from rmflow.infra.ray_train import RUN_IDENTITY, _claim_run, run_identity

    storage = tmp_path / "ray"
    cfg = cfg_for(tiny_bert, 2, storage_path=str(storage))
    (storage / "claimed").mkdir(parents=True)
    _claim_run(fs.LocalFileSystem(), str(storage / "claimed" / RUN_IDENTITY), run_identity(cfg, str(synthetic_dataset.resolve())), "claimed")
    other = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ValueError, match="run claimed was started with other training settings"):
        run_ray_training(other, synthetic_dataset, tmp_path / "model", run_name="claimed")
    with pytest.raises(ValueError, match="run claimed was started with another dataset"):
        run_ray_training(cfg, tmp_path / "elsewhere", tmp_path / "model", run_name="claimed")
    assert not (tmp_path / "model").exists()
    # where it runs may change (restarts allowed, placement, the device): the same run
    moved = cfg.model_copy(update={"device": "cpu", "scale": cfg.scale.model_copy(update={"max_failures": 5, "placement_strategy": "SPREAD"})})
    _claim_run(fs.LocalFileSystem(), str(storage / "claimed" / RUN_IDENTITY), run_identity(moved, str(synthetic_dataset.resolve())), "claimed")


def test_the_kill_helper_only_sees_this_runtimes_workers():
    """A process elsewhere on the machine whose command line says RayTrainWorker (someone else's
    Ray job) is never a candidate for the fault tests' SIGKILL."""
    import subprocess

    import psutil

    subprocess.run(["setsid", "bash", "-c", "exec -a RayTrainWorker-someone-elses sleep 30 &"], check=True)
    time.sleep(0.5)
    decoys = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker-someone-elses" in " ".join(p.info["cmdline"] or [])]
    try:
        assert decoys, "the decoy did not start"
        assert not {p.pid for p in ray_train_workers()} & {p.pid for p in decoys}
    finally:
        for p in decoys:
            p.kill()


def test_fsdp_trains_like_ddp_and_saves_the_same_format(ray_runtime, tiny_qwen2, synthetic_dataset, tmp_path):
    """Two gloo CPU workers, sharded (FSDP2) vs replicated (DDP): the same training to float
    tolerance, and saved model folders with the same files, tensor names and shapes."""
    from safetensors import safe_open

    from rmcore.evaluate import evaluate_saved_model

    runs = {s: fit(cfg_for(tiny_qwen2, 2, storage_path=str(tmp_path / "ray"), parallel_strategy=s), synthetic_dataset, tmp_path / s)
            for s in ("ddp", "fsdp")}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert fsdp["pairs_trained"] == ddp["pairs_trained"] > 0 and fsdp["workers"] == 2
    # the same steps; only gradient clipping's norm is summed in another order (bit-equal without clipping)
    assert abs(fsdp["val_margin_mean"] - ddp["val_margin_mean"]) <= 1e-4 * abs(ddp["val_margin_mean"]), (ddp, fsdp)
    files = {s: sorted(str(p.relative_to(tmp_path / s)) for p in (tmp_path / s).rglob("*")) for s in runs}
    assert files["ddp"] == files["fsdp"]

    def tensors(s: str, name: str) -> dict:
        with safe_open(str(tmp_path / s / name), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    for name in ("backbone/model.safetensors", "head.safetensors"):
        assert tensors("ddp", name) == tensors("fsdp", name)
    # the saved weights are the trained ones: the folder scores the validation split as the run did
    saved = evaluate_saved_model(tmp_path / "fsdp", synthetic_dataset, "validation", device="cpu").metrics
    assert saved["margin_mean"] == pytest.approx(fsdp["val_margin_mean"], rel=1e-5)
