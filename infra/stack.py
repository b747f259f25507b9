"""The local stack: Prefect server (SQLite), MLflow server (the same SQLite store rmflow writes, plus
local artifacts), Label Studio, the webhook receiver and the served deployments, all bound to
127.0.0.1, state and logs under RMFLOW_HOME/<service>/.

To use existing services instead, set PREFECT_API_URL, MLFLOW_TRACKING_URI, LABEL_STUDIO_URL +
LABEL_STUDIO_API_KEY and RAY_ADDRESS: flows and CLI commands then talk to those. `up` still starts
the local Prefect server and Label Studio; the MLflow server is skipped when MLFLOW_TRACKING_URI
names a server.

`up --team` puts Prefect, MLflow and Label Studio on the team's PostgreSQL and MLflow's artifacts in
its bucket (infra/team.py: the settings; infra/postgres.py, infra/objectstore.py: the local servers
started when none is configured).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rmcore.atomic import write_atomic
from rmcore.names import HEARTBEAT_S, SENSOR_INTERVAL_S
from rmcore.paths import TEAM_FILE, dataset_root, embedded_mlflow_store, mlflow_artifact_root, rmflow_home
from rmcore.retrain import RetrainPolicy
from rmflow.infra import labelstudio, objectstore, postgres, team
from rmflow.infra.process import (
    ManagedService,
    Secret,
    ServiceError,
    drift,
    exclusive,
    exit_status,
    free_port,
    log_size,
    recordable,
    wait_healthy,
)

PREFECT_PORT, MLFLOW_PORT, RECEIVER_PORT, RUNNER_PORT = 4200, 5000, 8765, 8766
log = logging.getLogger("rmflow.infra")


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the rmflow venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def prefect_service() -> ManagedService:
    return ManagedService("prefect", rmflow_home() / "prefect")


def mlflow_service() -> ManagedService:
    return ManagedService("mlflow", rmflow_home() / "mlflow")


def receiver_service() -> ManagedService:
    return ManagedService("receiver", rmflow_home() / "receiver")


def deployments_service() -> ManagedService:
    return ManagedService("deployments", rmflow_home() / "deployments")


def prefect_env() -> dict[str, str]:
    """The Prefect server's environment; `{port}` is the port it really gets. The UI calls the API
    at PREFECT_UI_API_URL, which must follow the server when 4200 is taken."""
    return {"PREFECT_HOME": str(rmflow_home() / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": "http://127.0.0.1:{port}/api",
            # concurrency-slot leases on disk, not in memory: after a server restart a dead run's slot
            # still expires instead of staying taken for good (the pipeline takes one per model)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            # a (re)registered label-sensor schedule gets its runs within 15 s, not the default 60
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "15"}


def _start_http(svc: ManagedService, port: int, cmd: list[str], env: dict[str, str], health: str, timeout_s: float,
                started_with: dict[str, Any] | None = None, before_restart: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Starts `cmd` (with {port} filled in) unless rmflow already runs it, then waits for `health`.

    `started_with` is what the service reads once, at start (the Prefect API it talks to, a secret,
    its settings); it is recorded in its state, and a service running with something else is
    restarted, after `before_restart(reason)`, which may refuse by raising. A start that fails or is
    interrupted stops what it spawned: no process is left that `down` does not know about."""
    state = svc.state()
    if state:
        reason = _restart_reason(state, started_with)
        if reason is None:
            return {"url": state["url"], "started": False}
        if before_restart is not None:
            before_restart(reason)
        log.warning("%s: restarting: %s", svc.name, reason)
        svc.stop()
    port = free_port(port)
    url = f"http://127.0.0.1:{port}"
    env = {**{k: v.format(port=port) for k, v in env.items()}, "RMFLOW_HOME": str(rmflow_home())}
    since = log_size(svc.log_file)
    proc = svc.spawn([part.format(port=port) for part in cmd], env, marker=svc.name)
    try:
        wait_healthy(url + health, timeout_s, alive=lambda: exit_status(proc) is None, log_file=svc.log_file, since=since)
    except BaseException:
        svc.discard(proc)
        raise
    svc.record(url=url, **({"started_with": recordable(started_with)} if started_with is not None else {}))
    return {"url": url, "started": True}


