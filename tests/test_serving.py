"""Serving the champion: rmflow's reward server (protocol, validation, dynamic batching under
concurrent clients, following the alias after a promotion), MLflow's own `mlflow models serve`,
and the registered model loaded in a fresh virtualenv that has only its own requirements."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from rmcore.config import ModelConfig
from rmcore.model import RewardModel, load_tokenizer, write_reward_stats
from rmcore.scoring import RewardScorer
from rmcore.synthetic import synthetic_items
from rmflow.infra.process import free_port, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.services]
NAME = "serve-test-reward"
BIN = Path(sys.executable).parent


def decoder(path: Path, backbone: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = RewardModel.from_backbone(ModelConfig(backbone=str(backbone), max_length=128))
    model.save_pretrained(path, load_tokenizer(str(backbone)))
    write_reward_stats(path, 0.1 * seed, 1.0 + seed, n=100)
    return path


@pytest.fixture(scope="module")
def registry(tiny_qwen2, tmp_path_factory):
    """Two registered versions of one model; `champion` on version 1."""
    home = tmp_path_factory.mktemp("serving_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RMFLOW_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rmflow.infra.mlflow_client import configure_mlflow
    from rmflow.tasks.register import register_model

    dirs = [decoder(home / f"m{seed}", tiny_qwen2, seed) for seed in (1, 2)]
    versions = [register_model(NAME, d).version for d in dirs]
    client = configure_mlflow()
    client.set_registered_model_alias(NAME, "champion", versions[0])
    from rmcore.paths import mlflow_tracking_uri

    yield {"home": home, "dirs": dirs, "versions": versions, "client": client, "uri": mlflow_tracking_uri()}
    mp.undo()


def inputs(n: int, seed: int) -> tuple[list[str], list[str]]:
    items = synthetic_items(n, 4, seed=seed)
    return [i.prompt for i in items], [i.responses[seed % 4] for i in items]


def spawn(cmd: list[str], registry: dict, **env: str) -> subprocess.Popen:
    # the venv's bin first on PATH, as in an activated venv (mlflow models serve execs `uvicorn`)
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RMFLOW_HOME": str(registry["home"]),
                "MLFLOW_TRACKING_URI": registry["uri"], **env}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@pytest.fixture(scope="module")
def reward_server(registry):
    port = free_port(18600)
    proc = spawn([str(BIN / "rmflow"), "serve-rm", "--model", f"models:/{NAME}@champion", "--port", str(port), "--refresh", "1",
                  "--max-chars", "2000"], registry, RMFLOW_RM_TOKEN="s3cret")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", 120, alive=lambda: proc.poll() is None)
    except Exception:
        proc.kill()
        raise AssertionError(proc.stderr.read().decode()[-2000:]) from None
    yield {"url": url, "headers": {"Authorization": "Bearer s3cret"}}
    proc.terminate()
    proc.wait(20)


def test_score_and_get_reward_answer_as_in_process_scoring(registry, reward_server):
    url, headers = reward_server["url"], reward_server["headers"]
    scorer = RewardScorer(registry["dirs"][0])
    prompts, responses = inputs(5, 1)
    got = httpx.post(f"{url}/score", json={"prompt": prompts, "response": responses}, headers=headers).raise_for_status().json()
    assert got["version"] == registry["versions"][0]
    np.testing.assert_allclose(got["rewards"], scorer.score(prompts, responses), atol=1e-5)
    normed = httpx.post(f"{url}/score", json={"prompt": prompts, "response": responses, "normalize": True}, headers=headers).json()
    np.testing.assert_allclose(normed["rewards"], scorer.score(prompts, responses, normalize=True), atol=1e-5)
    # OpenRLHF's remote RM: whole formatted queries (here as the chat template renders them)
    texts = [scorer.tokenizer.decode(ids) for ids in scorer.encode(prompts, responses)]
    openrlhf = httpx.post(f"{url}/get_reward", json={"query": texts}, headers=headers).json()
    np.testing.assert_allclose(openrlhf["rewards"], scorer.score(prompts, responses), atol=1e-5)


@pytest.mark.parametrize("body,status,says", [
    ({}, 422, "missing field 'prompt'"),
    ({"prompt": "hi", "response": ["x"]}, 422, "must be a list"),
    ({"prompt": ["hi", 3], "response": ["x", "y"]}, 422, "prompt[1] must be a string"),
    ({"prompt": ["hi"], "response": ["  "]}, 422, "response[0] is empty"),
    ({"prompt": ["hi"], "response": ["x", "y"]}, 422, "has 1 items but 'response' has 2"),
    ({"prompt": ["hi"], "response": ["x" * 2001]}, 413, "at most 2000"),
    ({"prompt": ["hi"], "response": ["x"], "normalize": "yes"}, 422, "'normalize' must be true or false"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(reward_server, body, status, says):
    url, headers = reward_server["url"], reward_server["headers"]
    bad = httpx.post(f"{url}/score", json=body, headers=headers)
    assert bad.status_code == status and says in bad.json()["error"], bad.text
    assert httpx.post(f"{url}/score", json={"prompt": ["hi"], "response": ["x"]}, headers=headers).status_code == 200


def test_the_token_is_required_and_malformed_bodies_are_400(reward_server):
    url, headers = reward_server["url"], reward_server["headers"]
    assert httpx.post(f"{url}/get_reward", json={"query": ["a"]}).status_code == 401
    assert httpx.post(f"{url}/get_reward", json={"query": ["a"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{url}/get_reward", content=b"{", headers=headers).status_code == 400
    assert httpx.post(f"{url}/get_reward", json={"queries": ["a"]}, headers=headers).status_code == 422


def test_concurrent_clients_each_get_their_own_rewards(registry, reward_server):
    url, headers = reward_server["url"], reward_server["headers"]
    scorer = RewardScorer(registry["dirs"][0])
    requests = [inputs(1 + n % 4, seed=n) for n in range(32)]

    def call(req):
        return httpx.post(f"{url}/score", json={"prompt": req[0], "response": req[1]}, headers=headers, timeout=60).json()["rewards"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, requests))
    for (prompts, responses), got in zip(requests, answers):
        np.testing.assert_allclose(got, scorer.score(prompts, responses), atol=1e-5)


def test_after_a_promotion_the_server_serves_the_new_champion_without_a_restart(registry, reward_server):
    url, headers = reward_server["url"], reward_server["headers"]
    prompts, responses = inputs(3, 2)
    registry["client"].set_registered_model_alias(NAME, "champion", registry["versions"][1])
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            got = httpx.post(f"{url}/score", json={"prompt": prompts, "response": responses}, headers=headers).json()
            if got["version"] == registry["versions"][1]:
                break
            assert got["version"] == registry["versions"][0]  # never an error while it swaps
            time.sleep(0.5)
        assert got["version"] == registry["versions"][1]
        np.testing.assert_allclose(got["rewards"], RewardScorer(registry["dirs"][1]).score(prompts, responses), atol=1e-5)
    finally:
        registry["client"].set_registered_model_alias(NAME, "champion", registry["versions"][0])


def corrupt_weights(client, name: str, version: str) -> None:
    """A bad upload: the version's registered weights in the artifact store overwritten with junk."""
    from urllib.parse import urlparse

    source = client.get_model_version(name, version).source  # models:/m-<id> in MLflow 3
    root = Path(urlparse(client.get_logged_model(source.rsplit("/", 1)[-1]).artifact_location).path)
    weights = list(root.rglob("*.safetensors"))
    assert weights, f"no weights under {root}"
    for w in weights:
        w.write_bytes(b"not a safetensors file")


