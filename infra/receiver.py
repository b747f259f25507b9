"""Label Studio webhooks → the retrain decision → one Prefect event: the receiver `rmflow up` runs
for event-driven retraining.

Label Studio POSTs each annotation created or updated to `/labelstudio` with the shared secret in
its Authorization header (the webhook rmflow registers carries it). For each watched project the
receiver keeps, durably, the annotations its watermark has not consumed (`rmcore.watermark`): the
count is recomputed from Label Studio when the receiver starts and whenever the watermark moves (a
run succeeded), and webhooks add to it in between, so a restart or a lost webhook forgets nothing
and an annotation updated twice counts once. When the project's rule (`rmcore.retrain`) says so, it
emits one `rmflow.labels.ready` event; the deployment trigger on `reward-pipeline` (threshold 1,
`flows/deploy.py`) turns it into a run, visible with its cause in the Prefect UI. A tick every
TICK_S seconds re-applies the rule, so labels that arrived during a run start the next one when
that run's watermark lands, and the interval settings take effect without a new label.
Skipped (cancelled) annotations count for nothing.

Bound to 127.0.0.1 unless told otherwise; the secret comes from RMFLOW_WEBHOOK_SECRET or a file
under RMFLOW_HOME readable by its owner only, and is never logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rmcore.atomic import write_atomic
from rmcore.names import LABELS_READY_EVENT, PIPELINE_DEPLOYMENT, project_resource
from rmcore.paths import rmflow_home
from rmcore.retrain import RetrainPolicy, retrain_reason
from rmcore.watermark import Watermark, annotation_stamp, read_watermark

HOOK_PATH = "/labelstudio"
# Label Studio actions that add labels; ANNOTATIONS_CREATED is a bulk import with annotations
ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"}
TICK_S = 5.0
REQUEST_GRACE_S = 60.0  # an asked-for run not created by then: the event was lost, ask again
log = logging.getLogger("rmflow.receiver")


def receiver_home() -> Path:
    return rmflow_home() / "receiver"


def webhook_secret() -> str:
    """RMFLOW_WEBHOOK_SECRET, else one generated once and kept in a mode-600 file (written whole,
    the first writer winning). An empty secret is refused: an empty bearer must never be accepted."""
    secret = os.environ.get("RMFLOW_WEBHOOK_SECRET")
    if secret is None:
        path = receiver_home() / "secret"
        if not path.is_file():
            write_atomic(path, secrets.token_urlsafe(32), mode=0o600, replace=False)
        elif not path.read_text().strip():  # left empty by an older rmflow that crashed mid-write
            write_atomic(path, secrets.token_urlsafe(32), mode=0o600)
        secret = path.read_text()
    if not secret.strip():
        raise ValueError("the webhook secret is empty (RMFLOW_WEBHOOK_SECRET); set a non-empty one")
    return secret.strip()


class ProjectWatch(BaseModel):
    """One project the receiver counts labels for (written by `rmflow up`)."""

    project: str = Field(description="Label Studio project title.")
    data_root: str = Field(description="The pipeline's dataset root, where its watermark lives.")
    policy: RetrainPolicy = Field(default_factory=RetrainPolicy)
    deployment: str = PIPELINE_DEPLOYMENT


def watches_file() -> Path:
    return receiver_home() / "projects.json"


def write_watches(watches: list[ProjectWatch]) -> None:
    write_atomic(watches_file(), json.dumps([w.model_dump(mode="json") for w in watches], indent=1, sort_keys=True))


def read_watches() -> dict[str, ProjectWatch]:
    try:
        return {w["project"]: ProjectWatch.model_validate(w) for w in json.loads(watches_file().read_text())}
    except (OSError, ValueError) as e:
        if watches_file().exists():
            log.warning("ignoring unreadable %s (%s)", watches_file(), type(e).__name__)
        return {}


class LabelCount:
    """One project's annotations not yet consumed by a successful run, kept in a state file."""

    def __init__(self, watch: ProjectWatch) -> None:
        self.watch = watch
        # a title may hold any character: the file is named by its hash
        self.path = receiver_home() / "counts" / f"{hashlib.sha256(watch.project.encode()).hexdigest()[:16]}.json"
        self.lock = asyncio.Lock()  # the count and its state file
        self.deciding = asyncio.Lock()  # one decision at a time
        self.watermark, self.pending = Watermark(), {}
        # the last request for a run: when, at which watermark, with how many labels pending
        self.fired_at, self.fired_for, self.fired_count = None, None, 0
        self.stale = True  # recount from Label Studio at the next tick (start, or the watermark moved)
        self._load()

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            self.watermark = Watermark.model_validate(state["watermark"])
            self.pending = dict(state["pending"])
            self.fired_at = datetime.fromisoformat(state["fired_at"]) if state.get("fired_at") else None
            self.fired_for, self.fired_count = state.get("fired_for"), int(state.get("fired_count") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: Label Studio has the truth, recounted at the first tick

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"project": self.watch.project, "watermark": self.watermark.model_dump(), "pending": self.pending, "fired_for": self.fired_for,
                                             "fired_count": self.fired_count,
                                             "fired_at": self.fired_at.isoformat() if self.fired_at else None}))

    def add(self, annotations: list[dict[str, Any]]) -> int:
        added = 0
        for a in annotations:
            stamp = annotation_stamp(a)
            if a.get("id") is not None and not a.get("was_cancelled") and self.watermark.is_new(a["id"], stamp):
                added += str(a["id"]) not in self.pending
                self.pending[str(a["id"])] = stamp
        return added

    def sync_watermark(self) -> None:
        """Reads the pipeline's watermark; when a run moved it, drops what it consumed and recounts."""
        current = read_watermark(Path(self.watch.data_root))
        if current != self.watermark:
            self.watermark = current
            self.pending = {i: s for i, s in self.pending.items() if current.is_new(i, s)}
            self.stale = True

    def status(self) -> dict[str, Any]:
        return {"pending": len(self.pending), "watermark": self.watermark.at, "policy": self.watch.policy.model_dump(),
                "fired_at": self.fired_at.isoformat() if self.fired_at else None, "counted_from_label_studio": not self.stale}


