"""Stage 2, dataset: a snapshot becomes a versioned pairwise + K-wise dataset (quarantine for bad
annotations, agreement statistics) and the count of rankings newer than the watermark. With the
team's bucket, the version that trains is published there for the training workers."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any

from prefect import task
from scipy.stats import kendalltau

from rmcore.contracts import LabelDataset, LabelSnapshot
from rmcore.converters.common import Quarantine
from rmcore.converters.label_studio import LabelConfig, rankings_from_tasks
from rmcore.dataset import write_preference_dataset
from rmcore.watermark import Watermark, annotation_stamp, is_after, latest
from rmflow.infra.team import DATASETS, object_exists, publish_dataset, team_storage


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


def build_dataset(snapshot: LabelSnapshot, root: Path, watermark: Watermark | None = None) -> LabelDataset:
    """Converts the snapshot into `root/<version>/` (reused when that version exists); staging is
    per run, so concurrent runs never write into one folder. Rankings the watermark has not
    consumed are new (all of them without one)."""
    watermark = watermark or Watermark()
    data = json.loads(Path(snapshot.snapshot).read_text())
    source = f"label-studio:{data['project']}"
    q = Quarantine(source)
    tasks = [(f"task {t.get('id')}", t) for t in data["tasks"]]
    result = rankings_from_tasks(tasks, q, LabelConfig.from_xml(data["label_config"]), source)
    result.quarantined = q.records
    new = [r for r in result.rankings if watermark.is_new(r.meta.get("annotation_id"), r.timestamp)]
    # every annotation the snapshot holds is consumed, quarantined and cancelled ones too: they were
    # seen, and must not count as new labels again at the next poll
    seen = {str(a.get("id")): annotation_stamp(a) for t in data["tasks"] if isinstance(t, dict)
            for a in (t.get("annotations") or []) if isinstance(a, dict)}
    version_dir = None
    if result.rankings:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
        try:  # a failed write (a full disk, say) leaves neither a half version nor its staging behind
            manifest = write_preference_dataset(result, staging / "dataset", {"kind": "label-studio", "project": data["project"]})
            version_dir = root / manifest["version"]
            if not version_dir.exists():
                try:
                    (staging / "dataset").rename(version_dir)
                except OSError:  # another run renamed the same version first: its content is identical
                    if not version_dir.exists():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return LabelDataset(
        dataset=str(version_dir) if version_dir else None, version=version_dir.name if version_dir else None,
        watermark=consumed_watermark(seen, snapshot.cursor), previous_watermark=watermark,
        new_rankings=len(new), total_rankings=len(result.rankings), quarantined=len(result.quarantined),
        cancelled=result.cancelled, superseded=result.superseded, relabelled=result.relabelled,
        unchanged_presented_order=sum(1 for r in result.rankings if r.presented_order
                                      and [i for b in r.order for i in b] == r.presented_order),
        quarantine_reasons=[asdict(x)["reason"] for x in result.quarantined][:20],
        **agreement(result.rankings),
    )


def consumed_watermark(seen: dict[str, str | None], cursor: str | None) -> Watermark:
    """The watermark of a snapshot: its pull's cursor, and the annotations it holds that were
    updated after it. A snapshot without a cursor (an older rmflow's) ends at its newest stamp."""
    at = cursor if cursor is not None else latest(list(seen.values()))
    return Watermark(at=at, consumed={i: s for i, s in seen.items() if s is not None and is_after(s, at)})


def publish_version(dataset: str, project: str, snapshot: str | None = None) -> str | None:
    """With the team's bucket (RMFLOW_STORAGE_URL), copies dataset version `dataset` (manifest last)
    and the snapshot it was built from to s3://…/datasets/<project>/, the layout of
    RMFLOW_HOME/datasets/<project>/: training workers on any node read the version there, never
    from this machine's disk. Returns the version's URI; None without a bucket (all stays local)."""
    store = team_storage()
    if store is None:
        return None
    if snapshot and not object_exists(store, store.key(DATASETS, project, "snapshots", Path(snapshot).name)):
        store.upload_file(Path(snapshot), DATASETS, project, "snapshots", Path(snapshot).name)  # named by its content's hash
    return publish_dataset(Path(dataset), store.uri(DATASETS, project, Path(dataset).name))


dataset_task = task(build_dataset, name="build-dataset")
# the store may be restarting (a SeaweedFS restart takes seconds): retried, then the run fails naming it
publish_task = task(publish_version, name="publish-dataset", retries=2, retry_delay_seconds=[10, 30])
