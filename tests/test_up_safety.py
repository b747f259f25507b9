"""`rmflow up` run again, run twice at once, interrupted, or after the world moved: it restarts only
what runs with out-of-date settings, never the deployments under a flow run, leaves no process that
`down` does not know, and survives a wall-clock step or a truncated state file.

The fast tests use small real processes as services (a Python HTTP server standing in for a server
where the test is about rmflow's process handling, not the server). The slow ones run the real
Prefect server, receiver, `rmflow serve` and Label Studio; faults are injected by stopping them.
"""
from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from prefect.states import Completed, Running

from rmflow.infra import stack
from rmflow.infra.process import ManagedService, Secret, ServiceError, free_port, start_ticks

STANDIN = '''
import http.server, subprocess, sys, time
port, delay, child, status, tag = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
if child:  # a process of its own in the service's group, as a runner's flow run is
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", tag + "-child"])
time.sleep(delay)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
'''


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh RMFLOW_HOME; every process started under it (its path is on their command lines) is
    killed afterwards, whatever the test left."""
    path = tmp_path / "home"
    monkeypatch.setenv("RMFLOW_HOME", str(path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # `up` skips the MLflow server: nothing here trains
    yield path
    for proc in psutil.process_iter(["cmdline"]):
        if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def standin(home: Path, name: str, delay: float = 0.0, child: bool = False, status: int = 200) -> list[str]:
    """The command of a small HTTP service answering every GET with `status` after `delay` seconds;
    its script path carries `name`, the marker ManagedService looks for."""
    script = home.parent / f"standin-{name}.py"
    script.write_text(STANDIN)
    return [sys.executable, str(script), "{port}", str(delay), "1" if child else "0", str(status), f"{home.parent}-{name}"]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tagged(home: Path, tag: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if f"{home.parent}-{tag}" in " ".join(p.info["cmdline"] or [])
            and p.status() != psutil.STATUS_ZOMBIE]


# 4. process identity --------------------------------------------------------------------------


def test_a_wall_clock_step_keeps_the_service_ours_and_a_reused_pid_is_not(home):
    """The state's wall-clock start shifted by 30 s (what an NTP step or a VM resume does to
    psutil's create_time) still names our live process; the same pid with another start tick (a
    pid the system reused) does not, even with the marker on its command line."""
    svc = ManagedService("prefect", home / "prefect")
    proc = svc.spawn([sys.executable, "-c", "import time; time.sleep(60)  # prefect"], {}, marker="prefect")
    try:
        state = json.loads(svc.state_file.read_text())
        svc.state_file.write_text(json.dumps({**state, "started": state["started"] + 30}))
        assert svc.state() is not None and svc.state()["pid"] == proc.pid
        assert state["ticks"] == start_ticks(proc.pid)
        svc.state_file.write_text(json.dumps({**state, "ticks": state["ticks"] + 1}))
        assert svc.state() is None and svc.stop() is False and alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_without_proc_the_start_time_falls_back_to_create_time(home, monkeypatch):
    from rmflow.infra import process

    svc = ManagedService("prefect", home / "prefect")
    proc = svc.spawn([sys.executable, "-c", "import time; time.sleep(60)  # prefect"], {}, marker="prefect")
    try:
        monkeypatch.setattr(process, "start_ticks", lambda pid: None)
        assert svc.state()["pid"] == proc.pid
        state = json.loads(svc.state_file.read_text())
        svc.state_file.write_text(json.dumps({**state, "started": state["started"] + 30}))
        assert svc.state() is None
    finally:
        proc.kill()
        proc.wait()


# 5. state files ---------------------------------------------------------------------------------


def test_a_truncated_state_file_counts_as_absent_with_a_warning(home, caplog):
    for name in stack.SERVICES:
        path = home / name / "state.json"
        path.parent.mkdir(parents=True)
        path.write_text('{"pid": 12')
    assert stack.prefect_service().state() is None
    assert "cannot read" in caplog.text and "state.json" in caplog.text
    status = stack.status()
    assert not any(s["running"] for s in status.values()) and status["prefect"]["reason"] == "not running"
    assert stack.down() == dict.fromkeys(stack.SERVICES, False)
    # and a start goes ahead as if the service were not running
    started = stack._start_http(stack.mlflow_service(), free_port(0), standin(home, "mlflow"), {}, "/health", 20)
    assert started["started"] and stack.status()["mlflow"]["healthy"]


def test_a_reader_never_sees_a_half_written_state(home):
    """State is replaced in one step: a status call while `up` records never reads a partial file."""
    svc = ManagedService("prefect", home / "prefect")
    proc = svc.spawn([sys.executable, "-c", "import time; time.sleep(60)  # prefect"], {}, marker="prefect")
    stop, errors = threading.Event(), []

    def write():
        for i in range(100):
            svc.record(url=f"http://127.0.0.1:{i}", padding="x" * 100_000)
        stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while not stop.is_set():
            try:
                json.loads(svc.state_file.read_text())
            except ValueError as e:
                errors.append(e)
    finally:
        writer.join()
        proc.kill()
        proc.wait()
    assert not errors, f"{len(errors)} partial reads"
    assert not list(svc.home.glob("*.tmp"))


# 3. failed starts, interrupted starts, concurrent ups -----------------------------------------


def test_a_start_that_never_becomes_healthy_leaves_no_process_and_no_state(home):
    svc = stack.receiver_service()
    cmd = standin(home, "receiver", delay=60, child=True)
    with pytest.raises(ServiceError, match="was not ready within"):
        stack._start_http(svc, free_port(0), cmd, {}, "/health", timeout_s=2)
    time.sleep(0.5)
    assert not tagged(home, "receiver") and not tagged(home, "receiver-child"), "the failed start left processes behind"
    assert not svc.state_file.exists()


def test_a_service_that_exits_while_starting_is_reported_with_what_it_logged(home):
    """The error of a start that died says why in the service's own words (the end of its log since
    this start), not only where the log is; nothing is left running or recorded."""
    svc = stack.receiver_service()
    svc.home.mkdir(parents=True, exist_ok=True)
    svc.log_file.write_text("an earlier start's line: not this start's reason\n")
    crash = [sys.executable, "-c", "import sys; print('bind 127.0.0.1:{port}: address already in use', flush=True); sys.exit(3)"]
    with pytest.raises(ServiceError, match="exited before it was ready") as failed:
        stack._start_http(svc, free_port(0), crash, {}, "/health", timeout_s=20)
    assert "address already in use" in str(failed.value) and "earlier start" not in str(failed.value)
    assert not svc.state_file.exists()


def test_a_start_left_half_done_by_a_killed_up_is_stopped_before_starting_again(home):
    """An `up` killed during a health check leaves a process with a state but no URL: the next `up`
    stops it (and its group) rather than starting a second copy beside it."""
    svc = stack.mlflow_service()
    leftover = svc.spawn([part.format(port=free_port(0)) for part in standin(home, "mlflow", delay=60, child=True)], {}, marker="mlflow")
    time.sleep(0.5)
    started = stack._start_http(svc, free_port(0), standin(home, "mlflow"), {}, "/health", 20)
    assert started["started"] and not alive(leftover.pid) and not tagged(home, "mlflow-child")
    assert stack.status()["mlflow"]["healthy"]


def test_two_ups_at_once_start_one_server(home, monkeypatch):
    """The second `up` waits for the first (up.lock) and finds its server, instead of starting
    another on the same port while the first is still in its health check. The Prefect server is
    stood in for by a slow-starting HTTP service: this is about `up`, not Prefect."""
    port, cmd = free_port(0), standin(home, "prefect", delay=1.5)

    def fake_prefect_up(**_: object):
        result = stack._start_http(stack.prefect_service(), port, cmd, {}, "/api/health", 30)
        return {**result, "api_url": result["url"] + "/api"}

    monkeypatch.setattr(stack, "prefect_up", fake_prefect_up)
    results, errors = [], []

    def run():
        try:
            results.append(stack.up(label_studio=False))
        except Exception as e:  # noqa: BLE001 — reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # the second starts while the first waits for its server
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r["prefect"]["started"] for r in results) == [False, True]
    assert len({r["prefect"]["url"] for r in results}) == 1
    assert len(tagged(home, "prefect")) == 1


# 2. settings a service started with ---------------------------------------------------------------


def test_a_service_restarts_when_what_it_started_with_changed_and_keeps_no_secret(home):
    svc, port = stack.receiver_service(), free_port(0)
    cmd = standin(home, "receiver")
    first_secret, second_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)

    def start(api, secret, before_restart=None):
        started_with = {"prefect_api": api, "webhook_secret": Secret(secret)}
        result = stack._start_http(svc, port, cmd, {}, "/health", 20, started_with, before_restart)
        return result, svc.state()["pid"]

    first, pid1 = start("http://127.0.0.1:1/api", first_secret)
    again, pid2 = start("http://127.0.0.1:1/api", first_secret)
    assert first["started"] and not again["started"] and pid1 == pid2
    new_secret, pid3 = start("http://127.0.0.1:1/api", second_secret)
    assert new_secret["started"] and pid3 != pid1 and not alive(pid1)
    state_text = svc.state_file.read_text()
    assert first_secret not in state_text and second_secret not in state_text

    def refuse(reason):
        raise ServiceError(f"not now: {reason}")

    with pytest.raises(ServiceError, match="prefect_api changed"):
        start("http://127.0.0.1:2/api", second_secret, refuse)
    assert alive(pid3) and svc.state()["pid"] == pid3
    moved, pid4 = start("http://127.0.0.1:2/api", second_secret)
    assert moved["started"] and pid4 != pid3 and svc.state()["started_with"]["prefect_api"] == "http://127.0.0.1:2/api"


def test_status_says_why_the_receiver_is_unhealthy_when_prefect_is_gone_moved_or_failing(home):
    prefect = stack._start_http(stack.prefect_service(), free_port(0), standin(home, "prefect"), {}, "/api/health", 20)
    api = prefect["url"] + "/api"
    stack._start_http(stack.receiver_service(), free_port(0), standin(home, "receiver"), {}, "/health", 20, {"prefect_api": api})
    status = stack.status()
    assert status["receiver"]["healthy"] and status["receiver"]["reason"] is None and status["prefect"]["reason"] is None

    stack.prefect_service().stop()
    status = stack.status()["receiver"]
    assert status["running"] and not status["healthy"] and "Prefect server is not running" in status["reason"]

    moved = stack._start_http(stack.prefect_service(), free_port(0), standin(home, "prefect"), {}, "/api/health", 20)
    status = stack.status()["receiver"]
    assert not status["healthy"] and f"runs at {moved['url']}/api" in status["reason"] and api in status["reason"]



def test_status_reports_a_prefect_that_answers_with_errors(home):
    port = free_port(0)
    svc = stack.prefect_service()
    svc.spawn([part.format(port=port) for part in standin(home, "prefect", status=503)], {}, marker="prefect")
    svc.record(url=f"http://127.0.0.1:{port}")
    api = f"http://127.0.0.1:{port}/api"
    stack._start_http(stack.receiver_service(), free_port(0), standin(home, "receiver"), {}, "/health", 20, {"prefect_api": api})
    time.sleep(0.5)
    status = stack.status()
    assert not status["prefect"]["healthy"] and "HTTP 503" in status["prefect"]["reason"]
    assert not status["receiver"]["healthy"] and "its Prefect server" in status["receiver"]["reason"]


# 7. a relative RMFLOW_HOME ----------------------------------------------------------------------


def test_a_relative_rmflow_home_is_made_absolute(tmp_path, monkeypatch):
    from rmcore.paths import mlflow_artifact_root, mlflow_tracking_uri, rmflow_home

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RMFLOW_HOME", "state/rmflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by earlier tests that configured MLflow
    assert rmflow_home() == tmp_path / "state" / "rmflow"
    # what `up` hands MLflow: a relative path is no file URI at all
    assert Path(mlflow_artifact_root()).as_uri().startswith("file:///")
    assert mlflow_tracking_uri() == f"sqlite:///{tmp_path}/state/rmflow/mlflow.db"
    assert Path(stack.prefect_env()["PREFECT_HOME"]).is_absolute()


# 8. the pipeline's concurrency lease ----------------------------------------------------------


def test_the_pipeline_ends_its_run_when_the_slot_lease_cannot_be_renewed(monkeypatch):
    """The flow asks Prefect for a lease long enough to ride out a short outage and for the run to
    end when renewal fails (a lapsed lease frees the slot for a second run)."""
    import inspect

    from prefect.concurrency.sync import concurrency as prefect_concurrency

    from rmflow.flows import pipeline

    seen = {}

    @contextmanager
    def recording(names, **kwargs):
        seen.update(kwargs, names=names)
        yield

    monkeypatch.setattr(pipeline, "concurrency", recording)
    monkeypatch.setattr(pipeline, "pipeline_lock", lambda model: f"rmflow-pipeline-{model}")
    monkeypatch.setattr(pipeline, "_stages", lambda params: {"ran": True})
    assert pipeline.reward_pipeline.fn(pipeline.PipelineParams(model_name="m")) == {"ran": True}
    assert seen["names"] == "rmflow-pipeline-m" and seen["strict"] is True
    assert seen["raise_on_lease_renewal_failure"] is True
    assert seen["lease_duration"] == pipeline.LEASE_S >= 120
    assert {"lease_duration", "raise_on_lease_renewal_failure"} <= set(inspect.signature(prefect_concurrency).parameters)


# 6. Label Studio webhooks ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.services
def test_registering_the_receiver_again_removes_rmflow_hooks_to_old_ports_only(label_studio):
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    project, other = lst.ensure_project(ls, "upsafe-hooks"), lst.ensure_project(ls, "upsafe-hooks-other")
    secret = secrets.token_urlsafe(16)
    common = {"actions": lst.WEBHOOK_ACTIONS, "is_active": True, "send_payload": True, "send_for_all_actions": False}
    # not rmflow's: another path, another header scheme
    foreign = [ls.webhooks.create(project=project, url="http://127.0.0.1:7001/elsewhere", headers={"Authorization": "Bearer x"}, **common).id,
               ls.webhooks.create(project=project, url="http://127.0.0.1:7002/labelstudio", headers={"X-Api-Key": "k"}, **common).id]
    # rmflow's, registered before hooks were marked: a bearer token to /labelstudio on loopback
    legacy = ls.webhooks.create(project=project, url="http://127.0.0.1:7003/labelstudio",
                                headers={"Authorization": f"Bearer {secret}"}, **common).id
    other_project = lst.ensure_webhook(ls, other, "http://127.0.0.1:7004/labelstudio", secret)
    port_a = lst.ensure_webhook(ls, project, "http://127.0.0.1:7005/labelstudio", secret)
    port_b = lst.ensure_webhook(ls, project, "http://127.0.0.1:7006/labelstudio", secret)
    assert lst.ensure_webhook(ls, project, "http://127.0.0.1:7006/labelstudio", secret) == port_b  # again: the same hook

    hooks = {h.id: h for h in ls.webhooks.list(project=str(project)) if h.project == project}
    assert set(hooks) == {*foreign, port_b}, {h.id: h.url for h in hooks.values()}
    assert port_a not in hooks and legacy not in hooks
    assert hooks[port_b].is_active and hooks[port_b].url.endswith(":7006/labelstudio")
    assert other_project in {h.id for h in ls.webhooks.list(project=str(other))}


# 1 and 2 on the real stack ------------------------------------------------------------------------

@contextmanager
def prefect_client(api: str) -> Iterator:
    from prefect.client.orchestration import get_client

    with stack.using_prefect(api), get_client(sync_client=True) as client:
        yield client


SERVE_A = {"params": {"project": "upsafe", "model_name": "upsafe-reward"}, "policy": {"min_new_labels": 5}, "interval_s": 0,
           "webhook": False}
SERVE_B = {**SERVE_A, "interval_s": 3600}  # another option for the deployments only (the receiver does not poll)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`rmflow up` without Label Studio and MLflow (nothing here trains): the real Prefect server,
    receiver and `rmflow serve`, with a reward-pipeline run in progress as Prefect sees one (created
    RUNNING: the runner never picks it up, so nothing trains)."""
    root = tmp_path_factory.mktemp("served")
    env = {"RMFLOW_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
           "RMFLOW_WEBHOOK_SECRET": secrets.token_urlsafe(24)}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        api = stack.up(False, SERVE_A)["prefect"]["api_url"]
        with prefect_client(api) as client:  # Prefect's client: it retries the 503s of a busy SQLite server
            dep = client.read_deployment_by_name("reward-pipeline/reward-pipeline")
            run = client.create_flow_run_from_deployment(dep.id, name="upsafe-training", state=Running())
        assert run.state.type.value == "RUNNING", run.state
        yield {"api": api, "run": {"name": run.name, "id": str(run.id)}, "env": env, "root": root}
    finally:
        stack.down()
        mp.undo()
        for proc in psutil.process_iter(["cmdline"]):
            if str(root) in " ".join(proc.info["cmdline"] or []):
                proc.kill()


