"""rmflow operated as a service, against the real stack `rmflow up` starts: a Prefect server, the
MLflow server, Label Studio, the webhook receiver and the served deployments. Runs are created the
way a user creates them (the UI's REST call, Label Studio webhooks, the label sensor's schedule)
and observed through Prefect's API; nothing runs in-process."""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from prefect.client.base import PrefectHttpxSyncClient

pytestmark = [pytest.mark.slow, pytest.mark.services]
N = 20  # the retrain threshold: new labels since the last successful run
ARTIFACTS = Path(os.environ.get("RMFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
PIPELINE = "reward-pipeline/reward-pipeline"
# Prefect's API as its own client calls it: on SQLite a busy database answers 503 ("retry"); Prefect's
# client retries 408/429/502/503 and transient network errors with backoff (5 retries by default), then
# raises on any 4xx/5xx (CI at f3f5ecb failed on a 503 a bare httpx call took).
prefect_http = PrefectHttpxSyncClient(timeout=30)


def create_flow_run(api: str, deployment_id: str, **body) -> dict:
    """A run of the deployment, created as the UI's REST call creates it. The idempotency key makes a
    retried POST return the run the first try created, never a second run."""
    return prefect_http.post(f"{api}/deployments/{deployment_id}/create_flow_run",
                             json={**body, "idempotency_key": uuid.uuid4().hex}).json()


def pipeline_params(project: str, tiny_bert: Path, data: Path) -> dict:
    return {"project": project, "model_name": f"{project}-reward", "data_root": str(data / project),
            "run": {"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"lr": 3e-3, "epochs": 2}},
            # the gate always passes: these tests are about triggering and gating, not model quality
            "gate": {"min_accuracy": 0.0, "max_ece": 1.0, "max_length_bias": 1.0, "delta": 1.0, "bootstrap": 200}}


def serve_settings(params: dict, **more) -> dict:
    return {"params": params, "policy": {"min_new_labels": N}, "interval_s": 0, **more}


@pytest.fixture(scope="module")
def stack(label_studio, tiny_bert, tmp_path_factory):
    """`rmflow up` with deployments for the project `svc-events` (retrain at N new labels, no sensor
    schedule). Torn down except Label Studio, which the session owns."""
    from rmflow.infra import stack as st

    mp = pytest.MonkeyPatch()
    mp.setenv("RMFLOW_HOME", str(tmp_path_factory.getbasetemp() / "rmflow_home"))
    data = tmp_path_factory.mktemp("service_data")
    params = pipeline_params("svc-events", tiny_bert, data)
    services = st.up(True, serve=serve_settings(params))
    api = services["prefect"]["api_url"]
    yield {"api": api, "services": services, "params": params, "data": data, "tiny_bert": tiny_bert}
    st.down(only=("deployments", "receiver", "prefect", "mlflow"))
    mp.undo()


def deployment(api: str, name: str) -> dict:
    return prefect_http.get(f"{api}/deployments/name/{name}").json()


def flow_runs(api: str, deployment_name: str, since: datetime, project: str | None = None) -> list[dict]:
    """The deployment's runs created after `since` (for runs created on demand: a trigger, the UI)."""
    dep = deployment(api, deployment_name)
    body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = prefect_http.post(f"{api}/flow_runs/filter", json=body).json()
    return [r for r in runs if datetime.fromisoformat(r["created"]) >= since
            and (project is None or r["parameters"].get("params", {}).get("project") == project)]


def runs_started_after(api: str, deployment_name: str, since: datetime) -> list[dict]:
    """The deployment's runs that started after `since`. Scheduled runs are created ahead of time
    (the scheduler books a schedule's next runs in batches), so `created` says nothing about when
    they ran: filter on the start, on the server (its default page would cut a long schedule)."""
    dep = deployment(api, deployment_name)
    body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "start_time": {"after_": since.isoformat()}},
            "sort": "START_TIME_ASC"}
    return prefect_http.post(f"{api}/flow_runs/filter", json=body).json()


def wait_until_done(api: str, run_id: str, timeout_s: float = 420) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        run = prefect_http.get(f"{api}/flow_runs/{run_id}").json()
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout_s}s")