def _restart_reason(state: dict[str, Any], started_with: dict[str, Any] | None) -> str | None:
    if not state.get("url"):  # spawned by an `up` that died before the health check passed (up.lock rules out one still starting)
        return "its last start never passed the health check"
    return drift(state.get("started_with"), started_with) if started_with is not None else None


def _literal(env: dict[str, str]) -> dict[str, str]:
    """Values `_start_http` must not read as templates (a secret may hold braces)."""
    return {k: v.replace("{", "{{").replace("}", "}}") for k, v in env.items()}


def _on_database(svc: ManagedService, url: str | None) -> dict[str, Any] | None:
    """What a server keeping its data in a database is started with: the team database's URL (a
    Secret: it holds the password), so that moving to or from the team backends restarts it. None
    (nothing compared) for the embedded store of a server that never ran on the team's."""
    if url is not None:
        return {"database": Secret(url)}
    recorded = (svc.state() or {}).get("started_with") or {}
    return {"database": Secret("embedded")} if "database" in recorded else None


def prefect_up(port: int = PREFECT_PORT, timeout_s: float = 120, db: team.Database | None = None) -> dict[str, Any]:
    """The Prefect server, on SQLite under RMFLOW_HOME, or with `db` on its `prefect` database there
    (the URL, password included, through the environment)."""
    cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", "{port}"]
    url = db.service_url("prefect", "postgresql+asyncpg") if db else None
    env = {**prefect_env(), **_literal({"PREFECT_API_DATABASE_CONNECTION_URL": url} if url else {})}
    result = _start_http(prefect_service(), port, cmd, env, "/api/health", timeout_s, _on_database(prefect_service(), url))
    return {**result, "api_url": f"{result['url']}/api"}


