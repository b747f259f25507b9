"""Starting, checking and stopping a local service process that rmflow owns.

Each service keeps `state.json` (pid, its start, url, what it was started with) and a log under
RMFLOW_HOME/<service>/. A process is ours only if the recorded pid is alive with the recorded start
(a pid the system reused for another program started at another moment) and its command line still
carries the marker; `stop` signals that process's own group (it was started in a session of its own)
and nothing else, so rmflow never stops a server it did not start.

The start is read as clock ticks since boot (/proc/<pid>/stat), not as a wall-clock time: an NTP
step or a VM resume moves the wall clock, and with it psutil's create_time, but never a process's
start tick. State files are replaced atomically, and one that cannot be read counts as absent.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from rmcore.atomic import write_atomic

log = logging.getLogger("rmflow.infra")


class ServiceError(RuntimeError):
    pass


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None without /proc
    or once the process is gone. Fixed for the life of a process whatever the wall clock does."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2 (the command name) is in parentheses and may itself hold spaces or ")"
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_id() -> str | None:
    """This boot's id: start ticks count from boot, so they only compare within one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Secret:
    """A setting a service is started with that is recorded only as a salted, slow hash: enough to
    tell that it changed, never enough to read it back from a state file."""

    value: str

    def fingerprint(self, salt: str | None = None) -> str:
        salt = salt or secrets.token_hex(8)
        return f"{salt}${hashlib.pbkdf2_hmac('sha256', self.value.encode(), salt.encode(), 100_000).hex()}"

    def matches(self, recorded: Any) -> bool:
        return isinstance(recorded, str) and "$" in recorded and secrets.compare_digest(self.fingerprint(recorded.split("$")[0]), recorded)


def recordable(started_with: dict[str, Any]) -> dict[str, Any]:
    """`started_with` as it goes into a state file: secrets as fingerprints."""
    return {k: v.fingerprint() if isinstance(v, Secret) else v for k, v in started_with.items()}


def drift(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> str | None:
    """Why a service started with `recorded` no longer matches `wanted`, or None if it does."""
    if recorded is None:
        return "its start settings were not recorded (started by an older rmflow)"
    for key, value in wanted.items():
        if isinstance(value, Secret):
            if not value.matches(recorded.get(key)):
                return f"{key} changed"
        elif recorded.get(key) != value:
            return f"{key} changed" if key.endswith("_digest") else f"{key} changed ({recorded.get(key)} → {value})"
    return None


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
        state = self._read()
        return state if state is not None and self._ours(state) else None

    def _read(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: truncated JSON, bytes that are not UTF-8
            log.warning("%s: cannot read %s (%s); treating the service as not running", self.name, self.state_file, e)
            return None
        if not isinstance(state, dict):
            log.warning("%s: %s holds no state object; treating the service as not running", self.name, self.state_file)
            return None
        return state

    def _write(self, state: dict[str, Any]) -> None:
        """Replaces the state file in one step: a reader (or a crash) sees the old state or the new one,
        never half of one."""
        write_atomic(self.state_file, json.dumps(state))

    def _ours(self, state: dict[str, Any]) -> bool:
        try:
            proc = psutil.Process(state["pid"])
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return False
            ticks = start_ticks(proc.pid)
            if ticks is not None and state.get("ticks") is not None:
                same_start = ticks == state["ticks"] and state.get("boot") == boot_id()
            else:  # no /proc, or a state file written before ticks were recorded: wall-clock seconds
                same_start = abs(proc.create_time() - state["started"]) < 0.05
            return same_start and state["marker"] in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
            return False

    def spawn(self, cmd: list[str], env: dict[str, str], marker: str) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_file, "ab")
        # a session of its own: the service outlives the command that started it. close_fds (the
        # default) keeps the caller's up.lock from leaking into the service.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
        log_file.close()
        started = psutil.Process(proc.pid).create_time()
        self._write({"pid": proc.pid, "started": started, "ticks": start_ticks(proc.pid), "boot": boot_id(),
                     "marker": marker, "cmd": cmd[:2]})
        return proc

    def record(self, **values: Any) -> None:
        self._write({**(self._read() or {}), **values})

    def stop(self, timeout: float = 20) -> bool:
        state = self.state()
        if state is None:
            return False
        proc = psutil.Process(state["pid"])
        group = os.getpgid(proc.pid)
        if group != proc.pid:  # started by spawn() as a session leader; anything else is not ours to signal
            raise ServiceError(f"{self.name}: pid {proc.pid} does not lead its own process group; not stopping it")
        os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(psutil.TimeoutExpired):
            proc.wait(timeout)
        # whatever of the group outlived its leader (a flow run's subprocess, Ray workers) goes too:
        # `down` must leave nothing running that rmflow no longer knows about
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True

    def discard(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        """Stops a process spawn() started whose start failed (or was interrupted), with everything in
        its group, and forgets it. `proc` is not reaped before this (see exit_status), so its pid, and
        with it the group id, cannot have been given to another process."""
        if proc.returncode is not None:  # already reaped elsewhere: its group id is no longer ours to signal
            self.state_file.unlink(missing_ok=True)
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            end = time.monotonic() + timeout
            while exit_status(proc) is None and time.monotonic() < end:
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)  # the leader's children too, if they outlived it
        except ProcessLookupError:
            pass
        proc.wait()
        self.state_file.unlink(missing_ok=True)


def exit_status(proc: subprocess.Popen) -> int | None:
    """The exit status of a process spawn() started, None while it runs. Unlike Popen.poll it does not
    reap the process, so its pid (and its group id) stay reserved until discard() has signalled it."""
    if proc.returncode is not None:
        return proc.returncode
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return None if info is None else info.si_status


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `path` for the block, waiting while another process holds it. An
    flock: the kernel releases it when its holder exits, however it exits, so no stale lock survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another rmflow command that holds %s", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def poll_until(what: str, probe: Callable[[], str | None], deadline_s: float, alive: Callable[[], bool] = lambda: True,
               log_file: Path | None = None, since: int = 0, interval_s: float = 0.5) -> None:
    """Calls `probe` (None: ready; otherwise what it still lacks) until it says ready. A ServiceError
    naming `what` when the process exits first (with the end of what it logged since byte `since`),
    or when `deadline_s` runs out (with the probe's last answer)."""
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        if not alive():
            where = f"; {log_file}: {log_excerpt(log_file, since)}" if log_file else ""
            raise ServiceError(f"{what} exited before it was ready ({last}){where}")
        answer = probe()
        if answer is None:
            return
        last = answer
        time.sleep(interval_s)
    where = f"; see {log_file}" if log_file else ""
    raise ServiceError(f"{what} was not ready within {deadline_s:.0f}s ({last}){where}")


