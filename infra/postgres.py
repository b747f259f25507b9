"""A local PostgreSQL server for `rmflow up --team` when RMFLOW_DATABASE_URL names none.

- The distribution's PostgreSQL (Debian: `apt-get install -y postgresql`; run.sh does it): its binaries
  are found with `pg_config --bindir`, else under /usr/lib/postgresql/<version>/bin, else on PATH.
- Data: RMFLOW_HOME/postgres/data (initdb, once); socket and log beside it; bound to 127.0.0.1.
- PostgreSQL refuses to run as root. Run as root, rmflow runs it as the system user `rmflow-pg`
  (created when missing), which owns the data directory. RMFLOW_HOME usually sits under a home
  directory that user cannot enter (/root is 0700), so the server keeps one capability,
  CAP_DAC_READ_SEARCH, to reach its data directory; rmflow changes no permission it did not create.
- Password authentication (scram-sha-256) for user `rmflow`, also on the socket. The password is
  generated once into RMFLOW_HOME/postgres/password (mode 600) and reaches initdb through a file
  (--pwfile), never a command line.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from rmcore.atomic import write_atomic
from rmcore.paths import rmflow_home
from rmflow.infra.process import ManagedService, ServiceError, exit_status, log_size, poll_until, sticky_ports
from rmflow.infra.team import Database

PORT = 5432
USER = "rmflow"  # the database superuser initdb creates
SYSTEM_USER = "rmflow-pg"  # the Unix user the server runs as when rmflow runs as root


def pg_home() -> Path:
    return rmflow_home() / "postgres"


def service() -> ManagedService:
    return ManagedService("postgres", pg_home())


def bindir() -> Path:
    """Where initdb and postgres are: pg_config's answer, else the newest /usr/lib/postgresql/*/bin."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise ServiceError("PostgreSQL is not installed (no initdb): `apt-get install -y postgresql` (run.sh does it), "
                       "or set RMFLOW_DATABASE_URL to an existing server")


def password() -> str:
    path = pg_home() / "password"
    pg_home().mkdir(parents=True, exist_ok=True)
    if not path.is_file() or not path.read_text().strip():
        write_atomic(path, secrets.token_urlsafe(24), mode=0o600)
    return path.read_text().strip()


def _run_as() -> list[str]:
    """The command prefix that drops root to SYSTEM_USER (empty when rmflow is not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", SYSTEM_USER], check=True, capture_output=True)
    return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def _own(path: Path) -> None:
    """Hands a directory rmflow created to the server's user, mode 0700 (PostgreSQL insists)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)


def _initdb(prefix: list[str]) -> None:
    data = pg_home() / "data"
    if (data / "PG_VERSION").exists():
        return
    _own(data)
    pwfile = pg_home() / "initdb.pw"  # readable by the server's user only, deleted after initdb
    write_atomic(pwfile, password(), mode=0o600)
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        proc = subprocess.run([*prefix, str(bindir() / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                               f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"], capture_output=True, text=True, timeout=120)
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise ServiceError(f"initdb failed for {data}: {proc.stderr.strip()[-800:]}")


def database() -> Database:
    state = service().state()
    if not state or not state.get("port"):
        raise ServiceError("rmflow's local PostgreSQL is not running; `rmflow up --team` starts it")
    return Database("127.0.0.1", state["port"], USER, password(), local=True)


def up(port: int = PORT, timeout_s: float = 60) -> tuple[Database, dict[str, Any]]:
    """Starts the local server (initdb on first use) unless rmflow already runs it; returns it and its status row."""
    svc = service()
    state = svc.state()
    if state and state.get("port"):
        db = Database("127.0.0.1", state["port"], USER, password(), local=True)
        return db, {"url": db.url, "pid": state["pid"], "started": False}
    if state:  # spawned by a start that never became ready
        svc.stop()
    prefix = _run_as()
    _initdb(prefix)
    sockets = pg_home() / "run"
    _own(sockets)
    # the port it had last time where free: the servers started against it reconnect after a restart
    port = sticky_ports(pg_home(), {"postgres": port})["postgres"]
    # settings on the command line hold no secret; `-c` keeps them out of the data directory's files
    cmd = [*prefix, str(bindir() / "postgres"), "-D", str(pg_home() / "data"), "-h", "127.0.0.1", "-p", str(port),
           "-k", str(sockets), "-c", "max_connections=200", "-c", "shared_buffers=64MB"]
    since = log_size(svc.log_file)
    proc = svc.spawn(cmd, {}, marker="postgres")
    db = Database("127.0.0.1", port, USER, password(), local=True)
    try:
        poll_until("PostgreSQL", lambda: _not_accepting(db), timeout_s, lambda: exit_status(proc) is None, svc.log_file, since,
                   interval_s=0.3)
    except BaseException:
        svc.discard(proc)
        raise
    svc.record(url=db.url, port=port)
    return db, {"url": db.url, "pid": proc.pid, "started": True}


def _not_accepting(db: Database) -> str | None:
    try:
        db.connect(timeout_s=2).close()
    except ServiceError as e:
        return str(e)
    return None


def down(timeout_s: float = 30) -> bool:
    """A fast shutdown (SIGINT to the postmaster: sessions are ended, a checkpoint written), then
    the service's usual stop for anything left. SIGTERM, which `ManagedService.stop` sends, is a
    smart shutdown that waits for every client (the servers' connection pools) to leave."""
    svc = service()
    state = svc.state()
    if state is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(state["pid"], signal.SIGINT)
    end = time.monotonic() + timeout_s
    while svc.state() is not None and time.monotonic() < end:
        time.sleep(0.2)
    svc.stop()  # no-op once the postmaster is gone; otherwise its group is ended
    svc.state_file.unlink(missing_ok=True)
    return True


def status() -> dict[str, Any]:
    state = service().state()
    reason = None
    if not state:
        reason = "not running"
    else:
        try:
            database().connect(timeout_s=3).close()
        except ServiceError as e:
            reason = str(e)
    return {"running": bool(state), "url": state.get("url") if state else None, "pid": state.get("pid") if state else None,
            "healthy": reason is None, "reason": reason}