def mlflow_up(port: int = MLFLOW_PORT, timeout_s: float = 120, db: team.Database | None = None,
              store: team.Storage | None = None) -> dict[str, Any]:
    """The MLflow server: on the embedded SQLite store with local artifacts, or with `db` and `store`
    on the team's `mlflow` database with artifacts in the bucket, served through the server (clients
    need no bucket credentials). Store URLs and credentials reach it through the environment
    (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, AWS_*), never its command line."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    ours = (mlflow_service().state() or {}).get("url")
    if tracking and tracking != ours and not tracking.startswith("sqlite"):
        return {"url": tracking, "started": False, "note": "MLFLOW_TRACKING_URI points at an existing server"}
    cmd = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]
    if db is not None and store is not None:
        backend = db.service_url("mlflow", "postgresql+psycopg2")
        env = _literal({"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_ARTIFACTS_DESTINATION": store.uri("mlflow-artifacts"), **store.env()})
        cmd.append("--serve-artifacts")
        started_with = {**_on_database(mlflow_service(), backend), "artifacts": store.uri("mlflow-artifacts")}
    else:
        backend = tracking or embedded_mlflow_store()
        env = _literal({"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_DEFAULT_ARTIFACT_ROOT": Path(mlflow_artifact_root()).as_uri()})
        started_with = _on_database(mlflow_service(), None)
    return _start_http(mlflow_service(), port, cmd, env, "/health", timeout_s, started_with)


def receiver_up(prefect_api: str, port: int = RECEIVER_PORT, timeout_s: float = 60) -> dict[str, Any]:
    """The webhook receiver (`rmflow receiver`), emitting to `prefect_api`; the shared secret
    reaches it through its own file or the environment, never its command line. It reads them and
    the projects it watches once, at start: restarted when Prefect moved, the secret changed (its
    state keeps a salted hash) or `rmflow up` set another project or retrain rule."""
    from rmflow.infra.receiver import read_watches, webhook_secret

    cmd = [_bin("rmflow"), "receiver", "--host", "127.0.0.1", "--port", "{port}"]
    started_with = {"prefect_api": prefect_api, "webhook_secret": Secret(webhook_secret()),
                    "watches": {name: w.model_dump(mode="json") for name, w in read_watches().items()}}
    return _start_http(receiver_service(), port, cmd, {"PREFECT_API_URL": prefect_api}, "/health", timeout_s, started_with)


def deployments_up(prefect_api: str, params_file: Path, policy: RetrainPolicy, interval_s: int,
                   port: int = RUNNER_PORT, timeout_s: float = 120, wait: bool = False,
                   store: team.Storage | None = None) -> dict[str, Any]:
    """`rmflow serve` in the background: registers the deployments (and the labels-ready trigger)
    and runs their flow runs. Healthy once the runner's own webserver answers /health, which it does
    only after the deployments are registered and while it keeps polling for runs. Its flow runs
    send heartbeats every HEARTBEAT_S, which the zombie automation watches.

    With the team's bucket (`store`), its runs keep dataset versions and Ray Train's checkpoints
    there: the runner gets RMFLOW_STORAGE_URL and the bucket's variables in its environment.

    Restarted when what it serves changed (its command line, environment or parameters file) or
    Prefect moved, but never under a flow run: see `runner_idle`."""
    cmd = [_bin("rmflow"), "serve", "--params", str(params_file), "--interval", str(interval_s),
           *[arg for name, value in policy.model_dump().items() for arg in (f"--{name.replace('_', '-')}", str(value))]]
    env = {"PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_SERVER_ENABLE": "true", "PREFECT_RUNNER_SERVER_HOST": "127.0.0.1",
           "PREFECT_RUNNER_SERVER_PORT": "{port}", "PREFECT_RUNNER_POLL_FREQUENCY": "5",
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
           # the cluster its runs train on: a new one restarts the runner (its runs join RAY_ADDRESS)
           **({"RAY_ADDRESS": os.environ["RAY_ADDRESS"]} if os.environ.get("RAY_ADDRESS") else {})}
    digest = hashlib.sha256(json.dumps([cmd, env, params_file.read_text()], sort_keys=True).encode()).hexdigest()
    bucket = {"RMFLOW_STORAGE_URL": store.url, **store.env()} if store is not None else {}
    # the bucket's keys are recorded as a salted fingerprint only, never inside a plain digest
    started_with = {"prefect_api": prefect_api, "settings_digest": digest, "bucket": Secret(json.dumps(bucket, sort_keys=True))}
    return _start_http(deployments_service(), port, cmd, {**env, **_literal(bucket)}, "/health", timeout_s, started_with,
                       lambda reason: runner_idle(prefect_api, reason, wait))


# Flow runs a restart of the runner would kill (it runs each as a subprocess in its own process
# group): the pipeline and re-annotation, not label-sensor's short polls, which rerun on schedule.
# CANCELLING counts: the runner marks a cancelled run CANCELLED only after it has killed it.
RUNNER_FLOWS = ("reward-pipeline", "request-reannotation")
BUSY_STATES = ("PENDING", "RUNNING", "CANCELLING")
IDLE_POLL_S = 5.0


def runner_runs(prefect_api: str) -> list[str]:
    """"name (id)" of each pending, running or cancelling run of the deployments in RUNNER_FLOWS."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    busy = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in BUSY_STATES])))
    with using_prefect(prefect_api), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(RUNNER_FLOWS))),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(RUNNER_FLOWS))),
                                     flow_run_filter=busy)
    return [f"{r.name} ({r.id})" for r in runs]