def wait_for_runs(api: str, since: datetime, project: str, count: int = 1, timeout_s: float = 120) -> list[dict]:
    """The pipeline runs for `project` created after `since`, once `count` of them exist."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        runs = flow_runs(api, PIPELINE, since, project)
        if len(runs) >= count:
            return runs
        time.sleep(1)
    raise AssertionError(f"no reward-pipeline run for {project} was created within {timeout_s}s")


def wait_started(api: str, run_id: str, timeout_s: float = 60) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        run = prefect_http.get(f"{api}/flow_runs/{run_id}").json()
        if run["start_time"]:
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not start within {timeout_s}s")


def wait_past_collection(api: str, run_id: str, timeout_s: float = 120) -> None:
    """Until the run's collect task finished: labels made later are not in its snapshot."""
    from rmflow.flows.demo import wait_past_collection as wait
    from rmflow.infra.stack import using_prefect

    with using_prefect(api):
        wait(run_id, timeout_s)


def new_tasks(project: str, n: int, seed: int) -> tuple[int, list[int]]:
    """n new prompts in Label Studio, not yet labelled: (project id, task ids)."""
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    project_id = lst.ensure_project(ls, project)
    before = {t.id for t in ls.tasks.list(project=project_id)}
    items = [{"prompt": f"[{seed}] {i.prompt}", "responses": i.responses, "gold": i.gold} for i in synthetic_items(n, 4, seed=seed)]
    lst.import_tasks(ls, project_id, items)
    new = sorted(t.id for t in ls.tasks.list(project=project_id) if t.id not in before)
    assert len(new) == n
    return project_id, new


def label(project: str, n: int, seed: int) -> datetime:
    """n new prompts, one simulated annotator each, as fast as the API takes them; returns when
    the last one was submitted."""
    from rmflow.infra import labelstudio_api as lst

    project_id, new = new_tasks(project, n, seed)
    lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=seed, task_ids=new)
    return datetime.now(timezone.utc)


def label_at_human_pace(project_id: int, task_ids: list[int], seed: int, between=None) -> datetime:
    """One annotation at a time, as a person submits them: 1-5 s apart in bursts, with a pause
    after every sixth. `between(i)` runs after the i-th label. Returns when the last was submitted."""
    import random

    from rmflow.infra import labelstudio_api as lst

    rng = random.Random(seed)
    for i, task_id in enumerate(task_ids, 1):
        lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=seed, task_ids=[task_id])
        last = datetime.now(timezone.utc)
        if between is not None:
            between(i)
        if i < len(task_ids):
            time.sleep(8 if i % 6 == 0 else rng.choice([1, 1, 1.5, 2, 3, 5]))
    return last


def receiver_counts(stack: dict, project: str) -> dict:
    from rmflow.infra import stack as st
    from rmflow.infra.receiver import webhook_secret

    url = st.receiver_service().state()["url"]
    status = httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {webhook_secret()}"}).raise_for_status().json()
    return status["projects"][project]


def wait_for_count(stack: dict, project: str, pending: int, timeout_s: float = 60) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        counts = receiver_counts(stack, project)
        if counts["pending"] == pending and counts["counted_from_label_studio"]:
            return counts
        time.sleep(1)
    raise AssertionError(f"the receiver counts {counts} for {project}, expected {pending} pending")


def record_latency(path: str, seconds: float) -> None:
    """N-th annotation → pipeline run started, kept as a test artifact (the closing note's number)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "trigger-latency.json"
    seen = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**seen, path: round(seconds, 1)}, indent=1))


def artifact_rows(api: str, run_id: str, key: str) -> list[dict]:
    """The rows of the run's `key` table artifact."""
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}}
    artifacts = prefect_http.post(f"{api}/artifacts/filter", json=body).json()
    assert artifacts, f"flow run {run_id} published no {key} table"
    rows = artifacts[0]["data"]
    return json.loads(rows) if isinstance(rows, str) else rows


def gate_checks(api: str, run_id: str) -> list[str]:
    return [row["check"] for row in artifact_rows(api, run_id, "gate")]


