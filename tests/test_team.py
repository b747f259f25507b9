"""The team backends against real servers: Debian's PostgreSQL and SeaweedFS's S3 (`weed server -s3`),
started once for the module by `rmflow up --team` (as a user would, through the CLI), with the
Prefect and MLflow servers on them. Faults are injected by killing or restarting the real process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from rmflow.infra import objectstore, postgres, stack, team
from rmflow.infra.process import ServiceError

pytestmark = [pytest.mark.services, pytest.mark.slow]

RMFLOW = [sys.executable, "-m", "rmflow"]
NAME = "team-reward"
# what a process that must NOT have bucket access lacks
BUCKET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "RMFLOW_STORAGE_URL",
               "RMFLOW_DATABASE_URL", "MLFLOW_TRACKING_URI")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([*RMFLOW, *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in (env or os.environ).items()})
    lines = proc.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}), proc


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in BUCKET_VARS}, **extra}


@pytest.fixture(scope="module")
def team_home(tmp_path_factory):
    """One `rmflow up --team` (no Label Studio, no deployments) for the module; `down` afterwards."""
    home = tmp_path_factory.mktemp("team_home")
    mp = pytest.MonkeyPatch()
    for var in BUCKET_VARS:
        mp.delenv(var, raising=False)
    mp.setenv("RMFLOW_HOME", str(home))
    result, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=clean_env(RMFLOW_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield home, result
    cli("down", env=clean_env(RMFLOW_HOME=str(home)))
    mp.undo()


@pytest.fixture
def home(team_home, monkeypatch) -> Path:
    """Every test runs in the team stack's RMFLOW_HOME (the autouse fixture gives each test another)."""
    monkeypatch.setenv("RMFLOW_HOME", str(team_home[0]))
    for var in BUCKET_VARS:
        monkeypatch.delenv(var, raising=False)
    # a test that failed with a backend killed leaves it down: the next one starts from a running stack
    if objectstore.service().state() is None or postgres.service().state() is None:
        _, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=clean_env(RMFLOW_HOME=str(team_home[0])))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return team_home[0]


