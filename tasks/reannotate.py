"""Stage 8 (with a strength ensemble), re-annotate: active labelling. The ensemble's most doubtful
train pairs go back to the Label Studio project as two-response tasks tagged `rmflow_reannotate`,
at most `max_tasks` new ones (pairs already sent are skipped). Their labels supersede the old
ones at the next collection."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from rmcore.records import text_id
from rmcore.strength import read_reannotation_candidates
from rmflow.infra.labelstudio_api import connect, ensure_project, import_tasks


def request_reannotation(project: str, strength_dir: Path, max_tasks: int, url: str | None = None) -> dict[str, Any]:
    candidates = read_reannotation_candidates(Path(strength_dir))
    ls = connect(url)
    project_id = ensure_project(ls, project)
    items = [{"prompt": c.prompt, "responses": [c.chosen, c.rejected],
              "reannotate": {"labelled_chosen": text_id(c.chosen), "mean_strength": round(c.mean_strength, 4),
                             "strength_std": round(c.strength_std, 4), "split": c.split}} for c in candidates]
    result = import_tasks(ls, project_id, items, limit=max_tasks)
    return {"candidates": len(candidates), "sent": result["imported"], "project_id": project_id}


reannotate_task = task(request_reannotation, name="re-annotate", retries=3, retry_delay_seconds=[2, 5, 10], tags=["label-studio"])
