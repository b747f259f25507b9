"""Talking to a Label Studio server (the local one `rmflow labelstudio up` runs, or LABEL_STUDIO_URL
with LABEL_STUDIO_API_KEY): a checked client, projects, task import, simulated annotators.

Tokens are never logged; every error names the URL, the status and the server's message, never
request headers (they carry session cookies and the token).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from rmcore.names import DEFAULT_RESPONSES, REANNOTATE_FIELD
from rmcore.synthetic import annotator_order
from rmcore.watermark import Watermark, annotation_stamp

RANKER_NAME, LIST_NAME = "rank", "items"


class LabelStudioError(RuntimeError):
    pass


# Label Studio's Ranker prints each item's id (r0…r3, the order rmflow generated the responses in)
# under its text: noise for annotators and a hint at the source order. The id line is the item's last
# paragraph (libs/editor/src/components/Ranker/Item.tsx); the annotator sees title and text only.
# (No child combinator: the Style tag HTML-escapes ">".)
HIDE_ITEM_IDS = "<Style>.htx-ranker-item p:last-of-type { display: none; }</Style>"


def ranking_config(k: int) -> str:
    return (f'<View>{HIDE_ITEM_IDS}<Header value="Rank the {k} responses, best first"/><Text name="prompt" value="$prompt"/>'
            f'<List name="{LIST_NAME}" value="$items" title="Responses"/><Ranker name="{RANKER_NAME}" toName="{LIST_NAME}"/></View>')


def describe_api_error(e: ApiError) -> str:
    """Status and the server's validation message, without headers (they carry session cookies)."""
    body = e.body if isinstance(e.body, dict) else {}
    return f"Label Studio answered HTTP {e.status_code}: {body.get('validation_errors') or body.get('detail') or 'error'}"


@contextmanager
def api_errors() -> Iterator[None]:
    """Turns the SDK's errors (whose text includes request headers) into a LabelStudioError that
    names only the status and the server's message; used around every call a task makes."""
    try:
        yield
    except ApiError as e:
        raise LabelStudioError(describe_api_error(e)) from None
    except (httpx.HTTPError, OSError) as e:
        raise LabelStudioError(f"Label Studio request failed ({type(e).__name__})") from None


def endpoint(url: str | None = None) -> str:
    """LABEL_STUDIO_URL, else the local server `rmflow labelstudio up` started."""
    if url or os.environ.get("LABEL_STUDIO_URL"):
        return url or os.environ["LABEL_STUDIO_URL"]
    from rmflow.infra import labelstudio as local

    return local.status()["url"] or ""


def connect(url: str | None = None, token: str | None = None, attempts: int = 4) -> LabelStudio:
    """A checked client: bounded retries with backoff while the server is unreachable, and a clear
    error for a rejected token."""
    url = endpoint(url)
    if token is None:
        from rmflow.infra import labelstudio as local

        token = os.environ.get("LABEL_STUDIO_API_KEY") or local.credentials()["token"]
    if not url:
        raise LabelStudioError("Label Studio is not running: LABEL_STUDIO_URL is not set and the local server rmflow "
                               "manages is down; start it with `rmflow labelstudio up` (or `rmflow up`)")
    client = LabelStudio(base_url=url, api_key=token, timeout=30)
    for attempt in range(attempts):
        try:
            client.users.whoami()
            return client
        except ApiError as e:
            if e.status_code in (401, 403):
                raise LabelStudioError(f"Label Studio at {url} rejected the API token (HTTP {e.status_code}); "
                                       "check LABEL_STUDIO_API_KEY") from None
            last = f"HTTP {e.status_code}"
        except (httpx.HTTPError, OSError) as e:
            last = type(e).__name__
        if attempt < attempts - 1:
            time.sleep(min(2 ** attempt, 8))
    raise LabelStudioError(f"Label Studio at {url} is unreachable after {attempts} attempts ({last})")


def find_project(ls: LabelStudio, title: str) -> int | None:
    """The id of the project with this title, or None."""
    with api_errors():
        return next((p.id for p in ls.projects.list() if p.title == title), None)