def test_up_team_starts_postgres_and_objectstore_and_services_use_them(team_home, home):
    result = team_home[1]
    assert result["postgres"]["started"] and result["postgres"]["url"].startswith("postgresql://127.0.0.1:")
    assert result["objectstore"]["started"] and result["objectstore"]["bucket"] == "rmflow"
    status, proc = cli("status", env=clean_env(RMFLOW_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    for name in ("postgres", "objectstore", "prefect", "mlflow"):
        assert status[name]["healthy"], (name, status[name])
    assert status["postgres"]["url"] == result["postgres"]["url"]
    assert status["objectstore"]["url"] == result["objectstore"]["url"] and status["objectstore"]["bucket"] == "rmflow"
    # the servers really keep their data in PostgreSQL: their schemas are in their own databases
    db = postgres.database()
    for dbname, table in (("prefect", "flow_run"), ("mlflow", "registered_models")):
        conn = db.connect(dbname)
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (table,))
            assert cur.fetchone()[0] == table, f"{table} missing in database {dbname}"
        conn.close()
    assert not (home / "prefect" / "prefect.db").exists() and not (home / "mlflow.db").exists()
    # the PostgreSQL server runs as an unprivileged user, with its password nowhere on a command line
    server = psutil.Process(status["postgres"]["pid"])
    assert server.uids().real != 0
    password = postgres.password()
    for proc_ in psutil.process_iter(["cmdline"]):
        assert password not in " ".join(proc_.info["cmdline"] or []), proc_.info["cmdline"]
    assert objectstore.secret_key() not in " ".join(psutil.Process(status["objectstore"]["pid"]).cmdline())
    assert (home / "postgres" / "password").stat().st_mode & 0o077 == 0
    assert (home / "objectstore" / "s3.json").stat().st_mode & 0o077 == 0


def test_pointed_at_existing_backends_starts_nothing(team_home, home, tmp_path, monkeypatch):
    db = postgres.database()
    store = objectstore.storage(objectstore.service().state()["port"])
    other = tmp_path / "other_home"
    monkeypatch.setenv("RMFLOW_HOME", str(other))
    monkeypatch.setenv("RMFLOW_DATABASE_URL", db.service_url("postgres").rsplit("/", 1)[0])
    monkeypatch.setenv("RMFLOW_STORAGE_URL", "s3://team-other/prefix")
    for var, value in store.env().items():
        monkeypatch.setenv(var, value)
    got_db, got_store, rows = stack.resolve_team_backends(start_local=True)
    assert (got_db.host, got_db.port, got_store.bucket, got_store.prefix) == (db.host, db.port, "team-other", "prefix")
    assert rows["postgres"]["started"] is False and rows["objectstore"]["started"] is False
    assert not (other / "postgres").exists() and not (other / "objectstore").exists()
    assert "team-other" in {b["Name"] for b in store.client().list_buckets()["Buckets"]}  # created, as documented
    status = stack.status()
    assert status["postgres"]["healthy"] and status["postgres"]["configured"] and status["postgres"]["pid"] is None
    assert status["objectstore"]["bucket"] == "team-other" and status["objectstore"]["healthy"]


def test_wrong_credentials_name_the_endpoint_and_variable_never_the_secret(team_home, home, tmp_path):
    db = postgres.database()
    store = objectstore.storage(objectstore.service().state()["port"])
    bad_db, bad_secret = "pg-wrong-" + "x" * 12, "s3-wrong-" + "y" * 12
    env = clean_env(RMFLOW_HOME=str(tmp_path / "h1"), RMFLOW_DATABASE_URL=f"postgresql://rmflow:{bad_db}@{db.host}:{db.port}",
                    RMFLOW_STORAGE_URL="s3://rmflow", **store.env())
    _, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"postgresql://{db.host}:{db.port}" in out and "RMFLOW_DATABASE_URL" in out, out[-2000:]
    assert bad_db not in out
    env.update(RMFLOW_DATABASE_URL=db.service_url("postgres").rsplit("/", 1)[0], AWS_SECRET_ACCESS_KEY=bad_secret,
               RMFLOW_HOME=str(tmp_path / "h2"))
    _, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and store.endpoint_url in out and "AWS_SECRET_ACCESS_KEY" in out, out[-2000:]
    assert bad_secret not in out and db.password not in out
    assert not (tmp_path / "h1" / "prefect").exists() and not (tmp_path / "h2" / "prefect").exists()  # nothing started


def test_model_pulled_through_the_server_by_a_client_without_bucket_credentials(team_home, home, tiny_bert, synthetic_dataset,
                                                                               tmp_path):
    from mlflow import MlflowClient

    from rmcore.config import RunConfig
    from rmcore.paths import mlflow_tracking_uri
    from rmcore.scoring import RewardScorer
    from rmcore.train import train_reward_model
    from rmflow.tasks.register import register_model

    server = team_home[1]["mlflow"]["url"]
    assert mlflow_tracking_uri() == server  # clients find the team MLflow without MLFLOW_TRACKING_URI
    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"epochs": 1, "seed": 0}})
    train_reward_model(cfg, synthetic_dataset, tmp_path / "model")
    version = register_model(NAME, tmp_path / "model")
    MlflowClient(server).set_registered_model_alias(NAME, "champion", version.version)
    # the model's files are in the bucket, under the prefix the server writes to
    store = objectstore.storage(objectstore.service().state()["port"])
    keys = [o["Key"] for o in store.client().list_objects_v2(Bucket="rmflow", Prefix="mlflow-artifacts/").get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    # a consumer with the tracking URI only: no AWS_* or endpoint variable, another RMFLOW_HOME
    prompt, response = "How do I brew green tea?", "Steep it at 80 degrees for three minutes."
    result, proc = cli("score", "--model", f"models:/{NAME}@champion", "--prompt", prompt, "--response", response,
                       env=clean_env(MLFLOW_TRACKING_URI=server, RMFLOW_HOME=str(tmp_path / "consumer")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = RewardScorer(tmp_path / "model").score([prompt], [response]).tolist()
    assert result["rewards"] == pytest.approx(expected, abs=1e-5)


def test_objectstore_killed_mid_write_names_the_store_and_a_rerun_completes(team_home, home, tmp_path):
    store = objectstore.storage(objectstore.service().state()["port"])
    src = tmp_path / "ckpt"
    src.mkdir()
    for i in range(200):
        (src / f"shard-{i:03d}.bin").write_bytes(os.urandom(64 * 1024))
    pid = objectstore.service().state()["pid"]
    failure: list[BaseException] = []

    def write() -> None:
        try:
            store.upload_dir(src, "faults", "ckpt")
        except BaseException as e:  # noqa: BLE001 — collected for the assertion
            failure.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    # kill once the copy is under way (some objects written), not before it started
    client = store.client()
    while not client.list_objects_v2(Bucket="rmflow", Prefix="faults/ckpt/").get("KeyCount") and writer.is_alive():
        pass
    os.killpg(pid, signal.SIGKILL)
    writer.join(120)
    assert not writer.is_alive()
    assert failure and isinstance(failure[0], ServiceError), failure
    message = str(failure[0])
    assert store.endpoint_url in message and "object store" in message and store.secret_access_key not in message
    # the store comes back (same data, same credentials); running the copy again completes it
    result, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=clean_env(RMFLOW_HOME=str(home)))
    assert proc.returncode == 0 and result["objectstore"]["started"], proc.stderr[-2000:]
    store = objectstore.storage(objectstore.service().state()["port"])
    store.upload_dir(src, "faults", "ckpt")
    back = store.download_dir("faults", "ckpt", dest=tmp_path / "back")
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
    assert all((back / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())


def test_postgres_restart_is_ridden_out_by_mlflow_and_prefect(team_home, home):
    from mlflow import MlflowClient

    from rmflow.infra.stack import prefect_api_url, using_prefect

    server = team_home[1]["mlflow"]["url"]
    client = MlflowClient(server)
    before = {m.name for m in client.search_registered_models()}
    postgres.down()
    db, row = postgres.up()
    assert row["started"]
    # the servers' pooled connections died with the old server; their next calls reconnect
    client.create_registered_model("after-restart")
    assert {m.name for m in client.search_registered_models()} == before | {"after-restart"}
    from prefect.client.orchestration import get_client

    with using_prefect(prefect_api_url()), get_client(sync_client=True) as prefect:
        assert prefect.read_flow_runs(limit=1) is not None


def _publish(store: team.Storage, src: Path, uri: str) -> str:
    """`team.publish_dataset` with the store's credentials in this process's environment only while it runs."""
    os.environ.update(store.env())
    try:
        return team.publish_dataset(src, uri)
    finally:
        for var in store.env():
            os.environ.pop(var, None)


def test_two_node_cluster_without_shared_disk_trains_from_the_bucket_and_resumes_a_killed_worker(team_home, home, tiny_bert,
                                                                                              synthetic_dataset, tmp_path):
    """A head and a second `ray start` node, each with its own working directory, TMPDIR, Ray temp
    dir and RMFLOW_HOME, the bucket's credentials in each node's environment (never argv). The
    dataset exists only in the bucket (the local copy it was published from deleted first);
    `rmflow train --workers 2 --placement-strategy STRICT_SPREAD` joins the cluster and runs one
    worker on each node, each copying the dataset into its own node's temp folder; the worker on the
    second node is SIGKILLed once the controller registered a checkpoint in the bucket, and the run
    resumes from that checkpoint, again on both nodes."""
    import shutil
    import uuid

    from rmflow.bench.faults import ray_train_workers
    from tests.test_ray_cluster import Cluster, _clean_env

    store = objectstore.storage(objectstore.service().state()["port"])
    local = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, local)
    uri = _publish(store, local, "s3://rmflow/datasets/synthetic/v1")
    shutil.rmtree(local)
    client = store.client()
    runs = f"ray/{uuid.uuid4().hex[:8]}"  # this test's runs only: another run's snapshot never triggers the kill
    seen: dict[str, object] = {}

    def registered_checkpoints() -> int:
        """Checkpoints the controller registered (its snapshot in the bucket lists them): an object
        written alone may not be registered yet, and a kill before that restarts from scratch."""
        for obj in client.list_objects_v2(Bucket="rmflow", Prefix=runs + "/").get("Contents", []):
            if obj["Key"].endswith("checkpoint_manager_snapshot.json"):
                try:
                    return len(json.loads(client.get_object(Bucket="rmflow", Key=obj["Key"])["Body"].read())["checkpoint_results"])
                except Exception:  # noqa: BLE001 — caught mid-write
                    return 0
        return 0

    def kill_second_nodes_worker_after_first_checkpoint(cluster: Cluster) -> None:
        head, second = cluster.nodes
        for _ in range(1500):
            if registered_checkpoints():
                on_head, on_second = ray_train_workers(head.pid), ray_train_workers(second.pid)
                if len(on_head) == 1 and len(on_second) == 1:
                    victim = on_second[0]
                    seen.update(cwd=victim.cwd(), tmpdir=victim.environ().get("TMPDIR"), has_key="AWS_SECRET_ACCESS_KEY" in victim.environ(),
                                copies={name: sorted(str(p) for p in (d / "tmp").glob("rmflow-data-*/data/manifest.json"))
                                        for name, d in cluster.nodes_dir.items()})
                    os.kill(victim.pid, signal.SIGKILL)
                    seen["killed"] = victim.pid
                    return
                seen["placement"] = (len(on_head), len(on_second))
            threading.Event().wait(0.2)

    cluster = Cluster(env=store.env(), num_cpus=2)  # room for both workers on either node: only the strategy spreads them
    try:
        cluster.start()
        # the bucket's secret reaches the nodes through their environment, never a command line
        for node in cluster.nodes:
            for proc_ in psutil.Process(node.pid).children(recursive=True):
                assert store.secret_access_key not in " ".join(proc_.cmdline())
        watcher = threading.Thread(target=kill_second_nodes_worker_after_first_checkpoint, args=(cluster,), daemon=True)
        watcher.start()
        # the driver: the cluster's address and token (in HOME/.ray), and the bucket's credentials of its own
        driver_env = _clean_env(cluster.home, RAY_ADDRESS=cluster.address, RMFLOW_HOME=str(home), **store.env())
        summary, proc = cli("train", "--data", uri, "--backbone", str(tiny_bert), "--max-length", "64", "--lr", "3e-3",
                            "--epochs", "2", "--workers", "2", "--placement-strategy", "STRICT_SPREAD",
                            "--storage-path", f"s3://rmflow/{runs}", "--checkpoint-every", "2", "--max-failures", "2",
                            "--out", str(tmp_path / "model"), env=driver_env, timeout=600)
        watcher.join(5)
        assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    finally:
        cluster.stop()
    assert summary["ray"] == "cluster" and summary["ray_address"] == cluster.address  # joined it, started no runtime
    assert summary["ray_run"].startswith(f"s3://rmflow/{runs}/")
    assert "killed" in seen, f"no worker on the second node was killed (workers on head/second node: {seen.get('placement')})"
    second = cluster.nodes_dir["worker"]
    # the killed worker was the second node's: its working dir (Ray Train's artifacts folder under that node's
    # --temp-dir), its TMPDIR and bucket credentials from that node's environment, the dataset copied there
    assert Path(seen["cwd"]).is_relative_to(second / "t"), seen
    assert seen["tmpdir"] == str(second / "tmp") and seen["has_key"], seen
    assert len(seen["copies"]["worker"]) == 1 and len(seen["copies"]["head"]) == 1, seen["copies"]
    assert summary["workers"] == 2 and len(set(summary["worker_nodes"])) == 2  # the resumed group: again one rank per node
    assert summary["restarts"] >= 1 and summary["resumed_from_step"] >= 2
    assert (tmp_path / "model" / "rmflow_model.json").is_file() and not local.exists()
    assert store.secret_access_key not in proc.stdout + proc.stderr


def test_label_studio_keeps_its_projects_in_postgres(team_home, home, monkeypatch):
    """Label Studio on its own `labelstudio` database: a project created through its API is a row
    there, and survives a restart of Label Studio (nothing of it in a SQLite file)."""
    from rmflow.infra import labelstudio
    from rmflow.infra import labelstudio_api as lst

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    db = postgres.database()
    env = stack.labelstudio_db_env(db)
    try:
        first = labelstudio.up(port=18090, db=env)
        project_id = lst.ensure_project(lst.connect(), "team-project")
        labelstudio.down()
        again = labelstudio.up(port=18090, db=env)
        assert again["started"] and lst.ensure_project(lst.connect(), "team-project") == project_id
        assert db.password not in " ".join(psutil.Process(again["pid"]).cmdline())
    finally:
        labelstudio.down()
    conn = db.connect("labelstudio")
    with conn.cursor() as cur:
        cur.execute("SELECT title FROM project WHERE id = %s", (project_id,))
        assert cur.fetchone() == ("team-project",)
    conn.close()
    assert first["started"] and not (home / "labelstudio" / "data" / "label_studio.sqlite3").exists()


# The pipeline's tail (register → evaluate → gate + promote: its own Prefect tasks, composed as
# flows/pipeline.py composes them) as a flow of its own, in a process of its own: the team fixture
# has no Label Studio to collect from, and training is not what a database restart is about.
# argv: model name, model folder, evaluation dataset; the flow's result as JSON on the last line.
REGISTER_AND_GATE = '''
import json, sys
from prefect import flow
from rmcore.config import GateConfig
from rmflow.tasks.evaluate import evaluate_task
from rmflow.tasks.promote import promote_task
from rmflow.tasks.register import register_task


@flow(name="faults-register-and-gate")
def register_and_gate(name: str, model_dir: str, eval_data: str) -> dict:
    registered = register_task(name, model_dir)
    promoted = promote_task(evaluate_task(registered, eval_data), GateConfig(min_accuracy=0.0, bootstrap=200))
    return {"version": promoted.version, "passed": promoted.passed, "created": registered.created}


print(json.dumps(register_and_gate(*sys.argv[1:4])))
'''


def test_postgres_restarted_while_a_version_is_registered_leaves_one_gated_version(team_home, home, tiny_bert,
                                                                                   synthetic_dataset, tmp_path):
    """PostgreSQL restarted while a flow on the team Prefect registers a model in the team MLflow
    (its run being logged): the flow rides it out (the MLflow client retries the server's 5xx, the
    Prefect client its 503s) or fails naming the server; after a rerun there is exactly one version,
    gated, with its tags and its model's files."""
    import time

    import mlflow
    import requests

    from rmcore.config import RunConfig
    from rmcore.names import EXPERIMENT
    from rmcore.train import train_reward_model
    from rmflow.infra.mlflow_client import configure_mlflow
    from rmflow.infra.stack import prefect_api_url

    name = "faults-pg-reward"
    server, prefect_api = team_home[1]["mlflow"]["url"], prefect_api_url()
    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"epochs": 1, "seed": 3}})
    train_reward_model(cfg, synthetic_dataset, tmp_path / "model")
    script = tmp_path / "register_and_gate.py"
    script.write_text(REGISTER_AND_GATE)
    env = clean_env(RMFLOW_HOME=str(home), PREFECT_API_URL=prefect_api)
    argv = [sys.executable, str(script), name, str(tmp_path / "model"), str(synthetic_dataset)]
    client = configure_mlflow()  # the team server (found through RMFLOW_HOME), the experiment created
    assert client.tracking_uri == server
    experiment = client.get_experiment_by_name(EXPERIMENT)
    started_ms = int(time.time() * 1000)
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # restart once the flow's register step has opened its MLflow run (it is logging the model)
        end = time.monotonic() + 180
        while time.monotonic() < end and run.poll() is None:
            if client.search_runs([experiment.experiment_id], f"attributes.start_time >= {started_ms} "
                                    "and tags.`rmflow.kind` = 'register'"):
                break
            time.sleep(0.1)
        assert run.poll() is None, "the flow ended before its register step opened a run: nothing was restarted under it"
        gated_before = [v.tags.get("validation_status") for v in client.search_model_versions(f"name='{name}'")]
        postgres.down()
        # the outage is real from the server's side: a call through MLflow fails while the database is gone
        answer = requests.get(f"{server}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=30)
        assert answer.status_code >= 500, answer.text[:300]
        db, row = postgres.up()
        assert row["started"]
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert gated_before in ([], ["pending"]), gated_before  # the restart came before the gate
    lines = out.strip().splitlines()
    if run.returncode != 0:  # failing is allowed, if it says which server it lost
        assert server in err or prefect_api in err or "PostgreSQL" in err, err[-3000:]
    else:
        assert json.loads(lines[-1])["passed"] in (True, False)
    # the rerun gates what is registered (or finds it gated); it never registers a second version
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["created"] is False and result["version"] == "1"
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == ["1"]
    tags = versions[0].tags
    assert tags["validation_status"] == ("passed" if result["passed"] else "failed") and tags["model_sha256"] and tags["run_id"]
    # not half-registered: the version's model and its run's Hugging Face export are in the store
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert info.flavors.get("python_function"), info.flavors
    assert tags["hf_export"] != "hf_model" or client.list_artifacts(tags["run_id"], "hf_model")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from rmflow.infra.stack import using_prefect

    with using_prefect(prefect_api), get_client(sync_client=True) as prefect:
        states = [r.state_type.value for r in prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["faults-register-and-gate"])))]
    # both runs reached a final state on the team Prefect (none left RUNNING by the restart)
    assert len(states) == 2 and set(states) <= {"COMPLETED", "FAILED"} and "COMPLETED" in states, states