def runner_idle(prefect_api: str, reason: str, wait: bool = False) -> None:
    """Called before the deployments restart (because `reason`). Stopping the runner stops its
    process group, and with it every flow run in progress: raises a ServiceError naming those runs,
    or with `wait` waits until none is left."""
    runs = runner_runs(prefect_api)
    if runs and wait:
        log.warning("the deployments must restart (%s); waiting for %s to finish", reason, ", ".join(runs))
    while runs and wait:
        time.sleep(IDLE_POLL_S)
        runs = runner_runs(prefect_api)
    if runs:
        raise ServiceError(f"the deployments must restart ({reason}), which would kill the flow run(s) in progress: "
                           f"{', '.join(runs)}. Wait for them to finish or cancel them (Prefect UI, or `prefect flow-run "
                           "cancel <id>`) and run `rmflow up` again, or run `rmflow up --wait`.")


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One `up` or `down` at a time (an exclusive flock on RMFLOW_HOME/up.lock, waited for): two at
    once would each see a service not running yet and start it twice."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with exclusive(rmflow_home() / "up.lock"):
            return fn(*args, **kwargs)
    return run


def resolve_team_backends(start_local: bool = False) -> tuple[team.Database, team.Storage, dict[str, Any]]:
    """The team's database server and bucket: the configured ones, else (with `start_local`) a local
    PostgreSQL and SeaweedFS that rmflow starts, else a ServiceError saying what to set. Also returns
    the status rows (`postgres`, `objectstore`) of what was started or pointed at."""
    s = team.settings()
    rows: dict[str, Any] = {}
    if s.database_url:
        db = team.Database.from_url(s.database_url.get_secret_value())
        rows["postgres"] = {"url": db.url, "started": False, "note": "RMFLOW_DATABASE_URL"}
    elif start_local:
        db, rows["postgres"] = postgres.up()
    else:
        raise ServiceError("the team backends need RMFLOW_DATABASE_URL (or `rmflow up --team` to start a local PostgreSQL)")
    if s.storage_url:
        store = team.team_storage()
        rows["objectstore"] = {"url": store.endpoint_url or "https://s3.amazonaws.com", "bucket": store.bucket,
                               "prefix": store.prefix, "started": False, "note": "RMFLOW_STORAGE_URL"}
    elif start_local:
        store, rows["objectstore"] = objectstore.up()
    else:
        raise ServiceError("the team backends need RMFLOW_STORAGE_URL (or `rmflow up --team` to start a local object store)")
    db.ensure_databases()
    store.ensure_bucket()
    return db, store, rows


@_locked
def up(label_studio: bool = True, serve: dict[str, Any] | None = None, wait: bool = False, team_backends: bool = False) -> dict[str, Any]:
    """Starts what is not running yet. With `serve` (the keyword arguments of `serve_settings`),
    also the receiver (watching the project with its retrain rule), the project's webhook to it and
    the deployments. With `team_backends`, or when RMFLOW_DATABASE_URL / RMFLOW_STORAGE_URL are set,
    Prefect, MLflow and Label Studio run on the team's PostgreSQL and bucket (`postgres` and
    `objectstore` in the result): the configured ones, else local ones started here.

    Safe to run again: what runs with the settings asked for is left alone; the receiver and the
    deployments restart when their settings or the Prefect server changed. The deployments never
    restart under a pipeline run: `up` refuses, naming the runs, or with `wait` waits for them."""
    out: dict[str, Any] = {}
    db = store = None
    if team_backends or team.configured():
        db, store, rows = resolve_team_backends(start_local=team_backends)
        out.update(rows)
    out["prefect"] = prefect_up(db=db)
    out["mlflow"] = mlflow_up(db=db, store=store)
    _record_team(out["mlflow"]["url"] if db is not None else None)
    if label_studio:
        out["labelstudio"] = labelstudio.up(db=labelstudio_db_env(db) if db else None)
    if serve is not None:
        api = out["prefect"]["api_url"]
        settings = serve_settings(**serve)
        # the deployments first: when they refuse to restart under a run, the receiver keeps
        # watching what they still serve
        out["deployments"] = deployments_up(api, settings["file"], settings["policy"], settings["interval_s"], wait=wait, store=store)
        out["receiver"] = receiver_up(api)
        if serve.get("webhook", True) and (label_studio or os.environ.get("LABEL_STUDIO_URL")):
            out["webhook"] = register_webhook(settings["params"]["project"], serve.get("webhook_url") or out["receiver"]["url"])
    return out


