"""rmflow on an existing multi-node Ray cluster, set up as a team runs one: `ray start --head` plus a
second `ray start --address` node, token authentication on every node (RAY_AUTH_MODE=token, the
token in ~/.ray/auth_token), a job submitted through the Ray Jobs API. Everything on this machine
(`--node-ip-address 127.0.0.1`; Ray itself swaps a loopback address for the host's own, which the
kernel routes locally). Each node is a `ray start --block` process group of its own, stopped by
signal: other Ray runtimes on the machine are never touched."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rmflow.infra.process import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
RAY_ENV_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
    return env | {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"} | extra


class Cluster:
    """Each node has a folder of its own (`nodes_dir[name]`): its working directory (`work`), its
    TMPDIR (`tmp`) and Ray's temp dir (`t`), as on machines that share no disk. `env` is added to
    every node's environment (e.g. the bucket's credentials: never on a command line)."""

    def __init__(self, env: dict[str, str] | None = None, num_cpus: int = 1) -> None:
        # short: Ray's unix socket paths must fit in ~100 characters
        self.base = Path(tempfile.mkdtemp(prefix="rmray", dir="/tmp"))
        self.home = self.base / "home"
        (self.home / ".ray").mkdir(parents=True)
        self.token = secrets.token_hex(16)
        token_file = self.home / ".ray" / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.port, self.dashboard = free_port(6479), free_port(8365)
        self.address = f"127.0.0.1:{self.port}"
        self.env = _clean_env(self.home, RAY_AUTH_MODE="token", **(env or {}))  # what every node of the team's cluster has
        self.num_cpus = num_cpus
        self.nodes: list[subprocess.Popen] = []
        self.nodes_dir: dict[str, Path] = {}

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.base / f"{name}.log", "wb")
        own = self.nodes_dir[name] = self.base / name
        for sub in ("work", "tmp"):
            (own / sub).mkdir(parents=True)
        self.nodes.append(subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus",
                                            str(self.num_cpus), "--object-store-memory", "150000000", "--disable-usage-stats",
                                            "--temp-dir", str(own / "t"), *args],
                                           env=self.env | {"TMPDIR": str(own / "tmp"), "RMFLOW_HOME": str(own / "rmflow")},
                                           cwd=own / "work", stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        self._start(["--head", "--port", str(self.port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard)], "head")
        self._wait_nodes(1)
        self._start(["--address", self.address], "worker")
        self._wait_nodes(2)

    def _wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a ray node exited: {self.logs()}")
            out = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True, text=True)
            active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if out.returncode == 0 and active.count("node_") >= n:
                return
            time.sleep(2)
        raise TimeoutError(f"Ray cluster did not reach {n} nodes: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.base.glob("*.log"))

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _join(cluster: Cluster, home: Path, **env: str) -> subprocess.CompletedProcess:
    """`init_ray` in a fresh driver process (RAY_ADDRESS set, RAY_AUTH_MODE unset, as a user's shell)."""
    code = ("import json, ray; from rmflow.infra.ray_train import init_ray; r = init_ray(None); "
            "print(json.dumps(r | {'alive': sum(n['Alive'] for n in ray.nodes())}))")
    return subprocess.run([sys.executable, "-c", code], env=_clean_env(home, RAY_ADDRESS=cluster.address, **env),
                          capture_output=True, text=True, timeout=180)


def test_a_driver_joins_a_token_cluster_with_the_token_file_or_the_environment(cluster, tmp_path):
    by_file = _join(cluster, cluster.home)  # the token in ~/.ray/auth_token
    assert by_file.returncode == 0, by_file.stderr[-2000:]
    assert json.loads(by_file.stdout.strip().splitlines()[-1]) == {"ray": "cluster", "ray_address": cluster.address, "alive": 2}
    by_env = _join(cluster, tmp_path, RAY_AUTH_TOKEN=cluster.token)  # no token file at all
    assert by_env.returncode == 0, by_env.stderr[-2000:]
    assert json.loads(by_env.stdout.strip().splitlines()[-1])["alive"] == 2
    wrong = _join(cluster, tmp_path, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode != 0
    assert f"cannot join the Ray cluster at {cluster.address}" in wrong.stderr and "RAY_AUTH_TOKEN" in wrong.stderr
    assert cluster.token not in wrong.stderr + wrong.stdout


def test_rmflow_train_submitted_through_ray_jobs_runs_on_both_nodes(cluster, tiny_bert, synthetic_dataset, tmp_path):
    storage, out = tmp_path / "ray_storage", tmp_path / "model"
    entrypoint = [sys.executable, "-m", "rmflow.cli", "train", "--data", str(synthetic_dataset), "--backbone", str(tiny_bert),
                  "--out", str(out), "--workers", "2", "--cpus-per-worker", "1", "--storage-path", str(storage),
                  "--checkpoint-every", "5", "--pairs-per-step", "64", "--max-length", "64"]
    job = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}", "--", *entrypoint],
                         env=cluster.env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:] + cluster.logs()
    assert cluster.token not in job.stdout + job.stderr
    summary = next(json.loads(line) for line in reversed(job.stdout.splitlines()) if line.startswith("{") and '"model_dir"' in line)
    assert summary["ray"] == "cluster" and summary["ray_address"].endswith(f":{cluster.port}")  # joined, started nothing
    assert summary["workers"] == 2 and len(set(summary["worker_nodes"])) == 2  # one rank on each node
    assert summary["pairs_trained"] > 0 and summary["restarts"] == 0
    run_dir = Path(summary["ray_run"])
    assert run_dir.parent == storage.resolve()
    assert any(p.name.startswith("checkpoint") for p in run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())
    assert (out / "rmflow_model.json").is_file() and (out / "backbone").is_dir()