def test_objectstore_killed_while_ray_train_writes_a_checkpoint_names_the_store_and_the_rerun_resumes(
        team_home, home, tiny_bert, synthetic_dataset, tmp_path):
    """`rmflow train --ray` with its checkpoints in the bucket; SeaweedFS SIGKILLed once a checkpoint
    was registered there and while a later one is being written (its objects in the bucket, not in
    the controller's snapshot). The run fails naming the store's endpoint (never the secret) and the
    run to resume; once `rmflow up --team` brought the store back, the same command with the same
    --run-name resumes from the last checkpoint the snapshot registered."""
    import time
    import uuid

    store = objectstore.storage(objectstore.service().state()["port"])
    uri = _publish(store, synthetic_dataset, "s3://rmflow/datasets/faults/v1")
    run_name = f"faults-{uuid.uuid4().hex[:8]}"
    prefix = f"ray-faults/{run_name}/"
    # one worker on Ray Train, one epoch (~70 steps), a checkpoint every 8; --max-failures 0: with
    # the store gone a restarted worker group could not even fetch the dataset, so fail at once
    argv = [*RMFLOW, "train", "--data", uri, "--backbone", str(tiny_bert), "--max-length", "64", "--lr", "3e-3", "--epochs", "1",
            "--workers", "1", "--ray", "--storage-path", "s3://rmflow/ray-faults", "--checkpoint-every", "8", "--max-failures", "0",
            "--run-name", run_name, "--out", str(tmp_path / "model")]

    def snapshot(client) -> dict | None:
        try:
            return json.loads(client.get_object(Bucket="rmflow", Key=prefix + "checkpoint_manager_snapshot.json")["Body"].read())
        except client.exceptions.NoSuchKey:
            return None

    def checkpoint_dirs(client) -> set[str]:
        keys = [o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket="rmflow", Prefix=prefix + "checkpoint_").get("Contents", [])]
        return {k.split("/")[0] for k in keys if "/" in k}

    client, pid = store.client(), objectstore.service().state()["pid"]
    trainer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_env(RMFLOW_HOME=str(home), **store.env()))
    killed: dict = {}
    try:
        end = time.monotonic() + 400
        while time.monotonic() < end and trainer.poll() is None and not killed:
            try:
                written = checkpoint_dirs(client)  # listed first: a folder missing from the snapshot read after is not registered
                snap = snapshot(client)
            except Exception:  # noqa: BLE001 — the snapshot caught while it is replaced
                time.sleep(0.02)
                continue
            registered = {r["checkpoint_dir_name"] for r in (snap or {}).get("checkpoint_results", [])}
            # newer than every registered one (names are timestamps): being written, not an old one being deleted
            writing = {d for d in written - registered if registered and d > max(registered)}
            if writing:
                os.killpg(pid, signal.SIGKILL)
                killed = {"registered": registered, "writing": writing}
            time.sleep(0.02)
        out, err = trainer.communicate(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        # the store back before any assertion can fail: the module's later tests need it
        result, proc = cli("up", "--team", "--no-label-studio", "--no-deployments", env=clean_env(RMFLOW_HOME=str(home)))
    assert killed, f"never caught a checkpoint being written (rc {trainer.returncode}): {err[-2000:]}"
    assert trainer.returncode != 0, "the run finished although its store was killed"
    lines = out.strip().splitlines()
    error = json.loads(lines[-1])["error"] if lines and lines[-1].startswith("{") else err[-3000:]  # the CLI's error line, not a traceback
    assert store.endpoint_url in error and "object store" in error and f"--run-name {run_name}" in error, error
    assert store.secret_access_key not in out + err

    assert proc.returncode == 0 and result["objectstore"]["started"], proc.stderr[-2000:]
    store = objectstore.storage(objectstore.service().state()["port"])
    snap = snapshot(store.client())
    assert not killed["writing"] & {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}  # never registered
    last_good = snap["latest_checkpoint_result"]["metrics"]["step"]
    assert last_good >= 8
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=clean_env(RMFLOW_HOME=str(home), **store.env()))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["ray_run"] == f"s3://rmflow/ray-faults/{run_name}" and summary["resumed_from_step"] == last_good
    assert summary["restarts"] >= 1 and (tmp_path / "model" / "rmflow_model.json").is_file()
    assert store.secret_access_key not in rerun.stdout + rerun.stderr