def _record_team(mlflow_url: str | None) -> None:
    """Where clients find MLflow once it runs on the team backends (rmcore.paths.mlflow_tracking_uri
    reads it); removed when `up` runs embedded again."""
    path = rmflow_home() / TEAM_FILE
    if mlflow_url:
        write_atomic(path, json.dumps({"mlflow_tracking_uri": mlflow_url}))
    else:
        path.unlink(missing_ok=True)


def labelstudio_db_env(db: team.Database) -> dict[str, str]:
    """Label Studio's settings for its `labelstudio` database (its POSTGRE_* variables)."""
    return {"DJANGO_DB": "default", "POSTGRE_NAME": "labelstudio", "POSTGRE_USER": db.user, "POSTGRE_PASSWORD": db.password,
            "POSTGRE_HOST": db.host, "POSTGRE_PORT": str(db.port)}


def serve_settings(params: dict[str, Any], policy: RetrainPolicy | dict[str, Any] | None = None,
                   interval_s: int = SENSOR_INTERVAL_S, **_: Any) -> dict[str, Any]:
    """Writes the deployments' default parameters (PipelineParams as JSON, validated by the caller)
    where the serve process reads them, and the project's retrain rule where the receiver reads it."""
    from rmflow.infra.receiver import ProjectWatch, read_watches, write_watches

    checked = dict(params)
    if checked.get("data_root"):  # the receiver, the runner and its flow runs must read the same watermark
        checked["data_root"] = str(Path(checked["data_root"]).expanduser().absolute())
    policy = RetrainPolicy.model_validate(policy or {})
    params_file = deployments_service().home / "params.json"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(json.dumps(checked, indent=1))
    # one watched project: the deployments serve one project's parameters, and a labels-ready event
    # for another project would train this one
    watch = ProjectWatch(project=checked["project"], data_root=str(dataset_root(checked["project"], checked.get("data_root"))), policy=policy)
    if read_watches() != {watch.project: watch}:
        write_watches([watch])
    return {"params": checked, "policy": policy, "interval_s": interval_s, "file": params_file}


def register_webhook(project: str, receiver_url: str) -> dict[str, Any]:
    """Project setup: the Label Studio project (created if missing) posts its annotations to the receiver."""
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra.receiver import HOOK_PATH, webhook_secret

    ls = lst.connect()
    project_id = lst.ensure_project(ls, project)
    url = receiver_url.rstrip("/") + HOOK_PATH
    return {"project": project, "project_id": project_id, "url": url,
            "id": lst.ensure_webhook(ls, project_id, url, webhook_secret())}


# in the order `down` stops them: the team's database and object store last, after what uses them
SERVICES = ("deployments", "receiver", "prefect", "mlflow", "labelstudio", "postgres", "objectstore")


def _services() -> dict[str, ManagedService]:
    return {"deployments": deployments_service(), "receiver": receiver_service(), "prefect": prefect_service(),
            "mlflow": mlflow_service(), "labelstudio": labelstudio.service(), "postgres": postgres.service(),
            "objectstore": objectstore.service()}


@_locked
def down(only: tuple[str, ...] = SERVICES) -> dict[str, bool]:
    """Stops the services rmflow started, the deployments first (their runs need the servers)."""
    services = _services()
    return {name: postgres.down() if name == "postgres" else services[name].stop(STOP_TIMEOUT_S.get(name, 20))
            for name in SERVICES if name in only}


# SeaweedFS lingers ~20 s after SIGTERM with its filer reconnecting; what it acknowledged is on disk
STOP_TIMEOUT_S = {"objectstore": 5}


HEALTH = {"deployments": "/health", "receiver": "/health", "prefect": "/api/health", "mlflow": "/health", "labelstudio": "/health"}
ON_PREFECT = ("deployments", "receiver")  # useless without the Prefect server they were started with


