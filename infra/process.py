"""Starting, checking and stopping a local service process that rmflow owns.

Each service keeps `state.json` (pid, its start time, url) and a log under RMFLOW_HOME/<service>/.
A process is ours only if the recorded pid is alive with the recorded start time (a pid the
system reused for another program has another start time) and its command line still carries the
marker; `stop` signals that process's own group (it was started in a session of its own) and
nothing else, so rmflow never stops a server it did not start.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


class ServiceError(RuntimeError):
    pass


@dataclass
class ManagedService:
    name: str
    home: Path

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def log_file(self) -> Path:
        return self.home / f"{self.name}.log"

    def state(self) -> dict[str, Any] | None:
        if not self.state_file.is_file():
            return None
        state = json.loads(self.state_file.read_text())
        return state if self._ours(state) else None

    def _ours(self, state: dict[str, Any]) -> bool:
        try:
            proc = psutil.Process(state["pid"])
            return (proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
                    and abs(proc.create_time() - state["started"]) < 0.05
                    and state["marker"] in " ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
            return False

    def spawn(self, cmd: list[str], env: dict[str, str], marker: str) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        # a session of its own: the service outlives the command that started it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
        started = psutil.Process(proc.pid).create_time()
        self.state_file.write_text(json.dumps({"pid": proc.pid, "started": started, "marker": marker, "cmd": cmd[:2]}))
        return proc

    def record(self, **values: Any) -> None:
        state = json.loads(self.state_file.read_text())
        self.state_file.write_text(json.dumps({**state, **values}))

    def stop(self, timeout: float = 20) -> bool:
        state = self.state()
        if state is None:
            return False
        proc = psutil.Process(state["pid"])
        group = os.getpgid(proc.pid)
        if group != proc.pid:  # started by spawn() as a session leader; anything else is not ours to signal
            raise ServiceError(f"{self.name}: pid {proc.pid} does not lead its own process group; not stopping it")
        os.killpg(group, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True


def wait_healthy(url: str, deadline_s: float, alive=lambda: True, expect: bytes | None = None) -> None:
    """Polls `url` until it answers 200 (and contains `expect`), the process dies, or time runs out."""
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        if not alive():
            raise ServiceError(f"the process exited before {url} answered ({last})")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read()
                if resp.status == 200 and (expect is None or expect in body):
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(0.5)
    raise ServiceError(f"{url} did not become healthy within {deadline_s:.0f}s ({last})")


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else a free ephemeral port. Probed with SO_REUSEADDR,
    as servers bind: a port whose last connections linger in TIME_WAIT (a server just stopped) is
    free to listen on again."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise ServiceError("no free port")
