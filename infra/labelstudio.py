"""The real Label Studio server, local: its own virtualenv (its pins clash with rmflow's), SQLite,
bound to 127.0.0.1, an admin user and a legacy API token created headlessly.

- venv: RMFLOW_LABEL_STUDIO_VENV or RMFLOW_HOME/labelstudio/venv (label-studio==1.23.2, ~1 GB)
- data: RMFLOW_HOME/labelstudio/data; token: RMFLOW_HOME/labelstudio/token (mode 600)
- Label Studio moves to the next port silently when one is busy, so the real port is read from
  its "Starting development server at …" log line.
- Legacy tokens are off by default in 1.2x and the setting only applies when the organization is
  first created, hence LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN on every start.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rmcore.atomic import write_atomic
from rmcore.paths import rmflow_home
from rmflow.infra.process import ManagedService, Secret, ServiceError, exit_status, free_port, log_size, wait_healthy

VERSION = "1.23.2"
ADMIN = "admin@rmflow.local"
# Label Studio 1.23's default banned subnets (core/utils/io.py validate_ip) without 127.0.0.0/8
BANNED_EXCEPT_LOOPBACK = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
    "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4",
    "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96", "::ffff:0:0:0/96",
    "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28", "2001:db8::/32", "2002::/16",
    "fc00::/7", "fe80::/10", "ff00::/8"]
STARTED = re.compile(rb"Starting development server at (http://[\d.]+:(\d+))/?")


def ls_home() -> Path:
    return rmflow_home() / "labelstudio"


def venv_dir() -> Path:
    return Path(os.environ.get("RMFLOW_LABEL_STUDIO_VENV") or ls_home() / "venv")


def service() -> ManagedService:
    return ManagedService("labelstudio", ls_home())


def ensure_installed(log=print) -> Path:
    """Creates the virtualenv and installs Label Studio once; returns its `label-studio` script."""
    exe = venv_dir() / "bin" / "label-studio"
    if exe.exists():
        return exe
    log(f"installing label-studio=={VERSION} into {venv_dir()} (once; about a minute)")
    python = "python3.11" if subprocess.run(["which", "python3.11"], capture_output=True).returncode == 0 else sys.executable
    subprocess.run([python, "-m", "venv", str(venv_dir())], check=True)
    pip = [str(venv_dir() / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"label-studio=={VERSION}"], check=True)
    return exe


def credentials() -> dict[str, str]:
    """The admin's password and API token: from the environment, else generated once and kept in
    files readable by the owner only."""
    home = ls_home()
    home.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, env, make in (("token", "LABEL_STUDIO_API_KEY", lambda: secrets.token_hex(20)),
                           ("password", "LABEL_STUDIO_PASSWORD", lambda: secrets.token_urlsafe(16))):
        path = home / key
        if os.environ.get(env):
            out[key] = os.environ[env]
            continue
        if not path.is_file():  # written whole, the first writer winning
            write_atomic(path, make(), mode=0o600, replace=False)
        elif not path.read_text().strip():  # left empty by an older rmflow that crashed mid-write
            write_atomic(path, make(), mode=0o600)
        out[key] = path.read_text().strip()
    return out


def _env(creds: dict[str, str]) -> dict[str, str]:
    return {
        "LABEL_STUDIO_USERNAME": ADMIN,
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_USER_TOKEN": creds["token"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # no error reports to Sentry (its default DSN is on): nothing leaves this machine
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_BASE_DATA_DIR": str(ls_home() / "data"),
        "DJANGO_DB": "sqlite",
        # webhooks to rmflow's receiver on 127.0.0.1: Label Studio's SSRF guard bans loopback along
        # with every private range. Keep the guard and its list, minus loopback only.
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(BANNED_EXCEPT_LOOPBACK),
        # webhooks are sent synchronously with a 1 s timeout by default: on a busy 2-core machine the
        # receiver can miss that and the annotation event is lost (the sensor would catch it later)
        "WEBHOOK_TIMEOUT": "10",
    }


def up(port: int = 8080, timeout_s: float = 240, log=print, db: dict[str, str] | None = None) -> dict[str, Any]:
    """Starts Label Studio (or finds the one rmflow already runs) and waits for /health. With `db`
    (its DJANGO_DB and POSTGRE_* variables: infra/stack.labelstudio_db_env) it keeps its data in
    that PostgreSQL database instead of SQLite; a server running on the other store is restarted."""
    svc = service()
    state = svc.state()
    database = Secret(json.dumps(db or {}, sort_keys=True))
    if state and state.get("url") and (db is None and "database" not in state or database.matches(state.get("database"))):
        wait_healthy(f"{state['url']}/health", 30)
        return {"url": state["url"], "pid": state["pid"], "started": False}
    if state:  # spawned by a start that died before Label Studio answered, or on another database: stop it
        svc.stop()
    exe = ensure_installed(log)
    creds = credentials()
    port = free_port(port)
    offset = log_size(svc.log_file)
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(ls_home() / "data"), "--username", ADMIN, "--enable-legacy-api-token"]
    proc = svc.spawn(cmd, {**_env(creds), **(db or {})}, marker="label-studio")
    try:
        url = _read_url(svc.log_file, offset, proc, timeout_s)
        wait_healthy(f"{url}/health", timeout_s, alive=lambda: exit_status(proc) is None, log_file=svc.log_file, since=offset)
    except BaseException:  # a failed or interrupted start leaves no server that `down` does not know about
        svc.discard(proc)
        raise
    svc.record(url=url, **({"database": database.fingerprint()} if db else {}))
    return {"url": url, "pid": proc.pid, "started": True}


def _read_url(log_file: Path, offset: int, proc, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        code = exit_status(proc)
        if code is not None:
            raise ServiceError(f"label-studio exited with code {code}; see {log_file}")
        with open(log_file, "rb") as f:
            f.seek(offset)
            m = STARTED.search(f.read())
        if m:
            return m.group(1).decode()
        time.sleep(0.5)
    raise ServiceError(f"label-studio did not report its address within {timeout_s:.0f}s; see {log_file}")


def down() -> bool:
    return service().stop()


def status() -> dict[str, Any]:
    state = service().state()
    return {"running": bool(state), "url": state.get("url") if state else None, "pid": state.get("pid") if state else None}


def create_user(email: str) -> str:
    """A real Label Studio user (a simulated annotator) with its own API token; returns the token.
    Idempotent: the token is kept beside the admin's, mode 600."""
    path = ls_home() / "annotators" / f"{email}.token"
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_hex(20)
    # user, password and token through the environment, never the command line (visible in `ps`)
    env = {**os.environ, **_env(credentials()), "LABEL_STUDIO_USERNAME": email,
           "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(16), "LABEL_STUDIO_USER_TOKEN": token}
    cmd = [str(ensure_installed()), "init", "--data-dir", str(ls_home() / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise ServiceError(f"could not create Label Studio user {email}: {proc.stderr[-500:].replace(token, '***')}")
    write_atomic(path, token, mode=0o600)
    return token
