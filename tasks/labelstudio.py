"""I/O with a real Label Studio: project setup, task import, simulated annotators, pulling rankings.

Connection: LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY, else the local server `rmflow labelstudio up`
started. Tokens are never logged; errors name the URL only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from scipy.stats import kendalltau

from rmcore.converters.common import ConversionResult, Quarantine
from rmcore.converters.label_studio import LabelConfig, rankings_from_tasks
from rmcore.dataset import write_preference_dataset
from rmcore.records import text_id
from rmcore.synthetic import annotator_order

RANKER_NAME, LIST_NAME = "rank", "items"


class LabelStudioError(RuntimeError):
    pass


def ranking_config(k: int) -> str:
    return (f'<View><Header value="Rank the {k} responses, best first"/><Text name="prompt" value="$prompt"/>'
            f'<List name="{LIST_NAME}" value="$items" title="Responses"/><Ranker name="{RANKER_NAME}" toName="{LIST_NAME}"/></View>')


def describe_api_error(e: ApiError) -> str:
    """Status and the server's validation message, without headers (they carry session cookies)."""
    body = e.body if isinstance(e.body, dict) else {}
    return f"Label Studio answered HTTP {e.status_code}: {body.get('validation_errors') or body.get('detail') or 'error'}"


def endpoint(url: str | None = None) -> str:
    """LABEL_STUDIO_URL, else the local server `rmflow labelstudio up` started."""
    if url or os.environ.get("LABEL_STUDIO_URL"):
        return url or os.environ["LABEL_STUDIO_URL"]
    from infra import labelstudio as local

    return local.status()["url"] or ""


def connect(url: str | None = None, token: str | None = None, attempts: int = 4) -> LabelStudio:
    """A checked client: bounded retries with backoff while the server is unreachable, and a clear
    error for a rejected token."""
    url = endpoint(url)
    if token is None:
        from infra import labelstudio as local

        token = os.environ.get("LABEL_STUDIO_API_KEY") or local.credentials()["token"]
    if not url:
        raise LabelStudioError("no Label Studio to talk to: start one with `rmflow labelstudio up` or set LABEL_STUDIO_URL")
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


def ensure_project(ls: LabelStudio, title: str, k: int) -> int:
    """The project with this title, created with a K-response ranking config if missing."""
    for p in ls.projects.list():
        if p.title == title:
            return p.id
    return ls.projects.create(title=title, label_config=ranking_config(k)).id


def task_hash(prompt: str, responses: list[str]) -> str:
    return hashlib.sha256(json.dumps([prompt, sorted(responses)]).encode()).hexdigest()[:20]


def import_tasks(ls: LabelStudio, project_id: int, items: list[dict[str, Any]], seed: int = 0,
                 limit: int | None = None) -> dict[str, int]:
    """Imports `{prompt, responses[], gold?[], order?[], reannotate?{}}` items, at most `limit` new
    ones. Responses are shuffled per task so the presented order carries no signal; re-importing the
    same content adds nothing."""
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
            data["rmflow_reannotate"] = item["reannotate"]
        new.append({"data": data})
    for start in range(0, len(new), 200):
        ls.projects.import_tasks(id=project_id, request=new[start:start + 200])
    return {"imported": len(new), "skipped": len(items) - len(new)}


def request_reannotation(project: str, strength_dir: Path, max_tasks: int, url: str | None = None) -> dict[str, Any]:
    """Active labelling: sends the ensemble's most doubtful pairs of a strength dataset version back
    to the project as two-response tasks tagged `rmflow_reannotate`, at most `max_tasks` new ones
    (pairs already sent are skipped). Their labels supersede the old ones at the next collection."""
    from tasks.strength import read_reannotation_candidates

    candidates = read_reannotation_candidates(strength_dir)
    ls = connect(url)
    project_id = ensure_project(ls, project, 4)
    items = [{"prompt": c.prompt, "responses": [c.chosen, c.rejected],
              "reannotate": {"labelled_chosen": text_id(c.chosen), "mean_strength": round(c.mean_strength, 4),
                             "strength_std": round(c.strength_std, 4), "split": c.split}} for c in candidates]
    result = import_tasks(ls, project_id, items, limit=max_tasks)
    return {"candidates": len(candidates), "sent": result["imported"], "project_id": project_id}


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
    from infra import labelstudio as local

    url = endpoint(url)
    admin = connect(url)
    submitted = 0
    for a in range(annotators):
        email = f"sim-{a}@rmflow.local"
        me = connect(url, local.create_user(email))
        my_id = me.users.whoami().id
        rng = random.Random(f"{seed}:{a}")
        for task in admin.tasks.list(project=project_id, fields="all"):
            if task_ids is not None and task.id not in task_ids:
                continue
            if any(_annotation_user(an) == my_id for an in task.annotations or []):
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