def log_excerpt(log_file: Path, since: int = 0, lines: int = 6) -> str:
    """The last `lines` non-empty lines a service logged after byte `since`: why it exited."""
    try:
        with open(log_file, "rb") as f:
            f.seek(since)
            text = f.read()[-20000:].decode(errors="replace")
    except OSError:
        return "(no log)"
    tail = [_PASSWORD_IN_URL.sub(r"\1***@", line)[:300] for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(nothing logged)"


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")  # a server may log the database URL it was given


def log_size(log_file: Path) -> int:
    """Where a service's next start begins logging (its log is appended to)."""
    try:
        return log_file.stat().st_size
    except OSError:
        return 0


def wait_healthy(url: str, deadline_s: float, alive: Callable[[], bool] = lambda: True, expect: bytes | None = None,
                 log_file: Path | None = None, since: int = 0) -> None:
    """Polls `url` until it answers 200 (and contains `expect`), the process dies, or time runs out."""

    def probe() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read()
                if resp.status == 200 and (expect is None or expect in body):
                    return None
                return f"HTTP {resp.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return str(e) or type(e).__name__

    poll_until(url, probe, deadline_s, alive, log_file, since)


def sticky_ports(home: Path, wanted: dict[str, int]) -> dict[str, int]:
    """Ports for a service's next start: each the one it had last time (kept in home/ports.json; it
    wins over `wanted`), else `wanted`'s (0: any), else a free one. A server whose state names its
    own address (SeaweedFS's master keeps its raft peers by address) comes back where it was."""
    path = home / "ports.json"
    try:
        saved = json.loads(path.read_text())
        saved = saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    chosen: dict[str, int] = {}
    for name, default in wanted.items():
        last = saved.get(name)
        port = free_port(last if isinstance(last, int) and 0 < last < 65536 else default)
        while port in chosen.values():  # two probes of port 0 may be given the same port
            port = free_port(0)
        chosen[name] = port
    home.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(chosen))
    return chosen


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