async def recount(count: LabelCount) -> None:
    """Replaces the count with Label Studio's (webhooks lost while the receiver was down are in it);
    annotations that webhooks added while Label Studio answered are kept."""
    from rmflow.infra import labelstudio_api as lst

    def fetch(watermark: Watermark) -> dict[str, str | None]:
        ls = lst.connect(attempts=1)
        return lst.unconsumed_annotations(ls, count.watch.project, watermark)

    before = dict(count.pending)
    watermark = count.watermark
    truth = await anyio.to_thread.run_sync(fetch, watermark)
    async with count.lock:
        if count.watermark == watermark:
            count.pending = {**truth, **{i: s for i, s in count.pending.items() if i not in before}}
            count.stale = False
            count.save()


async def decide(count: LabelCount, prefect_api: str) -> str | None:
    """Applies the project's rule and emits `rmflow.labels.ready` when it says so; returns the reason.

    Decisions for a project take turns (`count.deciding`); the count itself is only locked to read
    and to record, never across a call to Prefect, so webhooks are answered while Prefect is slow."""
    from rmflow.infra.pipeline_runs import pipeline_activity

    async with count.deciding:
        if not count.pending:
            return None
        asked = count.fired_at
        since = asked - timedelta(seconds=2) if asked else None  # the server stamps the run, this process the request
        # runs first, watermark second: a run advances the watermark before it leaves the in-flight
        # states, so a run that ended since is never missed with its labels still counted as new
        activity = await anyio.to_thread.run_sync(pipeline_activity, count.watch.deployment, since)
        async with count.lock:
            count.sync_watermark()
            if not count.pending or count.stale:  # a run just landed: recount first (the next tick does)
                return None
            pending, watermark = dict(count.pending), count.watermark
            asked = count.fired_at if count.fired_for == watermark.at else None
            fired_count = count.fired_count
        now = datetime.now(timezone.utc)
        in_flight = bool(activity.in_flight)
        same = None
        if asked is not None and not activity.created_since:
            # asked, and no run created yet: the trigger is on its way, or the event was lost (ask again)
            in_flight = in_flight or (now - asked).total_seconds() < REQUEST_GRACE_S
        elif asked is not None and len(pending) <= fired_count:
            same = asked  # its run ended without moving the watermark: again after retry_s, or at a new label
        reason = retrain_reason(count.watch.policy, pending, now, in_flight, activity.last_start, same)
        if reason is None:
            return None
        # recorded before posting: a post that fails after Prefect got it (a timeout) has asked, and
        # asking again before REQUEST_GRACE_S would start a second run
        async with count.lock:
            before = count.fired_at, count.fired_for, count.fired_count
            count.fired_at, count.fired_for, count.fired_count = now, watermark.at, len(pending)
            count.save()
        try:
            await emit_ready(prefect_api, count.watch, pending, watermark, reason)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):  # never sent: nothing was asked, ask at the next label or tick
            async with count.lock:
                count.fired_at, count.fired_for, count.fired_count = before
                count.save()
            raise
        log.warning("%s: %d new labels (%s): asked for a pipeline run", count.watch.project, len(pending), reason)
        return reason


