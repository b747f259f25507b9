"""Fault injection against a real Ray runtime or torchrun, shared by the tests and
`bench/gpu_check.sh`: wait until a run has a checkpoint, then SIGKILL one of its workers. Only
workers this process started (its descendants, however deep) are candidates: other people's
processes on the machine are never touched. Needs psutil (the GPU machine has it)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def ray_train_workers(root_pid: int | None = None) -> list:
    """Ray Train worker processes (titled `ray::RayTrainWorker...`) among the descendants of
    `root_pid` (default: this process; a `ray start` node's pid gives that node's workers)."""
    import psutil

    ours = []
    for proc in psutil.Process(root_pid or os.getpid()).children(recursive=True):
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


def torchrun_workers() -> list:
    """Workers of `torchrun … -m rmflow.infra.torchrun` among this process's descendants (not the
    torchrun agent, whose command line names the module too)."""
    import psutil

    ours = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = proc.cmdline()
            if "rmflow.infra.torchrun" in cmd and not any("torch.distributed.run" in c or Path(c).name == "torchrun" for c in cmd):
                ours.append(proc)
        except psutil.NoSuchProcess:
            continue
    return ours


def complete_torchrun_checkpoints(checkpoints: Path) -> int:
    """Checkpoints `rmflow.infra.torchrun` finished writing (a `complete` marker, written last)."""
    return len(list(Path(checkpoints).glob("step-*/complete")))


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int], deadline_s: float = 400, launcher: str = "ray") -> None:
    """SIGKILLs one of this process's training workers (Ray Train's, or torchrun's with `launcher`
    torchrun, `run_dir` then being its checkpoint folder) once `run_dir` has a checkpoint; the pid
    goes into `killed` (empty if the run ended first)."""
    if launcher == "torchrun":
        end = time.time() + deadline_s
        while time.time() < end and not complete_torchrun_checkpoints(run_dir):
            time.sleep(0.1)
        if not complete_torchrun_checkpoints(run_dir):
            return
    elif not wait_for_a_checkpoint(run_dir, deadline_s):
        return
    for proc in (torchrun_workers() if launcher == "torchrun" else ray_train_workers()):
        os.kill(proc.pid, signal.SIGKILL)
        killed.append(proc.pid)
        return