@pytest.fixture
def stack_env(served, monkeypatch) -> dict:
    for key, value in served["env"].items():  # over the per-test RMFLOW_HOME of conftest
        monkeypatch.setenv(key, value)
    return served


def _pids() -> dict[str, int]:
    return {name: s["pid"] for name, s in stack.status().items() if s["running"]}


@pytest.mark.slow
@pytest.mark.services
def test_up_with_other_settings_refuses_while_a_pipeline_run_is_in_progress(stack_env):
    """Restarting the runner stops its process group, flow runs included: `up` with another option
    names the run and stops, and `up` with the same settings restarts nothing."""
    pids, run = _pids(), stack_env["run"]
    with pytest.raises(ServiceError) as refused:
        stack.up(False, SERVE_B)
    assert run["name"] in str(refused.value) and run["id"] in str(refused.value) and "--wait" in str(refused.value)
    assert _pids() == pids and alive(pids["deployments"])
    again = stack.up(False, SERVE_A)
    assert not any(s["started"] for s in again.values()) and _pids() == pids
    status = stack.status()
    assert all(status[name]["healthy"] and status[name]["reason"] is None for name in ("prefect", "receiver", "deployments")), status


@pytest.mark.slow
@pytest.mark.services
def test_a_new_webhook_secret_restarts_the_receiver_and_nothing_else(stack_env, monkeypatch):
    """The receiver reads the secret once: with a new one it would answer Label Studio 401 while
    looking healthy. `up` restarts it (and only it: the deployments' settings did not change)."""
    pids = _pids()
    monkeypatch.setenv("RMFLOW_WEBHOOK_SECRET", new := secrets.token_urlsafe(24))
    result = stack.up(False, SERVE_A)
    assert result["receiver"]["started"] and not result["deployments"]["started"] and not result["prefect"]["started"]
    assert _pids()["deployments"] == pids["deployments"] and not alive(pids["receiver"])
    hook = result["receiver"]["url"] + "/labelstudio"
    assert httpx.post(hook, json={}, headers={"Authorization": f"Bearer {stack_env['env']['RMFLOW_WEBHOOK_SECRET']}"}).status_code == 401
    assert httpx.post(hook, json={}, headers={"Authorization": f"Bearer {new}"}).status_code != 401  # (400: an empty body)
    state = stack.receiver_service().state_file.read_text()
    assert new not in state and stack_env["env"]["RMFLOW_WEBHOOK_SECRET"] not in state
    assert stack.status()["receiver"]["reason"] is None


