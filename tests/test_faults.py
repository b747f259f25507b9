"""Fault injection against the real services: each fault is a real process killed, blocked or
starved (no mocks). For every fault: the run ends with an error that names it, no label is lost,
no version is left registered but ungated once the rerun is done, the watermark does not move,
and a rerun after the fault clears finishes the job. bench/RESULTS.md tabulates what each shows."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.services]
# the pipeline in a process of its own (argv[1]: PipelineParams as JSON); its result on the last line
RUN_PIPELINE = ("import json, sys; from rmflow.flows.pipeline import PipelineParams, reward_pipeline; "
                "print(json.dumps(reward_pipeline(PipelineParams.model_validate_json(sys.argv[1])), default=str))")


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def params_for(tiny_bert, tmp_path):
    from rmflow.flows.pipeline import PipelineParams

    def make(project: str, **update) -> PipelineParams:
        return PipelineParams(
            project=project, model_name=f"{project}-reward", data_root=str(tmp_path / "data" / project),
            run={"model": {"backbone": str(tiny_bert), "max_length": 96}, "optim": {"lr": 3e-3, "epochs": 2}},
            gate={"min_accuracy": 0.5, "max_ece": 0.6, "max_length_bias": 0.99, "delta": 0.5, "bootstrap": 200}, **update)

    return make


def label(project: str, n: int, seed: int, annotated: int | None = None) -> None:
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio_api as lst

    ls = lst.connect()
    project_id = lst.ensure_project(ls, project)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(n, 4, seed=seed)]
    lst.import_tasks(ls, project_id, items)
    ids = None if annotated is None else [t.id for t in ls.tasks.list(project=project_id)][:annotated]
    lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=seed, task_ids=ids)


def watermark(params) -> str | None:
    from rmcore.watermark import read_watermark
    from rmflow.flows.pipeline import data_root

    return read_watermark(data_root(params)).at


def registry_statuses(name: str) -> dict[str, str]:
    from rmflow.infra.mlflow_client import configure_mlflow, model_versions

    return {str(v.version): v.tags.get("validation_status") for v in model_versions(configure_mlflow(), name)}


def failure(state) -> str:
    with pytest.raises(BaseException) as info:
        state.result()
    return f"{type(info.value).__name__}: {info.value}"


class MlflowServer:
    """A real `mlflow server` over a SQLite store; the pipeline talks to it over HTTP."""

    def __init__(self, home: Path) -> None:
        from rmflow.infra.process import ManagedService, free_port

        self.home, self.svc = home, ManagedService("mlflow", home)
        self.port = free_port(5057)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from rmflow.infra.process import wait_healthy
        from rmflow.infra.stack import _bin

        cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}", "--default-artifact-root",
               (self.home / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        proc = self.svc.spawn(cmd, {}, marker="mlflow")
        wait_healthy(f"{self.url}/health", 180, alive=lambda: proc.poll() is None)

    def kill(self) -> None:
        pid = self.svc.state()["pid"]
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails fast; the stage retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    yield server
    if server.svc.state():
        server.svc.stop()


def test_mlflow_killed_during_promotion_leaves_a_pending_version_the_rerun_gates(
        label_studio, prefect_harness, mlflow_server, params_for):
    from mlflow import MlflowClient

    from rmflow.flows.pipeline import reward_pipeline

    params = params_for("fault-mlflow")
    label(params.project, 60, seed=41)
    client = MlflowClient(mlflow_server.url, mlflow_server.url)

    def kill_once_registered() -> None:
        end = time.time() + 600
        while time.time() < end:
            try:
                if client.search_registered_models(filter_string=f"name='{params.model_name}'") and \
                        client.search_model_versions(f"name='{params.model_name}'"):
                    break
            except Exception:  # noqa: BLE001 — not up yet / mid-request
                pass
            time.sleep(0.2)
        mlflow_server.kill()

    killer = threading.Thread(target=kill_once_registered, daemon=True)
    killer.start()
    state = reward_pipeline(params, return_state=True)
    killer.join(60)
    assert state.is_failed()
    assert f"127.0.0.1:{mlflow_server.port}" in failure(state)  # the error names the MLflow server
    assert watermark(params) is None

    mlflow_server.start()  # the same store: what was registered before the kill is there
    assert registry_statuses(params.model_name) == {"1": "pending"}
    rerun = reward_pipeline(params)
    assert not rerun["skipped"] and rerun["version"] == "1" and "model_dir" not in rerun  # gated, not retrained
    assert registry_statuses(params.model_name) == {"1": "passed" if rerun["passed"] else "failed"}
    assert rerun["total_rankings"] == 60 and watermark(params) == rerun["watermark"]


def test_label_studio_killed_during_collection_loses_no_label(label_studio, prefect_harness, params_for):
    """The project is large (1,500 tasks, paged), so the pull is under way when Label Studio dies."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    from rmflow.flows.pipeline import data_root, reward_pipeline
    from rmflow.infra import labelstudio as local

    params = params_for("fault-ls")
    label(params.project, 1500, seed=43, annotated=40)
    port = int(local.status()["url"].rsplit(":", 1)[1])
    killed = threading.Event()

    def kill_when_collecting() -> None:
        flt = TaskRunFilter(name=TaskRunFilterName(like_="collect-"),
                            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])))
        with get_client(sync_client=True) as prefect:
            end = time.time() + 300
            while time.time() < end and not prefect.read_task_runs(task_run_filter=flt):
                time.sleep(0.05)
        os.killpg(local.service().state()["pid"], signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_when_collecting, daemon=True)
    killer.start()
    state = reward_pipeline(params, return_state=True)
    killer.join(60)
    assert killed.is_set() and state.is_failed()
    assert "Label Studio" in failure(state)
    assert watermark(params) is None and not list(data_root(params).glob("[0-9a-f]*"))  # no dataset version

    assert local.up(port=port)["url"].endswith(f":{port}")  # same port, same data dir: every annotation is still there
    rerun = reward_pipeline(params)
    assert rerun["total_rankings"] == 40 and rerun["new_rankings"] == 40 and rerun["passed"] in (True, False)
    assert set(registry_statuses(params.model_name).values()) <= {"passed", "failed"}
    assert watermark(params) == rerun["watermark"]