def _annotation_user(annotation: Any) -> Any:
    by = annotation.get("completed_by") if isinstance(annotation, dict) else getattr(annotation, "completed_by", None)
    return by.get("id") if isinstance(by, dict) else by


def pull_tasks(ls: LabelStudio, project_id: int) -> list[dict[str, Any]]:
    """Every task with its annotations (plain iteration: the pager follows the pages)."""
    return [t.model_dump(mode="json") for t in ls.tasks.list(project=project_id, fields="all")]


def agreement(rankings) -> dict[str, float]:
    """Mean pairwise agreement and Kendall τ between annotators of the same task."""
    by_task: dict[Any, list] = {}
    for r in rankings:
        by_task.setdefault(r.meta.get("task_id"), []).append(r)
    agree, taus = [], []
    for rs in by_task.values():
        for a, b in combinations(rs, 2):
            pos_a = {i: n for n, block in enumerate(a.order) for i in block}
            pos_b = {i: n for n, block in enumerate(b.order) for i in block}
            common = sorted(set(pos_a) & set(pos_b))
            if len(common) < 2:
                continue
            pairs = list(combinations(common, 2))
            agree.append(sum((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) for x, y in pairs) / len(pairs))
            taus.append(kendalltau([pos_a[i] for i in common], [pos_b[i] for i in common]).statistic)
    return {"agreement": sum(agree) / len(agree) if agree else float("nan"),
            "kendall_tau": sum(taus) / len(taus) if taus else float("nan"), "multi_annotated_tasks": len(agree)}


def pull_snapshot(project: str, out_dir: Path, url: str | None = None) -> dict[str, Any]:
    """Fetches every task with its annotations and the label config into a snapshot file named by
    its content hash (same labels → same file). Returns the snapshot's path and label counts."""
    ls = connect(url)
    project_id = ensure_project(ls, project, 4)
    snapshot = {"project": project, "label_config": ls.projects.get(id=project_id).label_config,
                "tasks": pull_tasks(ls, project_id)}
    blob = json.dumps(snapshot, sort_keys=True).encode()
    path = Path(out_dir) / "snapshots" / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return {"snapshot": str(path), "annotations": sum(len(t.get("annotations") or []) for t in snapshot["tasks"])}


def dataset_from_snapshot(snapshot_path: Path, out_dir: Path, watermark: str | None) -> dict[str, Any]:
    """Converts a snapshot into `out_dir/<version>/` (reused when that version exists) and counts
    the rankings submitted or updated after `watermark`."""
    snapshot = json.loads(Path(snapshot_path).read_text())
    source = f"label-studio:{snapshot['project']}"
    q = Quarantine(source)
    tasks = [(f"task {t.get('id')}", t) for t in snapshot["tasks"]]
    result: ConversionResult = rankings_from_tasks(tasks, q, LabelConfig.from_xml(snapshot["label_config"]), source)
    result.quarantined = q.records
    new = [r for r in result.rankings if watermark is None or (r.timestamp or "") > watermark]
    version_dir = None
    if result.rankings:
        staging = Path(out_dir) / ".staging-dataset"
        manifest = write_preference_dataset(result, staging, {"kind": "label-studio", "project": snapshot["project"]})
        version_dir = Path(out_dir) / manifest["version"]
        if version_dir.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(version_dir)
    stamps = [r.timestamp for r in result.rankings if r.timestamp] + [watermark or ""]
    return {
        "new_rankings": len(new), "total_rankings": len(result.rankings), "quarantined": len(result.quarantined),
        "cancelled": result.cancelled, "superseded": result.superseded, "relabelled": result.relabelled, "watermark": max(stamps) or None,
        "previous_watermark": watermark, "dataset": str(version_dir) if version_dir else None,
        "version": version_dir.name if version_dir else None,
        "unchanged_presented_order": sum(1 for r in result.rankings if r.presented_order
                                         and [i for b in r.order for i in b] == r.presented_order),
        "quarantine_reasons": [asdict(x)["reason"] for x in result.quarantined][:20],
        **agreement(result.rankings),
    }


def collect_rankings(project: str, out_dir: Path, url: str | None = None) -> dict[str, Any]:
    """Snapshot + dataset, with the watermark kept in `out_dir/collect_state.json` (the CLI's
    bookkeeping; flows keep theirs in a Prefect Variable)."""
    state_file = Path(out_dir) / "collect_state.json"
    watermark = json.loads(state_file.read_text())["watermark"] if state_file.is_file() else None
    snap = pull_snapshot(project, out_dir, url)
    return dataset_from_snapshot(Path(snap["snapshot"]), out_dir, watermark) | snap


def commit_watermark(out_dir: Path, watermark: str | None) -> None:
    """Advances the collect watermark; flows call this only after the pipeline succeeded."""
    path = Path(out_dir) / "collect_state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"watermark": watermark}))