def status() -> dict[str, Any]:
    """Each service: running (our process alive), url, pid, healthy, and reason (why it is not
    healthy; None when it is). The receiver and the deployments are healthy only while the Prefect
    server they were started with is the one rmflow runs now, and it answers."""
    prefect = prefect_service().state()
    prefect_api = f"{prefect['url']}/api" if prefect and prefect.get("url") else None
    out = {}
    for name, svc in _services().items():
        if name in TEAM_BACKENDS:
            out[name] = _backend_status(name)
            continue
        state = svc.state()
        reason = _unhealthy(name, state, prefect_api)
        out[name] = {"running": bool(state), "url": state.get("url") if state else None,
                     "pid": state.get("pid") if state else None, "healthy": reason is None, "reason": reason}
    return out


TEAM_BACKENDS = ("postgres", "objectstore")


def _backend_status(name: str) -> dict[str, Any]:
    """The local server rmflow runs, else the configured one (RMFLOW_DATABASE_URL / RMFLOW_STORAGE_URL),
    checked with a connection; neither: not running, and "not in use" when no local one was ever set up."""
    local = (postgres if name == "postgres" else objectstore).status()
    settings = team.settings()
    if local["running"] or not (settings.database_url if name == "postgres" else settings.storage_url):
        if not local["running"] and not (postgres.pg_home() if name == "postgres" else objectstore.store_home()).joinpath("data").exists():
            local["reason"] = ("not in use: the embedded backends serve (SQLite, files under RMFLOW_HOME); "
                               "`rmflow up --team` or RMFLOW_DATABASE_URL / RMFLOW_STORAGE_URL select this one")
        return local
    row: dict[str, Any] = {"url": None}
    try:
        if name == "postgres":
            db = team.Database.from_url(settings.database_url.get_secret_value())
            row = {"url": db.url}
            db.connect(timeout_s=3).close()
        else:
            store = team.Storage.from_url(settings.storage_url, settings.endpoint_url, settings.access_key_id,
                                          settings.secret_access_key.get_secret_value() if settings.secret_access_key else None)
            row = {"url": store.endpoint_url or "https://s3.amazonaws.com", "bucket": store.bucket}
            try:
                store.client(timeout_s=3, retries=1).head_bucket(Bucket=store.bucket)
            except Exception as e:  # noqa: BLE001 — reported, not raised
                raise store.describe_error(e, "checking the bucket") from None
        reason = None
    except ServiceError as e:
        reason = str(e)
    return {"running": reason is None, **row, "pid": None, "healthy": reason is None, "reason": reason, "configured": True}


def _unhealthy(name: str, state: dict[str, Any] | None, prefect_api: str | None) -> str | None:
    if not state:
        return "not running"
    if not state.get("url"):
        return "started, but its health check has not passed"
    problem = _probe(state["url"] + HEALTH[name])
    if problem or name not in ON_PREFECT:
        return problem
    api = (state.get("started_with") or {}).get("prefect_api")
    if prefect_api is None:
        return f"it talks to Prefect at {api}, but the Prefect server is not running; `rmflow up` starts it"
    if api != prefect_api:
        return f"it talks to Prefect at {api}, but the Prefect server runs at {prefect_api}; `rmflow up` restarts it"
    problem = _probe(f"{api}/health")
    return f"its Prefect server: {problem}" if problem else None


def _probe(url: str) -> str | None:
    """None if `url` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return None if resp.status == 200 else f"{url} answered HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url} does not answer ({getattr(e, 'reason', e)})"


def prefect_api_url() -> str | None:
    """PREFECT_API_URL, else the API of the Prefect server `rmflow up` started, else None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    state = prefect_service().state()
    return f"{state['url']}/api" if state and state.get("url") else None


@contextmanager
def using_prefect(api_url: str | None) -> Iterator[None]:
    """Runs the block against `api_url`. Prefect caches its settings on first use, so setting the
    environment variable later has no effect; its own settings context does."""
    if not api_url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield
