"""`rmflow serve-rm`: an online reward server for RL trainers.

- `POST /get_reward` `{"query": [text, ...]}` → `{"rewards": [...], "version": "..."}`: OpenRLHF's
  remote reward-model protocol (each text is a whole formatted query: prompt and response together).
- `POST /score` `{"prompt": [...], "response": [...]}` → `{"rewards": [...], "version": "..."}`:
  prompt and response kept apart, encoded exactly as in training (chat template included).
- Both take `"normalize": true|false` (default: the server's `--normalize`): (r - mean) / std with the
  model's training-completion statistics. `GET /health` names the model and the version served.

Concurrent requests are batched (dynamic batching: up to `max_batch` texts, waiting at most
`max_wait_ms` for more after the first), scored on one worker thread. With a registry alias
(`models:/NAME@champion`) the server re-reads the alias every `refresh_s` seconds and, after a
promotion, loads the new version beside the old one and swaps: no restart, no failed request, and
every response says which version scored it. Bad requests get a 4xx naming the field and item;
an optional bearer token (RMFLOW_RM_TOKEN, never a command-line argument) guards both endpoints.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rmcore.scoring import RewardScorer, resolve_model_uri

log = logging.getLogger("rmflow.serve_rm")
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    scorer: RewardScorer
    version: str


@dataclass
class ModelHolder:
    """The scorer for `uri`; for an alias URI, follows the alias to whatever version it names."""

    uri: str
    current: Served | None = None

    def _resolve(self) -> tuple[str, str]:
        """(version label, URI of exactly that version)."""
        m = ALIAS_URI.match(self.uri)
        if not m:
            return self.uri, self.uri
        from rmflow.infra.mlflow_client import configure_mlflow

        version = str(configure_mlflow().get_model_version_by_alias(m["name"], m["alias"]).version)
        return version, f"models:/{m['name']}/{version}"

    def refresh(self) -> bool:
        """Loads the version `uri` names now (the first time, or when the alias moved); True when
        it loaded one."""
        version, exact = self._resolve()
        if self.current is not None and version == self.current.version:
            return False
        fresh = Served(RewardScorer(resolve_model_uri(exact)), version)
        log.info("serving version %s (was %s)", version, self.current.version if self.current else None)
        self.current = fresh  # one assignment: a batch in flight keeps the scorer it started with
        return True


@dataclass
class Job:
    kind: str  # "pairs" or "texts"
    items: tuple[list[str], list[str]] | list[str]
    normalize: bool
    future: asyncio.Future

    @property
    def size(self) -> int:
        return len(self.items[0]) if self.kind == "pairs" else len(self.items)


def score_jobs(served: Served, jobs: list[Job]) -> list[np.ndarray]:
    """One forward pass set for every job of the batch; each job gets its own slice back."""
    scorer = served.scorer
    seqs: list[list[int]] = []
    for job in jobs:
        if job.kind == "pairs":
            seqs += scorer.encode(*job.items)
        else:
            seqs += [scorer.encoder.encode_text(t) for t in job.items]
    rewards = scorer.score_ids(seqs)
    out, start = [], 0
    for job in jobs:
        part = rewards[start:start + job.size]
        out.append(scorer.normalize(part) if job.normalize else part)
        start += job.size
    return out


@dataclass
class Batcher:
    holder: ModelHolder
    max_batch: int = 64
    max_wait_ms: float = 5.0
    refresh_s: float = 10.0
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="score"))

    async def submit(self, kind: str, items: Any, normalize: bool) -> tuple[list[float], str]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(kind, items, normalize, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size, deadline = jobs[0].size, loop.time() + self.max_wait_ms / 1000
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += job.size
            served = self.holder.current
            try:
                results = await loop.run_in_executor(self.pool, score_jobs, served, jobs)
            except Exception as e:  # noqa: BLE001 — every waiting request gets the error, the loop goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, rewards in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(([float(r) for r in rewards], served.version))

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


def create_app(holder: ModelHolder, token: str | None = None, normalize: bool = False, max_batch: int = 64,
               max_wait_ms: float = 5.0, refresh_s: float = 10.0, max_chars: int = 32_000, max_items: int = 1024) -> Starlette:
    batcher = Batcher(holder, max_batch, max_wait_ms, refresh_s)
    expected = f"Bearer {token}".encode() if token else None

    async def body_of(request: Request) -> dict[str, Any]:
        if expected and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise BadRequest("missing or wrong bearer token", 401)
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("body is not JSON", 400) from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object", 400)
        flag = body.get("normalize", normalize)
        if not isinstance(flag, bool):
            raise BadRequest("'normalize' must be true or false")
        body["normalize"] = flag
        return body

    async def answer(kind: str, items: Any, flag: bool) -> JSONResponse:
        try:
            rewards, version = await batcher.submit(kind, items, flag)
        except ValueError as e:  # e.g. normalize on a model without statistics
            return JSONResponse({"error": str(e)}, status_code=422)
        return JSONResponse({"rewards": rewards, "version": version})

    async def get_reward(request: Request) -> JSONResponse:
        try:
            body = await body_of(request)
            texts = _texts(body, "query", max_chars, max_items)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await answer("texts", texts, body["normalize"])

    async def score(request: Request) -> JSONResponse:
        try:
            body = await body_of(request)
            prompts = _texts(body, "prompt", max_chars, max_items)
            responses = _texts(body, "response", max_chars, max_items)
            if len(prompts) != len(responses):
                raise BadRequest(f"'prompt' has {len(prompts)} items but 'response' has {len(responses)}")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await answer("pairs", (prompts, responses), body["normalize"])

    async def health(_: Request) -> JSONResponse:
        served = holder.current
        return JSONResponse({"model": holder.uri, "version": served.version if served else None,
                             "input_format": served.scorer.input_format if served else None})

    @asynccontextmanager
    async def lifespan(_: Starlette):
        if holder.current is None:
            holder.refresh()
        tasks = [asyncio.create_task(batcher.run())]
        if ALIAS_URI.match(holder.uri):
            tasks.append(asyncio.create_task(batcher.follow_alias()))
        yield
        for t in tasks:
            t.cancel()

    return Starlette(routes=[Route("/get_reward", get_reward, methods=["POST"]), Route("/score", score, methods=["POST"]),
                             Route("/health", health)], lifespan=lifespan)


def serve(uri: str, host: str, port: int, token: str | None = None, **options: Any) -> None:
    import uvicorn

    holder = ModelHolder(uri)
    holder.refresh()  # fail before binding when the model cannot be loaded
    uvicorn.run(create_app(holder, token, **options), host=host, port=port, log_level="warning")