def test_disk_full_while_the_dataset_is_written(label_studio, prefect_harness, params_for, tmp_path):
    from rmflow.flows.pipeline import reward_pipeline
    from rmflow.tasks.collect import pull_snapshot
    from rmflow.tasks.dataset import build_dataset

    params = params_for("fault-disk")
    label(params.project, 40, seed=45)
    # how much room a snapshot and a dataset version of these labels take
    probe = tmp_path / "probe"
    build_dataset(pull_snapshot(params.project, probe), probe, None)
    snapshot_bytes = sum(f.stat().st_size for f in (probe / "snapshots").iterdir())
    total_bytes = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    disk = tmp_path / "small-disk"
    disk.mkdir()
    size_kib = 64 * 1024  # room for the model too, once the filler is gone
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        # room for the snapshot and a third of the dataset: the dataset write runs out of space
        filler.write_bytes(b"\0" * max(0, free - snapshot_bytes - (total_bytes - snapshot_bytes) // 3 - 8192))
        full = params.model_copy(update={"data_root": str(disk / "data")})
        state = reward_pipeline(full, return_state=True)
        assert state.is_failed() and "No space left on device" in failure(state)
        leftovers = [p.name for p in (disk / "data").iterdir()] if (disk / "data").exists() else []
        assert set(leftovers) <= {"snapshots"}, leftovers  # no half-written version, no staging folder
        assert watermark(full) is None

        filler.unlink()  # the disk has room again
        rerun = reward_pipeline(full)
        assert rerun["total_rankings"] == 40 and watermark(full) == rerun["watermark"]
        assert set(registry_statuses(full.model_name).values()) <= {"passed", "failed"}
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_model_folder_deleted_between_training_and_registration(label_studio, params_for, prefect_harness):
    from rmcore.records import content_hash
    from rmflow.flows.pipeline import data_root, reward_pipeline
    from rmflow.tasks.collect import pull_snapshot
    from rmflow.tasks.dataset import build_dataset
    from rmflow.tasks.register import register_model
    from rmflow.tasks.train import train_model

    params = params_for("fault-model-dir")
    label(params.project, 40, seed=47)
    root = data_root(params)
    labels = build_dataset(pull_snapshot(params.project, root), root, None)
    trained = train_model(params.run, labels.dataset)
    shutil.rmtree(trained.model_dir)  # someone cleans up the folder before registration runs
    with pytest.raises(FileNotFoundError, match="model folder .* is missing"):
        register_model(params.model_name, trained.model_dir, trained, labels.watermark.at, content_hash(params.run.model_dump(mode="json")))
    assert registry_statuses(params.model_name) == {} and watermark(params) is None

    rerun = reward_pipeline(params)  # nothing was registered, so the rerun trains again
    assert not rerun["skipped"] and rerun["version"] == "1" and Path(rerun["model_dir"]).is_dir()
    assert registry_statuses(params.model_name) == {"1": "passed" if rerun["passed"] else "failed"}


def test_two_pipeline_runs_on_the_same_labels_at_once(label_studio, prefect_harness, params_for):
    """Two processes start the pipeline on the same labels at the same moment: both finish, the
    labels are trained on once (the runs take turns on a Prefect concurrency slot per model), and
    the one registered version is gated."""
    from prefect.settings import PREFECT_API_URL

    params = params_for("fault-twice")
    label(params.project, 40, seed=49)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = [subprocess.Popen([sys.executable, "-c", RUN_PIPELINE, params.model_dump_json()], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # they took turns on the pipeline's concurrency slot: the second found the labels trained and gated
    assert sorted(r["skipped"] for r in results) == [False, True], results
    # the watermark is where a pull started; the second run pulled last, so its watermark stands
    second = next(r for r in results if r["skipped"])
    assert {r["total_rankings"] for r in results} == {40} and watermark(params) == second["watermark"], results
    statuses = registry_statuses(params.model_name)
    assert len(statuses) == 1 and set(statuses.values()) <= {"passed", "failed"}, statuses
    again = reward_pipeline_in_process(params)
    assert again["skipped"]  # the labels are done: a third run trains nothing


def reward_pipeline_in_process(params):
    from rmflow.flows.pipeline import reward_pipeline

    return reward_pipeline(params)


def test_malformed_annotations_through_the_real_api_are_quarantined_and_the_pipeline_completes(
        label_studio, prefect_harness, params_for):
    """Annotations a buggy client or a hand-edited config could submit, pushed through Label
    Studio's own API. Every good one reaches the dataset, every bad one that Label Studio stores
    is quarantined with its reason, and the pipeline completes."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from rmcore.dataset import read_manifest
    from rmcore.synthetic import synthetic_items
    from rmflow.flows.pipeline import reward_pipeline
    from rmflow.infra import labelstudio as local
    from rmflow.infra import labelstudio_api as lst
    from rmflow.infra.labelstudio_api import LabelStudioError
    from rmflow.tasks.collect import pull_snapshot

    params = params_for("fuzz")
    ls = lst.connect()
    project_id = lst.ensure_project(ls, params.project)

    def ranker(order, name="rank", kind="ranker", to="items"):
        return [{"from_name": name, "to_name": to, "type": kind, "value": {"ranker": {name: order}}}]

    bad_cases = {  # result → the quarantine reason it must get
        "unknown ids": (ranker(["r0", "r1", "zz", "r3"]), "unknown completion ids"),
        "wrong from_name": (ranker(["r0", "r1", "r2", "r3"], name="other"), "is not a control"),
        "duplicate ids": (ranker(["r0", "r0", "r1", "r2"]), "lists a completion twice"),
        "empty ranking": (ranker([]), "fewer than 2"),
        "one item": (ranker(["r2"]), "fewer than 2"),
        "ids not a list": ([{"from_name": "rank", "to_name": "items", "type": "ranker", "value": {"ranker": {"rank": "r0"}}}],
                           "must be a list"),
        "no value.ranker": ([{"from_name": "rank", "to_name": "items", "type": "ranker", "value": {}}], "no value.ranker"),
        "empty result": ([], "no ranker, pairwise or choices result"),
        "unknown type": ([{"from_name": "rank", "to_name": "items", "type": "rectanglelabels", "value": {}}],
                         "no ranker, pairwise or choices result"),
        "int ids": (ranker([0, 1, 2, 3]), "unknown completion ids"),
        "choices without choice": ([{"from_name": "rank", "to_name": "items", "type": "choices", "value": {"choices": []}}],
                                   "no pair of response fields"),  # a choices result on a ranking task
    }
    items = [{"prompt": i.prompt, "responses": i.responses} for i in synthetic_items(len(bad_cases) + 40, 4, seed=51)]
    items[0]["responses"][1] = "A very long answer. " * 15000  # 300 kB: a huge text is still a good record
    items[1]["prompt"] = "Ünïcödé prompt — 日本語 — emoji 🙂"
    lst.import_tasks(ls, project_id, items)
    tasks = sorted(ls.tasks.list(project=project_id, fields="all"), key=lambda t: t.id)
    good_tasks, bad_tasks = tasks[:40], tasks[40:]
    for task in good_tasks:
        ls.annotations.create(id=task.id, result=ranker([it["id"] for it in task.data["items"]]))
    accepted, refused = {}, []
    token = os.environ.get("LABEL_STUDIO_API_KEY") or local.credentials()["token"]
    for (case, (result, reason)), task in zip(bad_cases.items(), bad_tasks):
        try:
            ls.annotations.create(id=task.id, result=result)
            accepted[case] = reason
        except (ApiError, ValueError, UnicodeError) as e:  # Label Studio (or its client) refused it: never stored
            refused.append((case, f"{type(e).__name__} {e}"[:80]))
    print(f"fuzz: {len(bad_cases)} malformed cases tried, {len(accepted)} stored by Label Studio, {len(refused)} refused: {refused}")

    result = reward_pipeline(params)
    assert result["total_rankings"] == len(good_tasks) and result["quarantined"] == len(accepted)
    data = Path(params.data_root) / result["dataset_version"]
    quarantined = [json.loads(line) for line in (data / "quarantine.jsonl").read_text().splitlines()]
    by_task = {q["locator"].split()[1]: q["reason"] for q in quarantined}
    for case, task in zip(bad_cases, bad_tasks):
        if case in accepted:
            assert accepted[case] in by_task[str(task.id)], (case, by_task.get(str(task.id)))
    assert read_manifest(data)["groups"] == len(good_tasks)
    assert result["passed"] in (True, False) and set(registry_statuses(params.model_name).values()) <= {"passed", "failed"}

    # Lone surrogates: the SDK cannot even encode them; sent as JSON escapes they reach Label Studio,
    # whose own task API then answers 500 for the whole project. Collection says so, names it, and
    # writes nothing (in their own project, so the one above stays collectable).
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    other = lst.ensure_project(ls, "fuzz-surrogates")
    raw = {"prompt": "Which response is better?", "items": [{"id": "r0", "title": "Response 1", "body": "broken \ud800 text"},
                                                           {"id": "r1", "title": "Response 2", "body": "fine"}]}
    imported = httpx.post(f"{lst.endpoint()}/api/projects/{other}/import", content=json.dumps([{"data": raw}]).encode(),
                          headers=headers, timeout=30)
    outcome = f"import HTTP {imported.status_code}"
    if imported.status_code < 300:
        with pytest.raises(LabelStudioError, match="HTTP 5\\d\\d") as info:
            pull_snapshot("fuzz-surrogates", Path(params.data_root) / "surrogates")
        outcome += f"; collect: {info.value}"
        assert not (Path(params.data_root) / "surrogates" / "snapshots").exists()
    print(f"fuzz: lone surrogate in a response text: {outcome}")


class PrefectServer:
    """A real `prefect server start` (SQLite under its own PREFECT_HOME) that can be killed and
    started again on the same port and database."""

    def __init__(self, home: Path) -> None:
        from rmflow.infra.process import ManagedService, free_port

        self.home, self.svc = home, ManagedService("prefect", home)
        self.port = free_port(4257)
        self.api = f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        from rmflow.infra.process import wait_healthy
        from rmflow.infra.stack import _bin, prefect_env

        env = {**prefect_env(), "PREFECT_HOME": str(self.home), "PREFECT_UI_API_URL": self.api}
        proc = self.svc.spawn([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], env, marker="prefect")
        wait_healthy(f"{self.api}/health", 240, alive=lambda: proc.poll() is None)

    def kill(self) -> None:
        pid = self.svc.state()["pid"]
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_prefect_server_restarted_during_a_pipeline_run(label_studio, params_for, tmp_path):
    """The server dies while the pipeline trains and comes back on the same database. The run
    either rides it out (Prefect's client retries) or fails naming the API; either way the
    watermark moves only with a completed run and a rerun leaves everything gated."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    params = params_for("fault-prefect")
    label(params.project, 40, seed=53)
    server = PrefectServer(tmp_path / "prefect")
    server.start()
    try:
        env = {**os.environ, "PREFECT_API_URL": server.api}
        proc = subprocess.Popen([sys.executable, "-c", RUN_PIPELINE, params.model_dump_json()], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.api}), get_client(sync_client=True) as client:
            end = time.time() + 600
            while time.time() < end and proc.poll() is None and not client.read_task_runs(
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-"))):
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        server.kill()
        time.sleep(2)
        server.start()
        out, err = proc.communicate(timeout=900)
        if proc.returncode == 0:
            first = json.loads(out.strip().splitlines()[-1])
            assert watermark(params) == first["watermark"]
        else:
            assert f"127.0.0.1:{server.port}" in err or "PrefectHTTPStatusError" in err or "ConnectError" in err, err[-3000:]
            assert watermark(params) is None
        rerun = subprocess.run([sys.executable, "-c", RUN_PIPELINE, params.model_dump_json()], env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        final = json.loads(rerun.stdout.strip().splitlines()[-1])
        assert final["total_rankings"] == 40 and watermark(params) == final["watermark"]
        assert set(registry_statuses(params.model_name).values()) <= {"passed", "failed"}
        print(f"prefect restart: first run {'completed' if proc.returncode == 0 else 'failed'}; rerun skipped={final['skipped']}")
    finally:
        if server.svc.state():
            server.svc.stop()
