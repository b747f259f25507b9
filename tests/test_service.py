"""rmflow operated as a service, against the real stack `rmflow up` starts: a Prefect server, the
MLflow server, Label Studio, the webhook receiver and the served deployments. Runs are created the
way a user creates them (the UI's REST call, Label Studio webhooks, the label sensor's schedule)
and observed through Prefect's API; nothing runs in-process."""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.services]
N = 40  # annotations per batch = the trigger's threshold (fewer prompts risk an empty test split)
WINDOW_S = 45
ARTIFACTS = Path(os.environ.get("RMFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
LAST_BATCH: dict[str, float] = {}  # project → when its last batch of labels began (monotonic)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def pipeline_params(project: str, tiny_bert: Path, data: Path) -> dict:
    return {"project": project, "model_name": f"{project}-reward", "data_root": str(data / project),
            "run": {"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"lr": 3e-3, "epochs": 2}},
            # the gate always passes: these tests are about triggering and gating, not model quality
            "gate": {"min_accuracy": 0.0, "max_ece": 1.0, "max_length_bias": 1.0, "delta": 1.0, "bootstrap": 200}}


@pytest.fixture(scope="module")
def stack(label_studio, tiny_bert, tmp_path_factory):
    """`rmflow up` with deployments for the project `svc-events` (label trigger at N annotations,
    no sensor schedule). Torn down except Label Studio, which the session owns."""
    from rmflow.infra import stack as st

    mp = pytest.MonkeyPatch()
    mp.setenv("RMFLOW_HOME", str(tmp_path_factory.getbasetemp() / "rmflow_home"))
    data = tmp_path_factory.mktemp("service_data")
    params = pipeline_params("svc-events", tiny_bert, data)
    services = st.up(True, serve={"params": params, "min_new_labels": N, "interval_s": 0, "window_s": WINDOW_S})
    api = services["prefect"]["api_url"]
    yield {"api": api, "services": services, "params": params, "data": data, "tiny_bert": tiny_bert}
    st.down(only=("deployments", "receiver", "prefect", "mlflow"))
    mp.undo()


def deployment(api: str, name: str) -> dict:
    return httpx.get(f"{api}/deployments/name/{name}").raise_for_status().json()


def flow_runs(api: str, deployment_name: str, since: datetime, project: str | None = None) -> list[dict]:
    """The deployment's runs created after `since` (for runs created on demand: a trigger, the UI)."""
    dep = deployment(api, deployment_name)
    body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body).raise_for_status().json()
    return [r for r in runs if datetime.fromisoformat(r["created"]) >= since
            and (project is None or r["parameters"].get("params", {}).get("project") == project)]


def runs_started_after(api: str, deployment_name: str, since: datetime) -> list[dict]:
    """The deployment's runs that started after `since`. Scheduled runs are created ahead of time
    (the scheduler books a schedule's next runs in batches), so `created` says nothing about when
    they ran: filter on the start, on the server (its default page would cut a long schedule)."""
    dep = deployment(api, deployment_name)
    body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "start_time": {"after_": since.isoformat()}},
            "sort": "START_TIME_ASC"}
    return httpx.post(f"{api}/flow_runs/filter", json=body).raise_for_status().json()


def wait_until_done(api: str, run_id: str, timeout_s: float = 420) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        run = httpx.get(f"{api}/flow_runs/{run_id}").raise_for_status().json()
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout_s}s")


