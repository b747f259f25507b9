"""The reward server under RL traffic, on a real uvicorn server in this process (no registry):
a bad request inside a batch fails only itself, a full queue answers 503 with Retry-After, an
oversized body 413, and /metrics is Prometheus' text format with the counters the traffic moved."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from rmcore.config import ModelConfig
from rmcore.model import RewardModel, load_tokenizer
from rmcore.scoring import RewardScorer
from rmcore.synthetic import synthetic_items
from rmflow.infra.process import free_port, wait_healthy
from rmflow.infra.reward_server import ModelHolder, ServerOptions, create_app

# ChatML that, like Llama-2's and Mistral's templates, rejects conversations whose roles do not alternate
STRICT_CHATML = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
REJECTED_PROMPT = "\n\nHuman: hi\n\nHuman: are you there?\n\nAssistant:"


@pytest.fixture(scope="module")
def model_dir(tiny_qwen2, tmp_path_factory) -> Path:
    """A reward model without reward statistics (normalize is a 4xx) whose chat template rejects
    non-alternating roles."""
    path = tmp_path_factory.mktemp("strict_model")
    torch.manual_seed(3)
    tok = load_tokenizer(str(tiny_qwen2))
    tok.chat_template = STRICT_CHATML
    RewardModel.from_backbone(ModelConfig(backbone=str(tiny_qwen2), max_length=128)).save_pretrained(path, tok)
    return path


@contextmanager
def running(model_dir: Path, **options):
    port = free_port(18660)
    server = uvicorn.Server(uvicorn.Config(create_app(ModelHolder(str(model_dir)), ServerOptions(**options)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/health", 60, alive=thread.is_alive)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: (name, labels) → value."""
    text = httpx.get(f"{url}/metrics").raise_for_status().text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_bad_request_batched_with_good_ones_fails_alone(model_dir):
    items = synthetic_items(6, 4, seed=5)
    good = [([i.prompt], [i.responses[0]]) for i in items]
    bodies = [{"prompt": p, "response": r} for p, r in good]
    bodies += [{"prompt": good[0][0], "response": good[0][1], "normalize": True},  # the model has no statistics
               {"prompt": ["fine", REJECTED_PROMPT], "response": ["ok", "ok"]}]  # the chat template raises on item 1
    # a long batching window: all eight requests are scored as one batch
    with running(model_dir, max_wait_ms=1500, max_batch=64) as url:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/score", json=b, timeout=60), bodies))
        seen = metrics(url)
    scorer = RewardScorer(model_dir)
    for (prompts, responses), got in zip(good, answers[:6]):
        assert got.status_code == 200, got.text
        np.testing.assert_allclose(got.json()["rewards"], scorer.score(prompts, responses), atol=1e-5)
    assert answers[6].status_code == 422 and "no reward statistics" in answers[6].json()["error"]
    assert answers[7].status_code == 422 and "prompt/response[1]" in answers[7].json()["error"]
    assert "roles must alternate" in answers[7].json()["error"]
    # they really shared a batch: the six good requests' texts were scored in one forward set
    assert seen[("rmflow_rm_batch_size_count", ())] == 1 and seen[("rmflow_rm_batch_size_sum", ())] == 6
    assert seen[("rmflow_rm_requests_total", (("route", "/score"), ("status", "200")))] == 6
    assert seen[("rmflow_rm_requests_total", (("route", "/score"), ("status", "422")))] == 2


def test_full_queue_answers_503_with_retry_after_and_a_big_body_413(model_dir):
    with running(model_dir, max_queue=8, max_wait_ms=3000, max_batch=64, max_body_bytes=20_000) as url:
        first = {"prompt": ["hello"] * 8, "response": ["there"] * 8}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{url}/score", json=first, timeout=60)
            # admitted and held by the batching window: the queue holds its 8 texts
            end = time.monotonic() + 10
            while metrics(url)[("rmflow_rm_queue_depth", ())] < 8:
                assert time.monotonic() < end, "the first request never reached the queue"
                time.sleep(0.02)
            full = httpx.post(f"{url}/score", json={"prompt": ["one more"], "response": ["please"]})
            assert full.status_code == 503 and "queue full" in full.json()["error"]
            assert int(full.headers["retry-after"]) >= 1
            assert waiting.result().status_code == 200  # the admitted request is answered
        big = httpx.post(f"{url}/get_reward", json={"query": ["x" * 30_000]})
        assert big.status_code == 413 and "at most 20000" in big.json()["error"]
        # a body without Content-Length is cut off at the limit too
        chunked = httpx.post(f"{url}/get_reward", content=iter([b'{"query": ["', b"y" * 25_000, b'"]}']))
        assert chunked.status_code == 413
        assert httpx.post(f"{url}/get_reward", json={"query": ["fits"]}).status_code == 200
        seen = metrics(url)
    assert seen[("rmflow_rm_requests_total", (("route", "/score"), ("status", "503")))] == 1
    assert seen[("rmflow_rm_requests_total", (("route", "/get_reward"), ("status", "413")))] == 2


def test_metrics_scrape_parses_and_counts_what_was_served(model_dir):
    with running(model_dir, max_wait_ms=1) as url:
        for n in range(3):
            assert httpx.post(f"{url}/score", json={"prompt": ["a", "b"], "response": ["c", f"d{n}"]}).status_code == 200
        assert httpx.post(f"{url}/score", json={"prompt": ["a"]}).status_code == 422
        seen = metrics(url)
        health = httpx.get(f"{url}/health").json()
    assert seen[("rmflow_rm_requests_total", (("route", "/score"), ("status", "200")))] == 3
    assert seen[("rmflow_rm_request_seconds_count", (("route", "/score"),))] == 4
    assert seen[("rmflow_rm_batch_size_sum", ())] == 6
    assert seen[("rmflow_rm_tokens_scored_total", ())] > 6
    assert seen[("rmflow_rm_queue_depth", ())] == 0
    assert seen[("rmflow_rm_model_version_info", (("version", str(model_dir)),))] == 1
    assert seen[("rmflow_rm_swaps_total", ())] == 0
    assert health["status"] == "ok" and health["load_failure"] is None