def test_migrate_moves_an_embedded_install_to_the_team_backends(team_home, home, tiny_bert, synthetic_dataset, tmp_path, monkeypatch):
    """`rmflow migrate`: an embedded install (SQLite MLflow with local artifacts, dataset folders)
    into the team stack. The target already has a version of its own, so source versions 1, 2
    become 2, 3 and the champion alias must follow the mapping; the model loads from the team server
    by alias with the source's rewards; a rerun copies nothing; the source is unchanged."""
    import shutil

    from mlflow import MlflowClient

    from rmcore.config import RunConfig
    from rmcore.scoring import RewardScorer
    from rmcore.train import train_reward_model
    from rmflow.infra import migrate
    from rmflow.tasks.register import register_model

    name, server = "embedded-reward", team_home[1]["mlflow"]["url"]
    embedded = tmp_path / "embedded"
    for seed in (0, 1):
        cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"epochs": 1, "seed": seed}})
        train_reward_model(cfg, synthetic_dataset, tmp_path / f"model{seed}")
    register_model(name, tmp_path / "model0")  # the team's own version 1, registered before the move
    monkeypatch.setenv("RMFLOW_HOME", str(embedded))  # the embedded install
    source_uri = f"sqlite:///{embedded / 'mlflow.db'}"
    # its SQLite store, named outright: mlflow.set_tracking_uri (register_model above) exported the
    # team server's URL as MLFLOW_TRACKING_URI, which rmflow reads first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", source_uri)
    for seed in (0, 1):
        register_model(name, tmp_path / f"model{seed}")
    src = MlflowClient(source_uri, source_uri)
    src.set_registered_model_alias(name, "champion", "2")
    src.set_model_version_tag(name, "2", "validation_status", "passed")
    src.set_model_version_tag(name, "1", "validation_status", "failed")
    src.update_model_version(name, "2", description="promoted by the gate")
    run2 = src.get_model_version(name, "2").run_id
    src.log_param(run2, "optim.lr", "3e-3")
    for step, loss in enumerate((0.7, 0.5, 0.4)):
        src.log_metric(run2, "loss", loss, step=step)
    before = [(v.version, v.tags, v.source) for v in src.search_model_versions(f"name='{name}'")]
    data_root = embedded / "datasets"
    shutil.copytree(synthetic_dataset, data_root / "demo" / "versions" / "v1")
    (data_root / "demo" / "watermark.json").write_text('{"at": "2026-12-04T00:00:00Z"}')
    monkeypatch.setenv("RMFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    result, proc = cli("migrate", "--from-mlflow", source_uri, "--data-from", str(data_root), env=clean_env(RMFLOW_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(v["source_version"], v["version"], v["copied"]) for v in result["mlflow"]["versions"]] == [("1", "2", True), ("2", "3", True)]
    dst = MlflowClient(server, server)  # registry named too: register_model set the global one to the source
    v3 = dst.get_model_version(name, "3")
    assert dst.get_registered_model(name).aliases == {"champion": "3"}
    assert v3.tags["validation_status"] == "passed" and dst.get_model_version(name, "2").tags["validation_status"] == "failed"
    assert v3.tags[migrate.MIGRATED_FROM] == f"{name}/2:{run2}" and v3.description == "promoted by the gate"
    source_tags = src.get_model_version(name, "2").tags
    assert {k: v for k, v in v3.tags.items() if k not in ("run_id", migrate.MIGRATED_FROM, migrate.SOURCE_RUN_ID)} == \
        {k: v for k, v in source_tags.items() if k != "run_id"}
    run = dst.get_run(v3.tags["run_id"])  # rmflow's run_id tag names the copied run on the team server
    assert v3.run_id == run.info.run_id != run2 and run.data.params["optim.lr"] == "3e-3"
    assert [m.value for m in dst.get_metric_history(run.info.run_id, "loss")] == [0.7, 0.5, 0.4]
    assert "hf_model" in {a.path for a in dst.list_artifacts(run.info.run_id)}
    # the files went through the server into the bucket
    store = objectstore.storage(objectstore.service().state()["port"])
    keys = [o["Key"] for page in store.client().get_paginator("list_objects_v2").paginate(Bucket="rmflow", Prefix="mlflow-artifacts/")
            for o in page.get("Contents", [])]
    model_id = v3.source.removeprefix("models:/")
    assert model_id.startswith("m-") and any(model_id in k and k.endswith("model.safetensors") for k in keys), (v3.source, keys[:20])
    # a consumer with the tracking URI only (no bucket variables, another RMFLOW_HOME) gets the champion
    prompt, response = "How do I brew green tea?", "Steep it at 80 degrees for three minutes."
    scored, proc = cli("score", "--model", f"models:/{name}@champion", "--prompt", prompt, "--response", response,
                       env=clean_env(MLFLOW_TRACKING_URI=server, RMFLOW_HOME=str(tmp_path / "consumer")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert scored["rewards"] == pytest.approx(RewardScorer(tmp_path / "model1").score([prompt], [response]).tolist(), abs=1e-5)
    # the dataset versions, byte for byte, under the team bucket's datasets/
    assert result["datasets"]["to"] == "s3://rmflow/datasets" and result["datasets"]["dataset_versions"] == ["demo/versions/v1"]
    back = store.download_dir("datasets", dest=tmp_path / "back")
    local = {p.relative_to(data_root): p.read_bytes() for p in data_root.rglob("*") if p.is_file()}
    # (other tests of the module publish their own datasets under the same prefix: compare the migrated trees)
    tops = {p.parts[0] for p in local}
    assert {p.relative_to(back): p.read_bytes() for p in back.rglob("*") if p.is_file() and p.relative_to(back).parts[0] in tops} == local
    # a rerun copies nothing; the source never changed
    again = migrate.migrate(source_uri, server, data_root)
    assert again["mlflow"]["versions_copied"] == 0 and again["mlflow"]["runs_copied"] == 0
    assert again["datasets"]["copied"] == 0 and again["datasets"]["skipped"] == len(local)
    assert not any(a["set"] for a in again["mlflow"]["aliases"])
    assert len(dst.search_model_versions(f"name='{name}'")) == 3
    assert [(v.version, v.tags, v.source) for v in src.search_model_versions(f"name='{name}'")] == before
    assert {k: str(v) for k, v in src.get_registered_model(name).aliases.items()} == {"champion": "2"}  # SQLite gives ints


def test_migrate_moves_label_studio_projects_with_their_annotators(team_home, home, label_studio, tmp_path_factory, tmp_path,
                                                                   monkeypatch):
    """`rmflow migrate --labelstudio-export` from the embedded Label Studio (SQLite), then
    `--labelstudio-import` into Label Studio on the team's PostgreSQL: the project with its label
    config, every task with its annotations, each on the same annotator (by email); a rerun imports
    nothing."""
    import uuid

    from rmflow.infra import labelstudio, migrate
    from rmflow.infra import labelstudio_api as lst

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    embedded = tmp_path_factory.getbasetemp() / "rmflow_home"  # the session Label Studio's home
    monkeypatch.setenv("RMFLOW_HOME", str(embedded))
    src, title, annotator = lst.connect(label_studio), f"moved-{uuid.uuid4().hex[:6]}", f"ann-{uuid.uuid4().hex[:6]}@rmflow.local"
    pid = lst.ensure_project(src, title, k=2)
    src.users.create(email=annotator, username=annotator)
    items = [{"id": f"r{i}", "title": f"Response {i + 1}", "body": f"answer {i}"} for i in range(2)]
    annotators = [(labelstudio.ADMIN, annotator), (annotator,), (labelstudio.ADMIN,)]  # per task: who ranked it
    tasks = [{"data": {"prompt": f"question {n}", "items": items},
              "annotations": [{"result": lst.ranker_result(["r0", "r1"] if n % 2 else ["r1", "r0"]), "completed_by": {"email": who}}
                              for who in by]} for n, by in enumerate(annotators)]
    src.projects.import_tasks(id=pid, request=tasks)
    dump = tmp_path / "ls.json"
    result, proc = cli("migrate", "--no-mlflow", "--no-data", "--labelstudio-export", str(dump), "--project", title,
                       env=clean_env(RMFLOW_HOME=str(embedded)))
    assert proc.returncode == 0 and result["labelstudio_export"] == {"file": str(dump), "projects": [title], "tasks": 3}, proc.stderr[-2000:]
    monkeypatch.setenv("RMFLOW_HOME", str(home))
    try:
        labelstudio.up(port=18090, db=stack.labelstudio_db_env(postgres.database()))
        result, proc = cli("migrate", "--no-mlflow", "--no-data", "--labelstudio-import", str(dump), env=clean_env(RMFLOW_HOME=str(home)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert result["labelstudio"]["projects"][0]["tasks_copied"] == 3
        dst = lst.connect()
        tid = lst.find_project(dst, title)
        assert lst.label_config(dst, tid) == lst.label_config(src, pid)

        def labels(ls, project_id: int) -> list[tuple]:
            emails = {u.id: u.email for u in ls.users.list()}
            return sorted((t["data"]["prompt"], emails[lst.annotation_user(a)], json.dumps(a["result"], sort_keys=True))
                          for t in lst.pull_tasks(ls, project_id) for a in t["annotations"])

        want = labels(src, pid)
        assert len(want) == 4 and {w[1] for w in want} == {labelstudio.ADMIN, annotator}
        assert labels(dst, tid) == want
        again = migrate.import_labelstudio(dst, json.loads(dump.read_text()))
        assert again["projects"][0]["tasks_copied"] == 0 and not again["projects"][0]["created"]
        assert lst.project_task_count(dst, tid) == 3
    finally:
        labelstudio.down()


def test_a_pipeline_run_through_the_deployment_trains_on_both_nodes_from_the_bucket(team_home, home, label_studio, tiny_bert,
                                                                                   tmp_path_factory, tmp_path, monkeypatch):
    """`rmflow up --team` serving the deployments, RAY_ADDRESS naming a two-node cluster whose nodes
    share no disk: a run created as the Prefect UI does collects from Label Studio, keeps the snapshot
    and the dataset versions in the bucket (datasets/<project>/, manifest last), trains its strength
    ensemble's members and then the model with one worker per node, every Ray Train run reading its
    version from the bucket, with the checkpoints under the bucket's ray_results/ (the team default:
    no storage_path given); the version lands in the team registry."""
    import uuid

    import yaml
    from mlflow import MlflowClient

    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio
    from rmflow.infra import labelstudio_api as lst
    from tests.test_ray_cluster import Cluster, _clean_env
    from tests.test_service import PIPELINE, create_flow_run, deployment, flow_result, wait_until_done

    store = objectstore.storage(objectstore.service().state()["port"])
    project = f"team-pipe-{uuid.uuid4().hex[:6]}"
    # labels in the session's Label Studio (SQLite: where Label Studio runs is not what this is about)
    monkeypatch.setenv("RMFLOW_HOME", str(tmp_path_factory.getbasetemp() / "rmflow_home"))
    token = labelstudio.credentials()["token"]
    ls = lst.connect(label_studio, token)
    project_id = lst.ensure_project(ls, project)
    items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(24, 4, seed=11)]
    lst.import_tasks(ls, project_id, items)
    lst.simulate_annotators(project_id, annotators=1, noise=0.3, seed=11, url=label_studio)
    monkeypatch.setenv("RMFLOW_HOME", str(home))

    params = {"project": project, "model_name": f"{project}-reward",
              "run": {"model": {"backbone": str(tiny_bert), "max_length": 64}, "optim": {"lr": 3e-3, "epochs": 1},
                      "scale": {"workers": 2, "placement_strategy": "STRICT_SPREAD", "checkpoint_every": 2},
                      "strength": {"ensemble": 2}},
              "gate": {"min_accuracy": 0.0, "max_ece": 1.0, "max_length_bias": 1.0, "delta": 1.0, "bootstrap": 200},
              "reannotate_max": 0}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    cluster = Cluster(env=store.env(), num_cpus=2)
    try:
        cluster.start()
        # the runner: the cluster's address and token, Label Studio's; no bucket variable (`up` gives it the bucket's)
        env = _clean_env(cluster.home, RAY_ADDRESS=cluster.address, RMFLOW_HOME=str(home), LABEL_STUDIO_URL=label_studio,
                         LABEL_STUDIO_API_KEY=token)
        result, proc = cli("up", "--team", "--params", str(params_file), "--no-webhook", "--min-new-labels", "100000",
                           "--interval", "0", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert store.secret_access_key not in " ".join(psutil.Process(stack.deployments_service().state()["pid"]).cmdline())
        api = result["prefect"]["api_url"]
        run = create_flow_run(api, deployment(api, PIPELINE)["id"])
        done = wait_until_done(api, run["id"], timeout_s=600)
    finally:
        stack.down(only=("deployments", "receiver"))
        cluster.stop()
    assert done["state_type"] == "COMPLETED", done["state"]
    training = flow_result(api, run["id"], "training")
    assert training["read_from"].startswith(f"s3://rmflow/datasets/{project}/"), training
    assert training["workers"] == "2" and training["worker_nodes"] == "2", training
    assert training["ray_run"].startswith("s3://rmflow/ray_results/"), training
    client = store.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="rmflow", Prefix=f"datasets/{project}/").get("Contents", [])]
    strength_version = training["read_from"].rsplit("/", 1)[1]
    label_version = strength_version.split("-strength-")[0]
    for version in (label_version, strength_version):  # the labels' version, and the strength version that trained
        assert f"datasets/{project}/{version}/manifest.json" in keys, keys
    assert any(k.startswith(f"datasets/{project}/snapshots/") for k in keys), keys
    run_keys = client.list_objects_v2(Bucket="rmflow", Prefix=training["ray_run"].removeprefix("s3://rmflow/"))
    assert any("checkpoint" in o["Key"] for o in run_keys.get("Contents", [])), run_keys.get("Contents", [])[:10]
    # every Ray Train run of this pipeline (the ensemble's two members, then the model) read a version in the bucket
    claims = [json.loads(client.get_object(Bucket="rmflow", Key=o["Key"])["Body"].read())["data"]
              for o in client.list_objects_v2(Bucket="rmflow", Prefix="ray_results/").get("Contents", [])
              if o["Key"].endswith("/rmflow_run.json")]
    mine = sorted(d for d in claims if f"/datasets/{project}/" in d)
    assert mine == sorted([f"s3://rmflow/datasets/{project}/{label_version}"] * 2 + [training["read_from"]]), claims
    server = result["mlflow"]["url"]  # the registry named explicitly: an earlier test may have set mlflow's global one
    versions = MlflowClient(server, registry_uri=server).search_model_versions(f"name='{project}-reward'")
    assert len(versions) == 1 and versions[0].tags["label_dataset_version"] == label_version