@pytest.mark.slow
@pytest.mark.services
def test_wait_lets_the_runs_finish_before_the_runner_restarts(stack_env, monkeypatch):
    """The restart guard against the real Prefect server, on a stand-in runner whose group holds a
    "flow run" process: with `wait` the restart waits until Prefect has no run in progress, then
    stops the old group (run process included) and starts the new one."""
    monkeypatch.setattr(stack, "IDLE_POLL_S", 0.5)
    api, home = stack_env["api"], stack_env["root"] / "standin"
    svc = ManagedService("deployments", home)
    cmd = standin(home, "deployments", child=True)
    old = stack._start_http(svc, free_port(0), cmd, {}, "/health", 20, {"prefect_api": api, "settings_digest": "a"})
    old_pid = svc.state()["pid"]
    assert old["started"] and tagged(home, "deployments-child")
    busy = stack.runner_runs(api)
    assert f"{stack_env['run']['name']} ({stack_env['run']['id']})" in busy
    finished = []

    def finish_runs():
        time.sleep(2)
        with prefect_client(api) as client:
            for run in busy:
                client.set_flow_run_state(run.rsplit("(", 1)[1].rstrip(")"), Completed(), force=True)
        finished.append(time.monotonic())

    finisher = threading.Thread(target=finish_runs)
    finisher.start()
    new = stack._start_http(svc, free_port(0), cmd, {}, "/health", 20, {"prefect_api": api, "settings_digest": "b"},
                            lambda reason: stack.runner_idle(api, reason, wait=True))
    restarted = time.monotonic()
    finisher.join()
    assert new["started"] and finished and restarted > finished[0], "the runner restarted before its runs finished"
    assert not alive(old_pid) and svc.state()["pid"] != old_pid
    assert len(tagged(home, "deployments-child")) == 1  # the new runner's; the old group's is gone
    assert stack.runner_runs(api) == []