def wait_for_runs(api: str, since: datetime, project: str, count: int = 1, timeout_s: float = 120) -> list[dict]:
    """The pipeline runs for `project` created after `since`, once `count` of them exist."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        runs = flow_runs(api, "reward-pipeline/reward-pipeline", since, project)
        if len(runs) >= count:
            return runs
        time.sleep(1)
    raise AssertionError(f"no reward-pipeline run for {project} was created within {timeout_s}s")


def label(project: str, n: int, seed: int) -> datetime:
    """n new prompts, one simulated annotator each (n annotations through Label Studio's API);
    returns when the last one was submitted."""
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio_api as lst

    # Prefect's threshold trigger counts events in windows of WINDOW_S from the first one; once it
    # fired it ignores the rest of that window and counts the next window in a bucket opened ahead,
    # which a batch could straddle: a batch starts after both windows of the previous one closed
    if project in LAST_BATCH:
        time.sleep(max(0.0, LAST_BATCH[project] + 2 * WINDOW_S + 1 - time.monotonic()))
    LAST_BATCH[project] = time.monotonic()
    ls = lst.connect()
    project_id = lst.ensure_project(ls, project)
    before = {t.id for t in ls.tasks.list(project=project_id)}
    items = [{"prompt": f"[{seed}] {i.prompt}", "responses": i.responses, "gold": i.gold} for i in synthetic_items(n, 4, seed=seed)]
    lst.import_tasks(ls, project_id, items)
    new = [t.id for t in ls.tasks.list(project=project_id) if t.id not in before]
    assert len(new) == n
    lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=seed, task_ids=new)
    return datetime.now(timezone.utc)


def record_latency(path: str, seconds: float) -> None:
    """N-th annotation → pipeline run started, kept as a test artifact (the closing note's number)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "trigger-latency.json"
    seen = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**seen, path: round(seconds, 1)}, indent=1))


def gate_checks(api: str, run_id: str) -> list[str]:
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["gate"]}}}
    artifacts = httpx.post(f"{api}/artifacts/filter", json=body).raise_for_status().json()
    assert artifacts, f"flow run {run_id} published no gate table"
    rows = artifacts[0]["data"]
    return [row["check"] for row in (json.loads(rows) if isinstance(rows, str) else rows)]