async def emit_ready(prefect_api: str, watch: ProjectWatch, pending: dict[str, str | None], watermark: Watermark, reason: str) -> None:
    """Posts the event to the Prefect server and waits for its answer (a queued event that never
    left this process would look fired but start nothing)."""
    event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": LABELS_READY_EVENT,
             "resource": {"prefect.resource.id": project_resource(watch.project), "prefect.resource.name": watch.project},
             "payload": {"new_labels": len(pending), "reason": reason, "watermark": watermark.at,
                         "min_new_labels": watch.policy.min_new_labels}}
    async with httpx.AsyncClient(timeout=10) as client:
        (await client.post(f"{prefect_api.rstrip('/')}/events", json=[event])).raise_for_status()


def body_annotations(body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(project title, annotations) of a webhook body; no annotations for other actions. A
    ValueError names what is malformed."""
    action = body.get("action")
    if not isinstance(action, str):
        raise ValueError("'action' must be a string")
    if action not in ACTIONS:
        return None, []
    project = body.get("project")
    if not isinstance(project, dict) or not isinstance(project.get("title"), str):
        raise ValueError("'project' must be an object with a 'title'")
    annotations = body.get("annotation") or body.get("annotations") or []
    annotations = annotations if isinstance(annotations, list) else [annotations]
    if not all(isinstance(a, dict) for a in annotations):
        raise ValueError("'annotation(s)' must be objects")
    return project["title"], annotations


def create_app(secret: str, prefect_api: str | None = None, tick_s: float = TICK_S) -> Starlette:
    if not secret:
        raise ValueError("refusing to serve webhooks with an empty shared secret")
    prefect_api = prefect_api or os.environ.get("PREFECT_API_URL") or ""
    expected = f"Bearer {secret}".encode()
    counts = {name: LabelCount(w) for name, w in read_watches().items()}

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    async def hook(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "missing or wrong shared secret"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body is not a JSON object"}, status_code=400)
        try:
            project, annotations = body_annotations(body)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        count = counts.get(project or "")
        if count is None or not annotations:
            return JSONResponse({"action": body.get("action"), "counted": 0, "watched": count is not None})
        async with count.lock:
            added = count.add(annotations)
            count.save()
        # answered at once (Label Studio waits for it); the rule runs beside
        task = asyncio.get_running_loop().create_task(_safe(decide(count, prefect_api), project))
        background.add(task)
        task.add_done_callback(background.discard)
        return JSONResponse({"action": body["action"], "counted": added, "pending": len(count.pending)})

    async def status(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "missing or wrong shared secret"}, status_code=401)
        return JSONResponse({"prefect_api": prefect_api, "projects": {n: c.status() for n, c in counts.items()}})

    async def health(_: Request) -> JSONResponse:
        """Unhealthy when the loop that recounts and re-applies the rule has stalled."""
        age = time.monotonic() - last_tick[0]
        ok = age < max(60.0, 10 * tick_s)
        return JSONResponse({"ok": ok, "projects": sorted(counts), "last_tick_s": round(age, 1)}, status_code=200 if ok else 503)

    background: set[asyncio.Task] = set()

    async def tick_once(count: LabelCount) -> None:
        async with count.lock:
            count.sync_watermark()
        if count.stale:
            await recount(count)
        await decide(count, prefect_api)

    last_tick = [time.monotonic()]

    async def tick() -> None:
        while True:
            for name, count in counts.items():
                await _safe(tick_once(count), name)  # a bad watermark file or a service down: logged, tried again
            last_tick[0] = time.monotonic()
            await asyncio.sleep(tick_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        loop = asyncio.get_running_loop().create_task(tick())
        yield
        loop.cancel()

    return Starlette(routes=[Route(HOOK_PATH, hook, methods=["POST"]), Route("/status", status), Route("/health", health)],
                     lifespan=lifespan)


_last_error: dict[str, float] = {}


async def _safe(job, project: str | None) -> Any:
    """Runs a recount or a decision; a service that is down (Label Studio, Prefect) is logged at
    most once a minute per project and tried again at the next tick."""
    try:
        return await job
    except Exception as e:  # noqa: BLE001 — the receiver keeps serving; the next tick retries
        if time.monotonic() - _last_error.get(project or "", -1e9) > 60:
            _last_error[project or ""] = time.monotonic()
            log.warning("%s: %s (%s); retrying every %.0f s", project, str(e).splitlines()[0][:200] if str(e) else "", type(e).__name__, TICK_S)
        return None


def serve(host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(webhook_secret()), host=host, port=port, log_level="warning")
