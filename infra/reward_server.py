"""`rmflow serve-rm`: an online reward server for RL trainers.

- `POST /get_reward` `{"query": [text, ...]}` → `{"rewards": [...], "version": "..."}`: OpenRLHF's
  remote reward-model protocol (each text is a whole formatted query: prompt and response together).
- `POST /score` `{"prompt": [...], "response": [...]}` → `{"rewards": [...], "version": "..."}`:
  prompt and response kept apart, encoded exactly as in training (chat template included).
- Both take `"normalize": true|false` (default: the server's `--normalize`): (r - mean) / std with the
  model's training-completion statistics. `GET /health` names the model, the version served and a
  version that failed to load; `GET /metrics` is Prometheus' text format.

Each request is validated, checked and tokenised on its own (in a tokeniser thread, beside the
forward pass), so a bad request gets its own 4xx naming the item and never fails the requests it is
batched with. Encoded requests are batched (dynamic batching: up to `max_batch` texts; an idle
scorer waits at most `max_wait_ms` for more) and scored on one worker thread in length-sorted
chunks of at most `max_tokens` padded tokens. Back-pressure: at most `max_queue` texts admitted and
not yet answered (beyond: 503 with Retry-After) and a body-size limit (413).

With a registry alias (`models:/NAME@champion`) the server re-reads the alias every `refresh_s`
seconds and, after a promotion, loads the new version beside the old one and swaps: no restart, no
failed request, every response says which version scored it. A version that fails to load is retried
with exponential backoff while the old one keeps serving; `/health` and
`rmflow_rm_load_failure{version=...}` name it. Downloads are deleted once loaded (or failed).
An optional bearer token (RMFLOW_RM_TOKEN, never a command-line argument) guards the scoring routes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rmcore.scoring import RewardScorer
from rmflow.infra.model_uri import load_scorer

log = logging.getLogger("rmflow.serve_rm")
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (several behind Ray Serve)
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(RuntimeError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per server or replica)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rmflow_rm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("rmflow_rm_request_seconds", "Request latency by route", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("rmflow_rm_batch_size", "Texts per scored batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.queue = Gauge("rmflow_rm_queue_depth", "Texts admitted and not yet answered", registry=r)
        self.tokens = Counter("rmflow_rm_tokens_scored", "Tokens scored (no padding)", registry=r)
        self.version = Gauge("rmflow_rm_model_version_info", "1 for the model version being served", ["version"], registry=r)
        self.swaps = Counter("rmflow_rm_swaps", "Model versions loaded and swapped in", registry=r)
        self.failed_swaps = Counter("rmflow_rm_swaps_failed", "Model versions that failed to load", ["version"], registry=r)
        self.load_failure = Gauge("rmflow_rm_load_failure", "1 while the version the alias names fails to load", ["version"],
                                  registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Served:
    scorer: RewardScorer
    version: str


@dataclass
class LoadFailure:
    version: str
    error: str
    attempts: int
    backoff_s: float
    retry_at: float  # time.monotonic()

    def report(self) -> dict[str, Any]:
        return {"version": self.version, "error": self.error, "attempts": self.attempts, "backoff_s": self.backoff_s,
                "retry_in_s": round(max(0.0, self.retry_at - time.monotonic()), 1)}


@dataclass
class ModelHolder:
    """The scorer for `uri`; for an alias URI, follows the alias to whatever version it names. A
    version that fails to load is retried after `backoff_s`, doubling up to `max_backoff_s`."""

    uri: str
    backoff_s: float = 10.0
    max_backoff_s: float = 600.0
    download_root: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    metrics: Metrics = field(default_factory=Metrics)
    current: Served | None = None
    failure: LoadFailure | None = None

    def _resolve(self) -> tuple[str, str]:
        """(version label, URI of exactly that version)."""
        m = ALIAS_URI.match(self.uri)
        if not m:
            return self.uri, self.uri
        from rmflow.infra.mlflow_client import configure_mlflow

        version = str(configure_mlflow().get_model_version_by_alias(m["name"], m["alias"]).version)
        return version, f"models:/{m['name']}/{version}"

    def _clear_failure(self) -> None:
        if self.failure is not None:
            self.metrics.load_failure.remove(self.failure.version)
            self.failure = None

    def refresh(self) -> bool:
        """Loads the version `uri` names now (the first time, or when the alias moved); True when it
        swapped one in. With nothing serving yet a load failure raises; otherwise it is recorded and
        the old version keeps serving."""
        version, exact = self._resolve()
        if self.current is not None and version == self.current.version:
            self._clear_failure()  # the alias moved back to what is served
            return False
        failed = self.failure if self.failure and self.failure.version == version else None
        if failed and time.monotonic() < failed.retry_at:
            return False
        try:
            scorer = load_scorer(exact, self.device, self.download_root, self.dtype)
        except Exception as e:  # noqa: BLE001 — any load error: the old version keeps serving
            attempts = failed.attempts + 1 if failed else 1
            backoff = min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s)
            self._clear_failure()
            self.failure = LoadFailure(version, f"{type(e).__name__}: {e}"[:500], attempts, backoff, time.monotonic() + backoff)
            self.metrics.failed_swaps.labels(version).inc()
            self.metrics.load_failure.labels(version).set(1)
            if self.current is None:
                raise
            log.error("version %s failed to load (attempt %d, next in %.0f s); still serving %s: %s", version, attempts, backoff,
                      self.current.version, e)
            return False
        old = self.current
        self.current = Served(scorer, version)  # one assignment: a batch in flight keeps the scorer it started with
        self._clear_failure()
        if old is not None:
            self.metrics.version.remove(old.version)
            self.metrics.swaps.inc()
        self.metrics.version.labels(version).set(1)
        log.info("serving version %s (was %s)", version, old.version if old else None)
        return True


@dataclass
class Job:
    served: Served
    seqs: list[list[int]]
    normalize: bool
    future: asyncio.Future


def encode_request(scorer: RewardScorer, kind: str, items: Any) -> list[list[int]]:
    """The request's input ids; an item the tokenizer or chat template rejects is a BadRequest
    naming it (found by encoding the items one by one once the whole request failed)."""
    def one(n: int) -> list[list[int]]:
        if kind == "pairs":
            return scorer.encode([items[0][n]], [items[1][n]])
        return [scorer.encoder.encode_text(items[n])]

    try:
        if kind == "pairs":
            return scorer.encode(*items)
        return [scorer.encoder.encode_text(t) for t in items]
    except Exception:  # noqa: BLE001 — narrowed to the item below
        pass
    field_name = "prompt/response" if kind == "pairs" else "query"
    size = len(items[0]) if kind == "pairs" else len(items)
    for n in range(size):
        try:
            one(n)
        except Exception as e:  # noqa: BLE001 — e.g. jinja2's TemplateError from the chat template
            raise BadRequest(f"{field_name}[{n}] could not be encoded for this model: {type(e).__name__}: {e}") from None
    raise BadRequest("the request could not be encoded for this model")


def score_jobs(jobs: list[Job], max_tokens: int) -> list[np.ndarray]:
    """One forward pass set per served version in the batch; each job gets its own slice back,
    normalised on its own."""
    out: list[np.ndarray | None] = [None] * len(jobs)
    by_version: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_version.setdefault(id(job.served), []).append(i)
    for members in by_version.values():
        scorer = jobs[members[0]].served.scorer
        rewards = scorer.score_ids([s for i in members for s in jobs[i].seqs], max_tokens=max_tokens)
        start = 0
        for i in members:
            part = rewards[start:start + len(jobs[i].seqs)]
            out[i] = scorer.normalize(part) if jobs[i].normalize else part
            start += len(jobs[i].seqs)
    return out  # type: ignore[return-value]


@dataclass
class Batcher:
    holder: ModelHolder
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_tokens: int = 1024
    refresh_s: float = 10.0
    pending: deque = field(default_factory=deque)
    depth: int = 0  # texts admitted and not yet answered (queued, encoding or scoring)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    scorer_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="score"))
    encoder_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="encode"))
    rate: float = 0.0  # texts/s of recent batches, for Retry-After

    async def submit(self, kind: str, items: Any, normalize: bool) -> tuple[list[float], str]:
        size = len(items[0]) if kind == "pairs" else len(items)
        if self.depth + size > self.max_queue:
            wait = math.ceil(self.depth / self.rate) if self.rate > 0 else 1
            raise Overloaded(f"queue full ({self.depth} texts waiting, at most {self.max_queue}); retry later", max(1, min(wait, 60)))
        self.depth += size
        self.holder.metrics.queue.set(self.depth)
        try:
            served = self.holder.current
            if normalize and not served.scorer.stats:
                raise BadRequest(f"version {served.version} has no reward statistics (trained before rmflow recorded them): "
                                 "cannot normalize; send \"normalize\": false")
            loop = asyncio.get_running_loop()
            seqs = await loop.run_in_executor(self.encoder_pool, encode_request, served.scorer, kind, items)
            job = Job(served, seqs, normalize, loop.create_future())
            self.pending.append(job)
            self.wake.set()
            return [float(r) for r in await job.future], served.version
        finally:
            self.depth -= size
            self.holder.metrics.queue.set(self.depth)

    def _take(self) -> list[Job]:
        jobs, size = [], 0
        while self.pending and (not jobs or size + len(self.pending[0].seqs) <= self.max_batch):
            job = self.pending.popleft()
            jobs.append(job)
            size += len(job.seqs)
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                # idle until now: wait a little for more requests to batch with this one
                deadline = loop.time() + self.max_wait_ms / 1000
                while sum(len(j.seqs) for j in self.pending) < self.max_batch and (left := deadline - loop.time()) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            jobs = self._take()
            size = sum(len(j.seqs) for j in jobs)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.scorer_pool, score_jobs, jobs, self.max_tokens)
            except Exception as e:  # noqa: BLE001 — a failed forward fails this batch only; the loop goes on
                log.exception("scoring a batch of %d texts failed", size)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            elapsed = time.perf_counter() - started
            self.rate = 0.8 * self.rate + 0.2 * (size / max(elapsed, 1e-6)) if self.rate else size / max(elapsed, 1e-6)
            self.holder.metrics.batch.observe(size)
            self.holder.metrics.tokens.inc(sum(len(s) for j in jobs for s in j.seqs))
            for job, rewards in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(rewards)

    async def follow_alias(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await loop.run_in_executor(None, self.holder.refresh)  # loads beside the serving model
            except Exception as e:  # noqa: BLE001 — the registry being down keeps the current model serving
                log.warning("could not refresh %s: %s", self.holder.uri, e)


def _texts(body: dict[str, Any], key: str, max_chars: int, max_items: int) -> list[str]:
    if key not in body:
        raise BadRequest(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(f"{key!r} must be a list of strings, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"{key!r} is empty")
    if len(value) > max_items:
        raise BadRequest(f"{key!r} has {len(value)} items; at most {max_items} per request", 413)
    for n, text in enumerate(value):
        if not isinstance(text, str):
            raise BadRequest(f"{key}[{n}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadRequest(f"{key}[{n}] is empty")
        if len(text) > max_chars:
            raise BadRequest(f"{key}[{n}] has {len(text)} characters; at most {max_chars}", 413)
    return value


@dataclass
class ServerOptions:
    """Everything `serve-rm` takes besides the model; one declaration, used by the HTTP server and
    by each Ray Serve replica."""

    token: str | None = None
    normalize: bool = False
    max_batch: int = 64
    max_wait_ms: float = 5.0
    refresh_s: float = 10.0
    max_chars: int = 32_000
    max_items: int = 1024
    max_queue: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_tokens: int = 1024
    dtype: str = "auto"
    download_root: str | None = None


class RewardService:
    """The routes and background tasks of one server (or one Ray Serve replica)."""

    def __init__(self, holder: ModelHolder, options: ServerOptions) -> None:
        self.holder, self.o = holder, options
        self.metrics = holder.metrics
        self.batcher = Batcher(holder, options.max_batch, options.max_wait_ms, min(options.max_queue, 10**9), options.max_tokens,
                               options.refresh_s)
        self.expected = f"Bearer {options.token}".encode() if options.token else None
        self.tasks: list[asyncio.Task] = []
        self.routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/get_reward": self._counted("/get_reward", self.get_reward), "/score": self._counted("/score", self.score),
            "/health": self._counted("/health", self.health), "/metrics": self.metrics_route}

    def start(self) -> None:
        if self.holder.current is None:
            self.holder.refresh()
        self.tasks = [asyncio.create_task(self.batcher.run())]
        if ALIAS_URI.match(self.holder.uri):
            self.tasks.append(asyncio.create_task(self.batcher.follow_alias()))

    def stop(self) -> None:
        for t in self.tasks:
            t.cancel()

    def _counted(self, route: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 — a server fault in one request answers that request only
                log.exception("%s failed", route)
                response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            return response
        return wrapped

    async def _body(self, request: Request) -> dict[str, Any]:
        if self.expected and not hmac.compare_digest(request.headers.get("authorization", "").encode(), self.expected):
            raise BadRequest("missing or wrong bearer token", 401)
        limit = self.o.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"body has {declared} bytes; at most {limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():  # a body without (or lying about) its length is cut off at the limit too
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"body exceeds {limit} bytes", 413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            raise BadRequest("body is not JSON", 400) from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object", 400)
        flag = body.get("normalize", self.o.normalize)
        if not isinstance(flag, bool):
            raise BadRequest("'normalize' must be true or false")
        body["normalize"] = flag
        return body

    async def _answer(self, kind: str, items: Any, flag: bool) -> Response:
        try:
            rewards, version = await self.batcher.submit(kind, items, flag)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Overloaded as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after_s)})
        return JSONResponse({"rewards": rewards, "version": version})

    async def get_reward(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            texts = _texts(body, "query", self.o.max_chars, self.o.max_items)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await self._answer("texts", texts, body["normalize"])

    async def score(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            prompts = _texts(body, "prompt", self.o.max_chars, self.o.max_items)
            responses = _texts(body, "response", self.o.max_chars, self.o.max_items)
            if len(prompts) != len(responses):
                raise BadRequest(f"'prompt' has {len(prompts)} items but 'response' has {len(responses)}")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await self._answer("pairs", (prompts, responses), body["normalize"])

    async def health(self, _: Request) -> Response:
        served, failure = self.holder.current, self.holder.failure
        return JSONResponse({"status": "degraded" if failure else "ok", "model": self.holder.uri, "replica": REPLICA,
                             "version": served.version if served else None,
                             "input_format": served.scorer.input_format if served else None,
                             "load_failure": failure.report() if failure else None, "queue_depth": self.batcher.depth})

    async def metrics_route(self, _: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(holder: ModelHolder, options: ServerOptions | None = None) -> Starlette:
    service = RewardService(holder, options or ServerOptions())

    @asynccontextmanager
    async def lifespan(_: Starlette):
        service.start()
        yield
        service.stop()

    methods = {"/get_reward": ["POST"], "/score": ["POST"], "/health": ["GET"], "/metrics": ["GET"]}
    return Starlette(routes=[Route(path, handler, methods=methods[path]) for path, handler in service.routes.items()], lifespan=lifespan)


def serve(uri: str, host: str, port: int, options: ServerOptions, torch_threads: int = 0) -> None:
    import torch
    import uvicorn

    if torch_threads:
        torch.set_num_threads(torch_threads)
    holder = ModelHolder(uri, backoff_s=options.refresh_s, download_root=options.download_root, dtype=options.dtype)
    holder.refresh()  # fail before binding when the model cannot be loaded
    uvicorn.run(create_app(holder, options), host=host, port=port, log_level="warning")