def ensure_project(ls: LabelStudio, title: str, k: int = DEFAULT_RESPONSES) -> int:
    """The project with this title; created with a K-response ranking config if missing (`k` only
    matters then)."""
    found = find_project(ls, title)
    if found is not None:
        return found
    with api_errors():
        return ls.projects.create(title=title, label_config=ranking_config(k)).id


WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"]


RMFLOW_HOOK_HEADER = "X-Rmflow-Hook"  # marks the webhooks rmflow registers (the receiver ignores it)


def ensure_webhook(ls: LabelStudio, project_id: int, url: str, secret: str) -> int:
    """Registers (or updates) the project's webhook to rmflow's receiver at `url`, sending the
    shared secret as a bearer token; returns its id. The project's other rmflow webhooks (to a
    receiver's earlier address) are deleted: each would keep posting the secret to a port that
    anything may listen on next. Webhooks rmflow did not register are left alone."""
    headers = {"Authorization": f"Bearer {secret}", RMFLOW_HOOK_HEADER: "receiver"}
    settings = {"url": url, "headers": headers, "actions": WEBHOOK_ACTIONS, "is_active": True, "send_payload": True,
                "send_for_all_actions": False}
    with api_errors():
        hooks = [h for h in ls.webhooks.list(project=str(project_id)) if h.project == project_id]
        kept = next((h.id for h in hooks if h.url == url), None)
        if kept is None:
            kept = ls.webhooks.create(project=project_id, **settings).id
        else:
            ls.webhooks.update(id=kept, **settings)
        for hook in hooks:  # after the new one exists: no moment without a hook
            if hook.id != kept and is_rmflow_hook(hook, urlparse(url).path):
                ls.webhooks.delete(id=hook.id)
    return kept


def is_rmflow_hook(hook: Any, path: str) -> bool:
    """A webhook rmflow registered: it carries RMFLOW_HOOK_HEADER, or (registered before that header
    existed) it has exactly rmflow's shape: a bearer token as its only header, rmflow's actions, and
    the receiver's `path` on a loopback address."""
    headers = hook.headers or {}
    if RMFLOW_HOOK_HEADER in headers:
        return True
    target = urlparse(hook.url or "")
    return (set(headers) == {"Authorization"} and str(headers["Authorization"]).startswith("Bearer ")
            and set(hook.actions or []) == set(WEBHOOK_ACTIONS) and target.path == path
            and target.hostname in ("127.0.0.1", "localhost"))


def task_hash(prompt: str, responses: list[str]) -> str:
    return hashlib.sha256(json.dumps([prompt, sorted(responses)]).encode()).hexdigest()[:20]


def import_tasks(ls: LabelStudio, project_id: int, items: list[dict[str, Any]], seed: int = 0,
                 limit: int | None = None) -> dict[str, int]:
    """Imports `{prompt, responses[], gold?[], order?[], reannotate?{}}` items, at most `limit` new
    ones. Responses are shuffled per task so the presented order carries no signal; re-importing the
    same content adds nothing."""
    with api_errors():
        existing = {t.data.get("rmflow_hash") for t in ls.tasks.list(project=project_id, fields="all")}
    rng = random.Random(seed)
    new = []
    for item in items:
        h = task_hash(item["prompt"], item["responses"])
        if h in existing or (limit is not None and len(new) >= limit):
            continue
        existing.add(h)
        order = list(range(len(item["responses"])))
        rng.shuffle(order)
        data = {"prompt": item["prompt"], "rmflow_hash": h,
                "items": [{"id": f"r{i}", "title": f"Response {n + 1}", "body": item["responses"][i]} for n, i in enumerate(order)]}
        # hidden from the labelling view: what simulated annotators rank by
        if "gold" in item:
            data["rmflow_gold"] = {f"r{i}": item["gold"][i] for i in order}
        if "order" in item:
            data["rmflow_order"] = [f"r{i}" for i in item["order"]]
        if "reannotate" in item:  # a Data Manager column to filter by; collection lets these labels win
            data[REANNOTATE_FIELD] = item["reannotate"]
        new.append({"data": data})
    with api_errors():
        for start in range(0, len(new), 200):
            ls.projects.import_tasks(id=project_id, request=new[start:start + 200])
    return {"imported": len(new), "skipped": len(items) - len(new)}