def model_versions(name: str) -> list:
    from rmflow.infra.mlflow_client import configure_mlflow

    return sorted(configure_mlflow().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def watermark(stack: dict, project: str) -> str | None:
    from rmcore.watermark import read_watermark

    return read_watermark(stack["data"] / project)


def test_status_lists_every_service_healthy(stack):
    from rmflow.infra import stack as st

    status = st.status()
    assert set(status) == {"deployments", "receiver", "prefect", "mlflow", "labelstudio"}
    assert all(s["healthy"] and s["pid"] and s["url"].startswith("http://127.0.0.1:") for s in status.values()), status
    assert {d["name"] for d in httpx.post(f"{stack['api']}/deployments/filter", json={}).json()} >= {
        "reward-pipeline", "label-sensor", "request-reannotation"}


def test_receiver_rejects_a_wrong_secret_and_bad_bodies(stack):
    url = stack["services"]["receiver"]["url"] + "/labelstudio"
    assert httpx.post(url, json={"action": "ANNOTATION_CREATED"}).status_code == 401
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    from rmflow.infra.receiver import webhook_secret

    ok = {"Authorization": f"Bearer {webhook_secret()}"}
    assert httpx.post(url, content=b"not json", headers=ok).status_code == 400
    ignored = httpx.post(url, json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, headers=ok)
    assert ignored.status_code == 200 and ignored.json()["events"] == 0


def test_labels_trigger_exactly_one_run_and_a_second_batch_a_gated_retrain(stack):
    """Event path: N annotations → webhooks → receiver → Prefect events → the deployment trigger →
    one reward-pipeline run; a second batch → a second run, gated against the first champion."""
    api, project = stack["api"], "svc-events"
    since = datetime.now(timezone.utc)
    labelled = label(project, N, seed=1)
    first = wait_for_runs(api, since, project)[0]
    done = wait_until_done(api, first["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    record_latency("event", (datetime.fromisoformat(done["start_time"]) - labelled).total_seconds())
    assert [r["id"] for r in flow_runs(api, "reward-pipeline/reward-pipeline", since, project)] == [first["id"]]
    versions = model_versions(f"{project}-reward")
    assert len(versions) == 1 and versions[0].tags["validation_status"] == "passed"
    assert "vs_champion" not in gate_checks(api, first["id"])

    since2 = datetime.now(timezone.utc)
    label(project, N, seed=2)
    second = wait_for_runs(api, since2, project)[0]
    assert wait_until_done(api, second["id"])["state_type"] == "COMPLETED"
    assert len(flow_runs(api, "reward-pipeline/reward-pipeline", since, project)) == 2
    assert "vs_champion" in gate_checks(api, second["id"])  # evaluated against version 1
    assert len(model_versions(f"{project}-reward")) == 2


def test_a_run_created_as_the_ui_does_trains_with_its_overrides(stack):
    """POST /deployments/{id}/create_flow_run with edited parameters, as the UI's run form sends."""
    api, project = stack["api"], "svc-events"
    if not model_versions(f"{project}-reward"):
        label(project, N, seed=3)  # on its own, this test needs labels (their trigger's run is cancelled or skips)
    dep = deployment(api, "reward-pipeline/reward-pipeline")
    params = {**stack["params"], "run": {**stack["params"]["run"], "loss": {"name": "margin"}}}
    run = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": {"params": params}}).raise_for_status().json()
    done = wait_until_done(api, run["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    from rmflow.infra.mlflow_client import configure_mlflow

    newest = model_versions(f"{project}-reward")[-1]
    assert configure_mlflow().get_run(newest.run_id).data.params["loss.name"] == "margin"


def test_label_studio_down_when_the_trigger_fires_fails_named_and_the_next_trigger_recovers(stack):
    from rmflow.infra import labelstudio

    api, project = stack["api"], "svc-events"
    before = watermark(stack, project)
    since = datetime.now(timezone.utc)
    label(project, N, seed=4)
    labelstudio.down()  # the events are in; the run will find Label Studio gone
    try:
        run = wait_for_runs(api, since, project)[0]
        done = wait_until_done(api, run["id"])
    finally:
        labelstudio.up(port=18080)
    assert done["state_type"] == "FAILED"
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    assert any("Label Studio" in entry["message"] and ("unreachable" in entry["message"] or "not running" in entry["message"])
               for entry in logs), [entry["message"][-200:] for entry in logs][-5:]
    assert watermark(stack, project) == before

    # the next start (here from the UI's REST call) collects the labels the failed run could not
    dep = deployment(api, "reward-pipeline/reward-pipeline")
    retry = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}).raise_for_status().json()
    assert wait_until_done(api, retry["id"])["state_type"] == "COMPLETED"
    from rmcore.watermark import is_after

    assert is_after(watermark(stack, project), before)


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
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = find(driver)
        if found:
            return found
        time.sleep(0.5)
    return None


def test_the_prefect_ui_run_form_offers_the_five_losses(stack):
    from selenium.webdriver.common.by import By

    from rmcore.config import LossName

    dep = deployment(stack["api"], "reward-pipeline/reward-pipeline")
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
        items = _wait_for(driver, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".htx-ranker-item") if e.text])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "labelstudio-ranking-task.png"))
        assert items and len(items) == 4
        shown = "\n".join(e.text for e in items)  # what a person sees: hidden elements have no text
        assert all(response in shown for response in item.responses)
        assert not any(f"r{i}" in shown.split() for i in range(4)), shown
        assert "Rank the 4 responses, best first" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_polling_sensor_starts_one_run_and_every_sensor_run_completes(stack):
    """Polling path (a Label Studio that cannot reach the receiver): the label-sensor deployment on
    a 10 s schedule for a project without a webhook."""
    from rmflow.infra import stack as st

    api, project = stack["api"], "svc-polling"
    params = pipeline_params(project, stack["tiny_bert"], stack["data"])
    st.up(True, serve={"params": params, "min_new_labels": N, "interval_s": 10, "window_s": WINDOW_S, "webhook": False})
    since = datetime.now(timezone.utc)
    labelled = label(project, N, seed=6)
    run = wait_for_runs(api, since, project, timeout_s=90)[0]
    done = wait_until_done(api, run["id"])
    assert done["state_type"] == "COMPLETED"
    record_latency("polling (10 s interval)", (datetime.fromisoformat(done["start_time"]) - labelled).total_seconds())
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
    assert [r["id"] for r in flow_runs(api, "reward-pipeline/reward-pipeline", since, project)] == [run["id"]]
