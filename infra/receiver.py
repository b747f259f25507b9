"""Label Studio webhooks → Prefect events: the small receiver `rmflow up` runs for event-driven
retraining.

Label Studio POSTs each annotation created or updated to `/labelstudio` with the shared secret in
its Authorization header (the webhook rmflow registers carries it); the receiver answers at once and
emits one Prefect event per submitted annotation (`rmflow.annotation.created|updated`, resource
`rmflow.labelstudio.project.<id>` named by the project title). A deployment trigger on
`reward-pipeline` counts them (`flows/deploy.py`). Skipped (cancelled) annotations emit nothing.

Bound to 127.0.0.1 unless told otherwise; the secret comes from RMFLOW_WEBHOOK_SECRET or a file
under RMFLOW_HOME readable by its owner only, and is never logged.
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rmcore.names import ANNOTATION_EVENT, project_resource
from rmcore.paths import rmflow_home

HOOK_PATH = "/labelstudio"
# Label Studio action → event suffix; ANNOTATIONS_CREATED is a bulk import with annotations
ACTIONS = {"ANNOTATION_CREATED": "created", "ANNOTATIONS_CREATED": "created", "ANNOTATION_UPDATED": "updated"}


def receiver_home() -> Path:
    return rmflow_home() / "receiver"


def webhook_secret() -> str:
    """RMFLOW_WEBHOOK_SECRET, else one generated once and kept in a mode-600 file."""
    if os.environ.get("RMFLOW_WEBHOOK_SECRET"):
        return os.environ["RMFLOW_WEBHOOK_SECRET"]
    path = receiver_home() / "secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def events_for(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The Prefect events (as emit_event keyword arguments) for one webhook body."""
    suffix = ACTIONS.get(body.get("action"))
    project = body.get("project")
    if suffix is None or not isinstance(project, dict) or "id" not in project:
        return []
    annotations = body.get("annotation") or body.get("annotations") or []
    annotations = annotations if isinstance(annotations, list) else [annotations]
    resource = {"prefect.resource.id": project_resource(project["id"]), "prefect.resource.name": str(project.get("title", ""))}
    return [{"event": f"{ANNOTATION_EVENT}.{suffix}", "resource": resource,
             "payload": {"annotation": a.get("id"), "task": a.get("task"), "completed_by": a.get("completed_by")}}
            for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]


def create_app(secret: str) -> Starlette:
    from prefect.events import emit_event

    expected = f"Bearer {secret}".encode()

    async def hook(request: Request) -> JSONResponse:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return JSONResponse({"error": "missing or wrong shared secret"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body is not a JSON object"}, status_code=400)
        # emit_event only queues: Prefect's events worker sends in the background, so Label
        # Studio's webhook (1 s timeout) is answered at once
        emitted = [emit_event(**e) for e in events_for(body)]
        return JSONResponse({"action": body.get("action"), "events": sum(1 for e in emitted if e is not None)})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route(HOOK_PATH, hook, methods=["POST"]), Route("/health", health)])


def serve(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(webhook_secret()), host=host, port=port, log_level="warning")
