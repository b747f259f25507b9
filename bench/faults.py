"""Fault injection against a real Ray runtime, shared by the tests and `bench/gpu_check.sh`: wait
until Ray Train has registered a checkpoint of a run, then SIGKILL one of its workers. Only workers
of a Ray runtime this process started (its descendants, however deep) are candidates: other
people's Ray processes on the machine are never touched."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def ray_train_workers() -> list:
    """Ray Train worker processes (titled `ray::RayTrainWorker...`) among this process's descendants."""
    import psutil

    ours = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                ours.append(proc)
        except psutil.NoSuchProcess:
            continue
    return ours


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints the run's controller has registered (its checkpoint-manager snapshot lists
    them; a folder on disk alone may not be registered yet on a busy machine). `run_dir` may also
    be the storage path holding one run."""
    for snapshot in (Path(run_dir) / "checkpoint_manager_snapshot.json", *Path(run_dir).glob("*/checkpoint_manager_snapshot.json")):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            continue
    return 0


def wait_for_a_checkpoint(run_dir: Path, deadline_s: float) -> bool:
    end = time.time() + deadline_s
    while time.time() < end:
        if registered_checkpoints(run_dir):
            return True
        time.sleep(0.1)
    return False


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int], deadline_s: float = 400) -> None:
    """SIGKILLs one of this process's Ray Train workers once `run_dir` has a registered checkpoint;
    the pid goes into `killed` (empty if the run ended first)."""
    if not wait_for_a_checkpoint(run_dir, deadline_s):
        return
    for proc in ray_train_workers():
        os.kill(proc.pid, signal.SIGKILL)
        killed.append(proc.pid)
        return