DM_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the one datetime format Label Studio's task filters parse (UTC)
PAGE_SIZE = 500


def task_query(updated_after: str | None = None, id_after: int | None = None) -> str:
    """A Data Manager query, tasks ordered by id: those updated strictly after `updated_after` (any
    ISO 8601; a task's `updated_at` moves whenever one of its annotations is created, updated or
    deleted) and with an id above `id_after`."""
    from datetime import timezone

    from rmcore.watermark import parse_time

    items = []
    if updated_after is not None:
        when = parse_time(updated_after)
        if when is None:
            raise ValueError(f"not a timestamp: {updated_after!r}")
        items.append({"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
                      "value": when.astimezone(timezone.utc).strftime(DM_TIME)})
    if id_after is not None:
        items.append({"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": id_after})
    return json.dumps({"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]})


def _pages_by_id(ls: LabelStudio, project_id: int, updated_after: str | None, page_size: int,
                 on_page: Callable[[int], None] | None = None, **fields: str) -> Iterator[list[Any]]:
    """The project's tasks a page at a time, paged by id, not by page number: each page asks for the
    tasks above the last id read, so a task deleted (or created) while earlier pages are read shifts
    nothing and no task is skipped. Ends at an empty page, not a short one: a server may cap
    page_size below ours (TASK_API_PAGE_SIZE_MAX). `on_page(n)` is called after the n-th page."""
    last_id, pages = None, 0
    with api_errors():
        while True:
            page = ls.tasks.list(project=project_id, query=task_query(updated_after, last_id), page=1, page_size=page_size,
                                 **fields).items or []
            pages += 1
            if on_page is not None:
                on_page(pages)
            if not page:
                return
            yield page
            last_id = max(t.id for t in page)


def pull_tasks(ls: LabelStudio, project_id: int, updated_after: str | None = None, page_size: int = PAGE_SIZE,
               on_page: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Tasks with their annotations, sorted by id: every task, or only those updated after
    `updated_after` (filtered by the server). `on_page(n)` is called after the n-th page is read
    (progress; tests change the project there)."""
    tasks = [_stable(t.model_dump(mode="json")) for page in _pages_by_id(ls, project_id, updated_after, page_size, on_page, fields="all")
             for t in page]
    return sorted(tasks, key=lambda t: t["id"])


def unconsumed_annotations(ls: LabelStudio, project: str, watermark: Watermark) -> dict[str, str | None]:
    """The project's submitted (not cancelled) annotations that the watermark has not consumed, as
    annotation id → `updated_at`; only tasks updated after the watermark are fetched. Counting
    never creates the project (a typo in a shared Label Studio would): none, no labels."""
    project_id = find_project(ls, project)
    if project_id is None:
        return {}
    tasks = pull_tasks(ls, project_id, updated_after=watermark.at)
    return {str(a["id"]): annotation_stamp(a) for t in tasks for a in t.get("annotations") or []
            if isinstance(a, dict) and not a.get("was_cancelled") and watermark.is_new(a.get("id"), annotation_stamp(a))}


def server_time(url: str | None = None) -> str:
    """Now on Label Studio's clock (its HTTP Date header, whole seconds, rounded down), so a
    collection cursor never depends on this machine's clock agreeing with the server's."""
    from email.utils import parsedate_to_datetime

    base = endpoint(url).rstrip("/")
    try:
        resp = httpx.get(f"{base}/health", timeout=10)
    except (httpx.HTTPError, OSError) as e:
        raise LabelStudioError(f"Label Studio at {base} is unreachable ({type(e).__name__})") from None
    date = resp.headers.get("date")
    if not date:
        raise LabelStudioError(f"Label Studio at {base} sent no Date header; cannot read its clock")
    return parsedate_to_datetime(date).isoformat()


VOLATILE = ("created_ago",)  # "12 minutes": changes with the clock, not with the labels


def _stable(task: dict[str, Any]) -> dict[str, Any]:
    """The task without fields that change while its labels do not, so the same labels always
    give the same snapshot bytes (and a merged snapshot equals a full pull)."""
    for key in ("annotations", "predictions", "drafts"):
        for item in task.get(key) or []:
            if isinstance(item, dict):
                for field in VOLATILE:
                    item.pop(field, None)
    return task


def project_task_count(ls: LabelStudio, project_id: int) -> int:
    with api_errors():
        return ls.projects.get(id=project_id).task_number or 0


def task_ids(ls: LabelStudio, project_id: int) -> set[int]:
    """Every task id of the project (no data, no annotations): which tasks exist, for finding
    deleted ones."""
    return {t.id for page in _pages_by_id(ls, project_id, None, 5000, fields="task_only", include="id") for t in page}


def label_config(ls: LabelStudio, project_id: int) -> str:
    with api_errors():
        return ls.projects.get(id=project_id).label_config


def items_from_file(path: Path) -> list[dict[str, Any]]:
    """Tasks to import from JSONL: `{prompt, responses[], gold?[], order?[]}` lines, or the
    `rankings.jsonl` of a converted dataset, whose human orders simulated annotators then replay
    (ties are replayed in their listed order)."""
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "completions" in rec and "order" in rec:
            ids = [c["id"] for c in rec["completions"]]
            rec = {"prompt": rec["prompt"], "responses": [c["text"] for c in rec["completions"]],
                   "order": [ids.index(i) for block in rec["order"] for i in block]}
        items.append(rec)
    return items


def ranker_result(order: list[str]) -> list[dict[str, Any]]:
    return [{"from_name": RANKER_NAME, "to_name": LIST_NAME, "type": "ranker", "value": {"ranker": {RANKER_NAME: order}}}]


def simulate_annotators(project_id: int, annotators: int, noise: float = 0.5, seed: int = 0,
                        url: str | None = None, task_ids: list[int] | None = None) -> dict[str, int]:
    """Real Label Studio users who rank each task they have not yet annotated, through the API as a
    person would: by the hidden gold reward plus Gumbel noise, or replaying a recorded human order."""
    from rmflow.infra import labelstudio as local

    url = endpoint(url)
    admin = connect(url)
    submitted = 0
    with api_errors():
        for a in range(annotators):
            email = f"sim-{a}@rmflow.local"
            me = connect(url, local.create_user(email))
            my_id = me.users.whoami().id
            rng = random.Random(f"{seed}:{a}")
            # given ids: fetch only those tasks (a 20,000-task project is not listed for 50 labels)
            tasks = admin.tasks.list(project=project_id, fields="all") if task_ids is None else (admin.tasks.get(id=i) for i in task_ids)
            for task in tasks:
                if any(annotation_user(an) == my_id for an in task.annotations or []):
                    continue
                me.annotations.create(id=task.id, result=ranker_result(simulated_order(task.data, noise, rng)),
                                      lead_time=round(rng.uniform(5, 60), 1))
                submitted += 1
    return {"annotators": annotators, "submitted": submitted}


def simulated_order(data: dict[str, Any], noise: float, rng: random.Random) -> list[str]:
    if data.get("rmflow_order"):
        return list(data["rmflow_order"])
    ids = [item["id"] for item in data["items"]]
    gold = data.get("rmflow_gold") or {}
    return [ids[i] for i in annotator_order([gold.get(i, 0.0) for i in ids], noise, rng)]


def annotation_user(annotation: Any) -> Any:
    by = annotation.get("completed_by") if isinstance(annotation, dict) else getattr(annotation, "completed_by", None)
    return by.get("id") if isinstance(by, dict) else by