def test_a_version_that_fails_to_load_backs_off_while_the_old_one_serves(registry, tiny_qwen2, tmp_path, monkeypatch):
    import threading

    import uvicorn
    from prometheus_client.parser import text_string_to_metric_families

    from rmflow.infra.reward_server import ModelHolder, ServerOptions, create_app
    from rmflow.tasks.register import register_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    client = registry["client"]
    broken = register_model(NAME, decoder(tmp_path / "m3", tiny_qwen2, 3)).version
    corrupt_weights(client, NAME, broken)
    downloads = tmp_path / "downloads"
    holder = ModelHolder(f"models:/{NAME}@champion", backoff_s=1.5, download_root=downloads)
    port = free_port(18680)
    server = uvicorn.Server(uvicorn.Config(create_app(holder, ServerOptions(refresh_s=0.2)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    prompts, responses = inputs(2, 5)

    def health_when(check, what: str) -> dict:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            health = httpx.get(f"{url}/health").json()
            if check(health):
                return health
            time.sleep(0.05)
        raise AssertionError(f"{what}: {health}")

    def metric(name: str, **labels: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and s.labels == labels)

    try:
        wait_healthy(f"{url}/health", 60, alive=thread.is_alive)
        client.set_registered_model_alias(NAME, "champion", broken)
        first = health_when(lambda h: (h["load_failure"] or {}).get("attempts") == 1, "the broken version's failure never showed")
        seen_first = time.monotonic()
        assert first["status"] == "degraded" and first["version"] == registry["versions"][0]
        assert first["load_failure"]["version"] == broken and "deserializing header" in first["load_failure"]["error"]
        got = httpx.post(f"{url}/score", json={"prompt": prompts, "response": responses}).raise_for_status().json()
        assert got["version"] == registry["versions"][0]  # the old version keeps serving
        # retried after the backoff (1.5 s), not at every 0.2 s refresh; the next wait doubles
        second = health_when(lambda h: (h["load_failure"] or {}).get("attempts") == 2, "no retry after the backoff")
        assert time.monotonic() - seen_first >= 1.5 - 0.3 and second["load_failure"]["backoff_s"] == 3.0
        assert metric("rmflow_rm_swaps_failed_total", version=broken) == 2
        assert metric("rmflow_rm_load_failure", version=broken) == 1
        assert not list(downloads.iterdir())  # each failed try's download is gone
        # a good promotion swaps in and clears the failure; its download is gone too
        client.set_registered_model_alias(NAME, "champion", registry["versions"][1])
        fine = health_when(lambda h: h["version"] == registry["versions"][1], "the good version never swapped in")
        assert fine["status"] == "ok" and fine["load_failure"] is None
        assert metric("rmflow_rm_swaps_total") == 1 and metric("rmflow_rm_model_version_info", version=registry["versions"][1]) == 1
        assert not list(downloads.iterdir())
    finally:
        client.set_registered_model_alias(NAME, "champion", registry["versions"][0])
        server.should_exit = True
        thread.join(30)


def test_two_ray_serve_replicas_answer_and_each_follows_a_promotion(registry):
    """`serve-rm --replicas 2`: a local Ray runtime, Serve's proxy, two replicas of the same server;
    both answer, and after a promotion each one swaps to the new champion on its own."""
    port = free_port(18750)
    proc = spawn([str(BIN / "rmflow"), "serve-rm", "--model", f"models:/{NAME}@champion", "--port", str(port), "--refresh", "1",
                  "--replicas", "2"], registry)
    url = f"http://127.0.0.1:{port}"
    prompts, responses = inputs(3, 6)
    try:
        wait_healthy(f"{url}/health", 240, alive=lambda: proc.poll() is None)
        expected = {registry["versions"][k]: RewardScorer(registry["dirs"][k]).score(prompts, responses) for k in (0, 1)}

        def versions_by_replica(until, what: str) -> dict[str, str]:
            """Asks until `until(seen)` holds; seen: replica → the version its latest answer named."""
            seen: dict[str, str] = {}
            end = time.monotonic() + 90
            while time.monotonic() < end:
                got = httpx.post(f"{url}/score", json={"prompt": prompts, "response": responses}, timeout=30).raise_for_status().json()
                np.testing.assert_allclose(got["rewards"], expected[got["version"]], atol=1e-5)  # never an error while swapping
                health = httpx.get(f"{url}/health", timeout=30).json()
                seen[health["replica"]] = health["version"]
                if until(seen):
                    return seen
            raise AssertionError(f"{what}: {seen}")

        first = versions_by_replica(lambda s: len(s) == 2, "two replicas never both answered")
        assert set(first.values()) == {registry["versions"][0]}
        registry["client"].set_registered_model_alias(NAME, "champion", registry["versions"][1])
        versions_by_replica(lambda s: len(s) == 2 and set(s.values()) == {registry["versions"][1]},
                            "not every replica followed the promotion")
    finally:
        registry["client"].set_registered_model_alias(NAME, "champion", registry["versions"][0])
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command removes Serve and its local Ray
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.mark.timeout(300)  # reads the child's stderr until a line: never hang CI if it neither prints nor exits
def test_ray_serve_replicas_stopped_while_they_start_exit_cleanly(registry):
    """SIGTERM (a service manager's stop) while `serve-rm --replicas` still waits for its replicas:
    the command removes Serve and its local Ray and exits 0, not 134 from the fatal-signal handler
    that Ray's core worker installs on SIGTERM."""
    port = free_port(18760)
    proc = spawn([str(BIN / "rmflow"), "serve-rm", "--model", f"models:/{NAME}@champion", "--port", str(port), "--replicas", "1"],
                 registry)
    seen = []
    try:
        for line in proc.stderr:  # Serve's controller is up: the replica is not ready for seconds yet
            seen.append(line.decode(errors="replace"))
            if "Started Serve" in seen[-1]:
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    except BaseException:
        proc.kill()
        raise
    err = "".join(seen) + err.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" not in err, err[-3000:]
    assert "is ready at" not in err, err[-3000:]  # stopped while starting: the path this test is about


def test_mlflow_models_serve_answers_invocations_like_in_process_scoring(registry):
    port = free_port(18700)
    proc = spawn([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{registry['versions'][0]}", "--env-manager", "local",
                  "--host", "127.0.0.1", "--port", str(port)], registry)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/ping", 180, alive=lambda: proc.poll() is None)
        prompts, responses = inputs(4, 3)
        frame = pd.DataFrame({"prompt": prompts, "response": responses})
        body = {"dataframe_split": frame.to_dict(orient="split")}
        got = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).raise_for_status().json()
        rewards = [row["reward"] for row in got["predictions"]]
        np.testing.assert_allclose(rewards, RewardScorer(registry["dirs"][0]).score(prompts, responses), atol=1e-5)
        normed = httpx.post(f"http://127.0.0.1:{port}/invocations", json={**body, "params": {"normalize": True}}, timeout=60).json()
        np.testing.assert_allclose([row["reward"] for row in normed["predictions"]],
                                   RewardScorer(registry["dirs"][0]).score(prompts, responses, normalize=True), atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_champion_loads_in_a_fresh_virtualenv_with_only_its_requirements(registry, tmp_path):
    """No rmflow, no project checkout on the path: the model's requirements.txt (pinned versions,
    installed from the local package index and wheel cache) and its own code."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "model")))
    requirements = (local / "requirements.txt").read_text()
    for pin in ("torch==", "transformers==", "tokenizers==", "safetensors=="):
        assert pin in requirements, requirements
    assert "rmflow" not in requirements
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(local / "requirements.txt")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    prompts, responses = inputs(3, 4)
    script = ("import json, sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
              "import importlib.util; assert importlib.util.find_spec('rmflow') is None; "
              "print(json.dumps(m.predict(pd.DataFrame(json.loads(sys.argv[2])))['reward'].tolist()))")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", script, f"models:/{NAME}@champion",
                          json.dumps({"prompt": prompts, "response": responses})], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": registry["uri"]})
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]),
                               RewardScorer(registry["dirs"][0]).score(prompts, responses), atol=1e-5)