def model_versions(name: str) -> list:
    from rmflow.infra.mlflow_client import configure_mlflow

    return sorted(configure_mlflow().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def watermark(stack: dict, project: str) -> str | None:
    from rmcore.watermark import read_watermark

    return read_watermark(stack["data"] / project).at


def test_status_lists_every_service_healthy(stack):
    from rmflow.infra import stack as st

    status = st.status()
    embedded = {"deployments", "receiver", "prefect", "mlflow", "labelstudio"}
    assert set(status) == embedded | {"postgres", "objectstore"}
    assert all(status[n]["healthy"] and status[n]["pid"] and status[n]["url"].startswith("http://127.0.0.1:")
               for n in embedded), status
    # this stack is embedded (SQLite, local files): the team backends are listed, not in use, and say so
    for name in ("postgres", "objectstore"):
        assert not status[name]["running"] and not status[name]["healthy"] and "not in use" in status[name]["reason"], status
    assert {d["name"] for d in prefect_http.post(f"{stack['api']}/deployments/filter", json={}).json()} >= {
        "reward-pipeline", "label-sensor", "request-reannotation"}


def test_receiver_rejects_a_wrong_secret_and_bad_bodies(stack):
    url = stack["services"]["receiver"]["url"]
    assert httpx.post(f"{url}/labelstudio", json={"action": "ANNOTATION_CREATED"}).status_code == 401
    assert httpx.post(f"{url}/labelstudio", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/labelstudio", json={}, headers={"Authorization": "Bearer"}).status_code == 401
    assert httpx.get(f"{url}/status").status_code == 401
    from rmflow.infra.receiver import webhook_secret

    ok = {"Authorization": f"Bearer {webhook_secret()}"}
    assert httpx.post(f"{url}/labelstudio", content=b"not json", headers=ok).status_code == 400
    assert httpx.post(f"{url}/labelstudio", json={"action": ["x"]}, headers=ok).status_code == 400
    assert httpx.post(f"{url}/labelstudio", json={"action": "ANNOTATION_CREATED", "project": 3}, headers=ok).status_code == 400
    ignored = httpx.post(f"{url}/labelstudio", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, headers=ok)
    assert ignored.status_code == 200 and ignored.json()["counted"] == 0


def test_labels_at_human_pace_start_one_run_each_time_n_are_new_none_lost_none_twice(stack):
    """The event path with labels at the pace people label. N labels 1-5 s apart (bursts, pauses)
    start exactly one run within 30 s of the N-th, and two more a second apart, before that run
    exists, start no second one. Labels made while it trains count toward the next run. Then the
    receiver is restarted between labels (one webhook hits it down) while the count is below N:
    the N-th new label still starts exactly one run within 30 s, gated against the first champion,
    holding each label of the second batch once."""
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra import stack as st

    api, project = stack["api"], "svc-events"
    since = datetime.now(timezone.utc)
    project_id, first = new_tasks(project, N + 2, seed=1)
    before_n = []
    labelled = label_at_human_pace(project_id, first[:N], seed=1,
                                   between=lambda i: before_n.append(len(flow_runs(api, PIPELINE, since, project))) if i == N - 1 else None)
    for task_id in first[N:]:  # a person keeps going after the N-th
        time.sleep(1)
        lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=1, task_ids=[task_id])
    assert before_n == [0]  # nothing started below the threshold
    run = wait_for_runs(api, since, project, timeout_s=60)[0]
    started = datetime.fromisoformat(wait_started(api, run["id"])["start_time"])
    record_latency("event path, human pace", (started - labelled).total_seconds())
    assert (started - labelled).total_seconds() <= 30, (started, labelled)

    # labels made while it trains count toward the next run
    wait_past_collection(api, run["id"])
    during = N // 2
    project_id, second = new_tasks(project, N, seed=2)
    label_at_human_pace(project_id, second[:during], seed=2)
    done = wait_until_done(api, run["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    assert flow_result(api, run["id"])["new_rankings"] == str(N + 2)
    wait_for_count(stack, project, during)  # counted from Label Studio after the watermark moved
    assert [r["id"] for r in flow_runs(api, PIPELINE, since, project)] == [run["id"]]  # cancelled ones included
    versions = model_versions(f"{project}-reward")
    assert len(versions) == 1 and versions[0].tags["validation_status"] == "passed"
    assert "vs_champion" not in gate_checks(api, run["id"])

    def restart_receiver(i: int) -> None:  # below N, nothing in flight: the count lives only in the receiver and Label Studio
        if i == 1:
            st.receiver_service().stop()
        if i == 2:  # label 2's webhook found nobody
            st.up(True, serve=serve_settings(stack["params"]))

    since2 = datetime.now(timezone.utc)
    labelled2 = label_at_human_pace(project_id, second[during:], seed=3, between=restart_receiver)
    retrain = wait_for_runs(api, since2, project, timeout_s=60)[0]
    started2 = datetime.fromisoformat(wait_started(api, retrain["id"])["start_time"])
    assert (started2 - labelled2).total_seconds() <= 30, (started2, labelled2)
    done2 = wait_until_done(api, retrain["id"])
    assert done2["state_type"] == "COMPLETED", done2["state"]
    assert len(flow_runs(api, PIPELINE, since, project)) == 2
    assert "vs_champion" in gate_checks(api, retrain["id"])  # evaluated against version 1
    assert len(model_versions(f"{project}-reward")) == 2
    assert flow_result(api, retrain["id"])["new_rankings"] == str(N)  # each label of the second batch, once


def flow_result(api: str, run_id: str, key: str = "labels") -> dict:
    """The run's `key` table artifact as {what: value}: by default what it says the run consumed."""
    return {row["what"]: row["value"] for row in artifact_rows(api, run_id, key)}


def test_a_run_created_as_the_ui_does_trains_with_its_overrides(stack):
    """POST /deployments/{id}/create_flow_run with edited parameters, as the UI's run form sends."""
    api, project = stack["api"], "svc-events"
    if not model_versions(f"{project}-reward"):  # on its own, this test needs labels: their run trains first
        since = datetime.now(timezone.utc)
        label(project, N, seed=3)
        wait_until_done(api, wait_for_runs(api, since, project)[0]["id"])
    dep = deployment(api, PIPELINE)
    params = {**stack["params"], "run": {**stack["params"]["run"], "loss": {"name": "margin"}}}
    run = create_flow_run(api, dep["id"], parameters={"params": params})
    done = wait_until_done(api, run["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    from rmflow.infra.mlflow_client import configure_mlflow

    newest = model_versions(f"{project}-reward")[-1]
    assert configure_mlflow().get_run(newest.run_id).data.params["loss.name"] == "margin"


def test_label_studio_down_when_the_run_starts_fails_named_and_the_next_label_recovers(stack):
    from rmflow.infra import labelstudio

    api, project = stack["api"], "svc-events"
    before = watermark(stack, project)
    since = datetime.now(timezone.utc)
    label(project, N, seed=4)
    # the labels are counted (webhooks, and the recount from Label Studio after the last run moved the
    # watermark: until then the receiver does not decide); the run will find Label Studio gone
    wait_for_count(stack, project, N)
    labelstudio.down()
    try:
        run = wait_for_runs(api, since, project)[0]
        done = wait_until_done(api, run["id"])
    finally:
        labelstudio.up(port=18080)
    assert done["state_type"] == "FAILED"
    logs = prefect_http.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    assert any("Label Studio" in entry["message"] and ("unreachable" in entry["message"] or "not running" in entry["message"])
               for entry in logs), [entry["message"][-200:] for entry in logs][-5:]
    assert watermark(stack, project) == before

    # the receiver asks again at the next label (not in a loop while nothing changes): the run
    # collects everything the failed one could not
    since2 = datetime.now(timezone.utc)
    label(project, 1, seed=5)
    retry = wait_for_runs(api, since2, project, timeout_s=60)[0]
    assert wait_until_done(api, retry["id"])["state_type"] == "COMPLETED"
    assert flow_result(api, retry["id"])["new_rankings"] == str(N + 1)
    from rmcore.watermark import is_after

    assert is_after(watermark(stack, project), before)


def test_a_run_created_while_the_receiver_reads_is_never_taken_for_one_that_ended(stack, monkeypatch):
    """What the receiver asks Prefect before asking for a run (in flight? created since I asked?) is
    one consistent answer. CI at c52d6b4: the trigger created the run between two separate reads, it
    looked created and not in flight (over), the next label 0.2 s later asked for a second run, and
    CANCEL_NEW cancelled the first. Here a run is created right after the receiver's first read, on
    a deployment no runner serves (so nothing executes it). A run a user scheduled for tomorrow is
    neither in flight nor the run the receiver asked for."""
    from prefect.client.orchestration import SyncPrefectClient

    from rmflow.infra.pipeline_runs import pipeline_activity
    from rmflow.infra.stack import using_prefect

    api = stack["api"]
    flow_id = prefect_http.post(f"{api}/flows/", json={"name": "rmflow-race-probe"}).json()["id"]
    dep_id = prefect_http.post(f"{api}/deployments/", json={"name": "probe", "flow_id": flow_id}).json()["id"]
    created: list[str] = []

    def create_run(**body) -> str:
        created.append(create_flow_run(api, dep_id, **body)["id"])
        return created[-1]

    read = SyncPrefectClient.read_flow_runs

    def read_then_a_run_is_created(self, *args, **kwargs):
        runs = read(self, *args, **kwargs)
        if len(created) == 1:
            create_run()
        return runs

    try:
        since = datetime.now(timezone.utc)
        tomorrow = (since + timedelta(days=1)).isoformat()
        create_run(state={"type": "SCHEDULED", "state_details": {"scheduled_time": tomorrow}})
        with using_prefect(api):
            later = pipeline_activity("rmflow-race-probe/probe", since)
            monkeypatch.setattr(SyncPrefectClient, "read_flow_runs", read_then_a_run_is_created)
            during = pipeline_activity("rmflow-race-probe/probe", since)
            monkeypatch.undo()
            after = pipeline_activity("rmflow-race-probe/probe", since)
        assert (later.created_since, later.in_flight) == (False, []), later
        assert len(created) == 2
        assert (during.created_since, during.in_flight) == (False, []), during  # not seen at all: the receiver's grace applies
        assert after.created_since and [r for r in after.in_flight if created[1] in r] == after.in_flight != [], after  # seen, in flight
    finally:
        for path in [*(f"flow_runs/{run_id}" for run_id in created), f"deployments/{dep_id}", f"flows/{flow_id}"]:
            with contextlib.suppress(httpx.HTTPError):  # best effort: a failed clean-up must not hide the test's outcome
                prefect_http.delete(f"{api}/{path}")


def test_a_run_whose_runner_is_killed_is_crashed_and_new_labels_start_a_run(stack):
    """A reboot or OOM kill mid-training: the runner and its flow run die with SIGKILL, leaving the
    run RUNNING. Its heartbeats stop, the zombie automation marks it Crashed, and it stops blocking
    retraining: `rmflow up` brings the runner back and the next labels start a run that completes."""
    import os
    import signal

    from rmflow.infra import stack as st

    api, project = stack["api"], "svc-events"
    since = datetime.now(timezone.utc)
    label(project, N, seed=6)
    run = wait_for_runs(api, since, project)[0]
    wait_past_collection(api, run["id"])  # training
    pid = st.deployments_service().state()["pid"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    killed = time.monotonic()
    assert prefect_http.get(f"{api}/flow_runs/{run['id']}").json()["state_type"] == "RUNNING"
    st.up(True, serve=serve_settings(stack["params"]))  # up again heals: a new runner
    crashed = wait_until_done(api, run["id"], timeout_s=240)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    record_latency("killed runner → run Crashed", time.monotonic() - killed)

    since2 = datetime.now(timezone.utc)
    label(project, 2, seed=7)
    rerun = wait_for_runs(api, since2, project, timeout_s=60)[0]
    done = wait_until_done(api, rerun["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    assert flow_result(api, rerun["id"])["new_rankings"] == str(N + 2)
    # two labels a fraction of a second apart asked once: no second run, not even one CANCEL_NEW cancelled
    assert [r["id"] for r in flow_runs(api, PIPELINE, since2, project)] == [rerun["id"]]


def _browser():
    os.environ["SE_AVOID_STATS"] = "true"  # no Selenium Manager downloads or stats
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path("/usr/bin/chromedriver").exists():
        pytest.fail("chromium-driver is not installed (./run.sh test installs it with apt-get)")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def _wait_for(driver, find, timeout_s: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            found = find(driver)
        except StaleElementReferenceException:  # the page re-rendered between finding and reading
            found = None
        if found:
            return found
        time.sleep(0.5)
    return None


def test_the_prefect_ui_run_form_offers_the_five_losses(stack):
    from selenium.webdriver.common.by import By

    from rmcore.config import LossName

    dep = deployment(stack["api"], PIPELINE)
    driver = _browser()
    try:
        driver.get(f"{stack['services']['prefect']['url']}/deployments/deployment/{dep['id']}/run")
        losses = [loss.value for loss in LossName]

        def loss_select(d):
            for select in d.find_elements(By.TAG_NAME, "select"):
                if [o.get_attribute("value") or o.text for o in select.find_elements(By.TAG_NAME, "option") if o.text] == losses:
                    return select
            return None

        select = _wait_for(driver, loss_select)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "prefect-reward-pipeline-run-form.png"))
        assert select is not None, "no dropdown with the five losses on the reward-pipeline run form"
        assert "Max Length" in driver.page_source and "Workers" in driver.page_source
    finally:
        driver.quit()


def test_annotators_see_prompt_and_responses_but_no_internal_ids(stack, label_studio):
    from selenium.webdriver.common.by import By

    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    project_id = lst.ensure_project(ls, "svc-annotator-view")
    item = synthetic_items(1, 4, seed=9)[0]
    lst.import_tasks(ls, project_id, [{"prompt": item.prompt, "responses": item.responses, "gold": item.gold}])
    task_id = next(iter(ls.tasks.list(project=project_id))).id
    url = labelstudio.status()["url"]
    driver = _browser()
    try:
        driver.get(f"{url}/user/login/")
        _wait_for(driver, lambda d: d.find_elements(By.NAME, "email"))
        driver.find_element(By.NAME, "email").send_keys(labelstudio.ADMIN)
        driver.find_element(By.NAME, "password").send_keys(labelstudio.credentials()["password"])
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        _wait_for(driver, lambda d: "/user/login" not in d.current_url)
        driver.get(f"{url}/projects/{project_id}/data?task={task_id}")
        # the texts, read in one pass: the editor re-renders the items while it loads
        items = _wait_for(driver, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".htx-ranker-item") if e.text])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "labelstudio-ranking-task.png"))
        assert items and len(items) == 4
        shown = "\n".join(items)  # what a person sees: hidden elements have no text
        assert all(response in shown for response in item.responses)
        assert not any(f"r{i}" in shown.split() for i in range(4)), shown
        assert "Rank the 4 responses, best first" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_a_webhook_that_never_arrives_is_caught_by_the_polling_sensor(stack):
    """Polling path: a project whose webhooks never reach the receiver (none registered), the
    label-sensor deployment on a 10 s schedule: exactly one pipeline run, started by the sensor;
    every sensor run completes."""
    from rmflow.infra import stack as st
    from rmflow.infra.pipeline_runs import run_origin

    api, project = stack["api"], "svc-polling"
    params = pipeline_params(project, stack["tiny_bert"], stack["data"])
    st.up(True, serve=serve_settings(params, interval_s=10, webhook=False))
    project_id, tasks = new_tasks(project, N, seed=8)
    since = datetime.now(timezone.utc)
    labelled = label_at_human_pace(project_id, tasks, seed=8)
    run = wait_for_runs(api, since, project, timeout_s=90)[0]
    done = wait_until_done(api, run["id"])
    assert done["state_type"] == "COMPLETED"
    record_latency("sensor path (10 s interval), human pace", (datetime.fromisoformat(done["start_time"]) - labelled).total_seconds())
    from prefect.client.schemas.objects import FlowRun

    assert run_origin(FlowRun.model_validate(done)) == "the label sensor"
    after = datetime.fromisoformat(done["end_time"])
    # sensor runs after the pipeline finished see no new labels; wait for two of them
    end = time.monotonic() + 90
    while time.monotonic() < end:
        sensors = [r for r in runs_started_after(api, "label-sensor/label-sensor", since) if r["state_type"] in TERMINAL]
        if sum(datetime.fromisoformat(r["start_time"]) > after for r in sensors) >= 2:
            break
        time.sleep(2)
    assert sensors and all(r["state_type"] == "COMPLETED" for r in sensors), [(r["name"], r["state_type"]) for r in sensors]
    assert sum(datetime.fromisoformat(r["start_time"]) > after for r in sensors) >= 2
    assert [r["id"] for r in flow_runs(api, PIPELINE, since, project)] == [run["id"]]
