"""Moving an embedded install (SQLite MLflow with local artifacts, dataset folders under
RMFLOW_HOME) onto the team backends (MLflow on PostgreSQL with artifacts in the bucket, datasets in
the bucket). `rmflow migrate` is the command; README "Team deployment" the steps.

What is copied, and how a rerun knows it was (nothing is ever deleted or changed in the source):

- MLflow: every registered model (description, tags), each version in version order: its model
  files re-uploaded *through the target server* (so they land where that server keeps artifacts: the
  bucket), its description and tags, and its source run (params, full metric history, tags, run
  artifacts such as `hf_model/`) in an experiment of the same name. Each target version carries
  MIGRATED_FROM = "NAME/VERSION:RUN_ID" of its source (the run id, unique across installs, keeps
  two people's "reward-model/1" apart when both move into one registry), each target run
  MIGRATED_FROM_RUN = the source run id: a rerun finds them and copies nothing twice. A version's
  `run_id` tag (what rmflow's stages read) names the target run; the source's is kept in
  SOURCE_RUN_ID. Then the aliases (champion…), each set
  to the target version its source version became. An alias the target already points at a version
  that did not come from this migration (the team promoted its own) is left alone and reported.
  Not copied: legacy stages, run inputs (dataset lineage; the `dataset_version` tags stay), traces.
- Dataset versions: every file under the data root (snapshots, versions with their manifests and
  splits, the label watermark) to the same relative key under the bucket prefix, each object with its
  sha256 in its metadata and read back and hashed after writing; a rerun skips objects whose recorded
  sha256 equals the local file's. Manifests go last, as in team.publish_dataset, so a reader that
  finds a manifest finds its whole version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmcore.dataset import file_sha256
from rmflow.infra import objectstore, team
from rmflow.infra.process import ServiceError

log = logging.getLogger("rmflow.infra")

MIGRATED_FROM = "rmflow.migrated_from"  # on a target version: source_key() of the version it was copied from
MIGRATED_FROM_RUN = "rmflow.migrated_from_run"  # on a target run: the source run's id
SOURCE_RUN_ID = "rmflow.source_run_id"  # a migrated version's source run id (its run_id tag names the new run)
SHA_META = "sha256"  # S3 object metadata key holding the file's sha256
METRIC_BATCH = 1000  # MLflow's log_batch limit on metrics per call
PARAM_BATCH = 100


def _redact(uri: str) -> str:
    """A tracking URI fit for the result line: a database URL's password hidden."""
    return team.redact(uri) if "://" in uri else uri


@dataclass
class ModelsReport:
    models: list[str] = field(default_factory=list)
    versions: list[dict[str, str]] = field(default_factory=list)  # {name, source_version, version, copied}
    aliases: list[dict[str, str]] = field(default_factory=list)  # {name, alias, version, set}
    runs_copied: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models, "versions": self.versions, "aliases": self.aliases, "runs_copied": self.runs_copied,
                "versions_copied": sum(v["copied"] for v in self.versions)}


def source_key(sv) -> str:
    """What identifies a source version across installs: its name and number, and its run id (or,
    without a run, its creation time in ms)."""
    return f"{sv.name}/{sv.version}:{sv.run_id or sv.creation_timestamp}"


def _pages(call, **kwargs) -> list:
    out, token = [], None
    while True:
        page = call(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def migrate_models(source_uri: str, target_uri: str, names: list[str] | None = None) -> dict[str, Any]:
    """Copies the registered models of `source_uri` (a tracking URI: the embedded sqlite:/// store, or
    a server) into the MLflow server `target_uri`; only `names` when given. Safe to run again."""
    from mlflow import MlflowClient

    if not target_uri.startswith("http"):
        # artifacts must go through the server to land in its store; a database URI would write
        # them wherever this machine's experiment says (a local folder)
        raise ValueError(f"the target must be an MLflow server (http://…), not {_redact(target_uri)}")
    src, dst = MlflowClient(source_uri, source_uri), MlflowClient(target_uri, target_uri)
    report = ModelsReport()
    run_map: dict[str, str] = {}  # source run id → target run id
    for rm in sorted(_pages(src.search_registered_models), key=lambda m: m.name):
        if names and rm.name not in names:
            continue
        report.models.append(rm.name)
        _ensure_registered_model(dst, rm)
        done = {v.tags.get(MIGRATED_FROM): v for v in _pages(dst.search_model_versions, filter_string=f"name='{rm.name}'")}
        mapping: dict[str, str] = {}
        for sv in sorted(_pages(src.search_model_versions, filter_string=f"name='{rm.name}'"), key=lambda v: int(v.version)):
            key = source_key(sv)
            if key in done:
                mapping[str(sv.version)] = str(done[key].version)
                report.versions.append({"name": rm.name, "source_version": str(sv.version), "version": str(done[key].version), "copied": False})
                continue
            tv = _copy_version(src, dst, source_uri, sv, run_map, report)
            mapping[str(sv.version)] = str(tv.version)
            report.versions.append({"name": rm.name, "source_version": str(sv.version), "version": str(tv.version), "copied": True})
        report.aliases.extend(_copy_aliases(src, dst, rm.name, mapping))
    return {"from": _redact(source_uri), "to": _redact(target_uri), **report.as_dict()}


def _ensure_registered_model(dst, rm) -> None:
    from mlflow.exceptions import MlflowException

    try:
        dst.get_registered_model(rm.name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # the server down or refusing us is not "missing"
            raise
        dst.create_registered_model(rm.name, tags=dict(rm.tags or {}), description=rm.description or None)


def _copy_version(src, dst, source_uri: str, sv, run_map: dict[str, str], report: ModelsReport):
    """One source version → a new target version (its run first, then its files, then the version)."""
    import mlflow

    run_id = None
    if sv.run_id:
        if sv.run_id not in run_map:
            run_map[sv.run_id], copied = _copy_run(src, dst, source_uri, sv.run_id)
            report.runs_copied += copied
        run_id = run_map[sv.run_id]
    tags = {**dict(sv.tags or {}), MIGRATED_FROM: source_key(sv)}
    if sv.run_id:
        tags[SOURCE_RUN_ID] = sv.run_id
        if tags.get("run_id") == sv.run_id:
            tags["run_id"] = run_id
    if str(sv.source).startswith("runs:/") and sv.run_id:
        # the model lives in its run's artifacts, which _copy_run copied to the same path
        source = f"runs:/{run_id}/{str(sv.source).split('/', 2)[2]}" if str(sv.source).count("/") >= 2 else str(sv.source)
        model_id = None
    else:
        # an MLflow 3 logged model (models:/m-…) or a plain artifact location: its files through the
        # target server into a logged model of the target's own
        with tempfile.TemporaryDirectory(prefix="rmflow-migrate-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=src.get_model_version_download_uri(sv.name, sv.version),
                                                        dst_path=tmp, tracking_uri=source_uri)
            experiment_id = dst.get_run(run_id).info.experiment_id if run_id else _experiment(dst, "Default")
            lm = dst.create_logged_model(experiment_id, name=_logged_name(src, sv), source_run_id=run_id,
                                         tags={MIGRATED_FROM: source_key(sv)})
            dst.log_model_artifacts(lm.model_id, local)
            dst.finalize_logged_model(lm.model_id, "READY")
        source, model_id = f"models:/{lm.model_id}", lm.model_id
    # the tags go in with the version itself: a version without MIGRATED_FROM never exists, so a
    # rerun after a crash here copies it again instead of skipping a half-tagged one
    return dst.create_model_version(sv.name, source, run_id=run_id, tags=tags, description=sv.description or None, model_id=model_id)


def _logged_name(src, sv) -> str:
    """The source logged model's name (e.g. `reward_model`), else the version's name."""
    source = str(sv.source)
    if source.startswith("models:/m-"):
        try:
            return src.get_logged_model(source.removeprefix("models:/")).name
        except Exception:  # noqa: BLE001 — a name only: the version's name will do
            pass
    return sv.name


def _experiment(dst, name: str) -> str:
    found = dst.get_experiment_by_name(name)
    return found.experiment_id if found else dst.create_experiment(name)


def _copy_run(src, dst, source_uri: str, source_run_id: str) -> tuple[str, int]:
    """The target run copied from `source_run_id` (params, metric history, tags, artifacts), reusing
    one an earlier migration finished; returns its id and 1 if it was copied now, else 0."""
    import mlflow
    from mlflow.entities import Metric, Param

    run = src.get_run(source_run_id)
    experiment_name = src.get_experiment(run.info.experiment_id).name
    experiment_id = _experiment(dst, experiment_name)
    earlier = dst.search_runs([experiment_id], filter_string=f"tags.`{MIGRATED_FROM_RUN}` = '{source_run_id}'",
                              max_results=10)
    finished = [r for r in earlier if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id, 0
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k in ("mlflow.runName", "mlflow.note.content",
                                                                                          "mlflow.source.name", "mlflow.source.git.commit")}
    tags[MIGRATED_FROM_RUN] = source_run_id
    new = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    rid = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), PARAM_BATCH):
        dst.log_batch(rid, params=params[i:i + PARAM_BATCH])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics for m in src.get_metric_history(source_run_id, key)]
    for i in range(0, len(metrics), METRIC_BATCH):
        dst.log_batch(rid, metrics=metrics[i:i + METRIC_BATCH])
    with tempfile.TemporaryDirectory(prefix="rmflow-migrate-run-") as tmp:
        if src.list_artifacts(source_run_id):
            local = mlflow.artifacts.download_artifacts(run_id=source_run_id, dst_path=tmp, tracking_uri=source_uri)
            dst.log_artifacts(rid, local)
    # FINISHED last: an unfinished copy (a crash above) is never reused, a finished one always
    dst.set_terminated(rid, "FINISHED", end_time=run.info.end_time)
    return rid, 1


def _copy_aliases(src, dst, name: str, mapping: dict[str, str]) -> list[dict[str, Any]]:
    """Each source alias on the target version its version became; an alias the target points at a
    version that did not come from this source (the team's own, or another install's migration) is
    kept and reported."""
    out = []
    from_here = set(mapping.values())
    target_aliases = dst.get_registered_model(name).aliases or {}
    for alias, version in sorted((src.get_registered_model(name).aliases or {}).items()):
        want = mapping.get(str(version))
        if want is None:
            continue
        have = target_aliases.get(alias)
        row = {"name": name, "alias": alias, "version": want, "set": False}
        if have is not None and str(have) != want and str(have) not in from_here:
            row.update(kept=str(have), note="a version that did not come from this source holds this alias; left alone")
            out.append(row)
            continue
        if str(have) != want:
            dst.set_registered_model_alias(name, alias, want)
            row["set"] = True
        out.append(row)
    return out


# ---- dataset versions -----------------------------------------------------------------------


def migrate_datasets(data_root: Path, store: team.Storage, *parts: str) -> dict[str, Any]:
    """Copies every file under `data_root` to s3://bucket/prefix/parts/<relative path>, each verified
    by reading it back and comparing sha256; skips objects already there with the same sha256.
    Returns the counts and the dataset versions (folders with a manifest.json) now in the bucket."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"no data root at {data_root}: nothing to migrate (pass --data-from)")
    from botocore.exceptions import ClientError

    s3 = store.client()
    files = sorted((p for p in data_root.rglob("*") if p.is_file()), key=lambda p: (p.name == "manifest.json", str(p)))
    copied = skipped = nbytes = 0
    for path in files:
        key = store.key(*parts, path.relative_to(data_root).as_posix())
        digest = file_sha256(path)
        try:
            try:
                if s3.head_object(Bucket=store.bucket, Key=key).get("Metadata", {}).get(SHA_META) == digest:
                    skipped += 1
                    continue
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
            s3.upload_file(str(path), store.bucket, key, ExtraArgs={"Metadata": {SHA_META: digest}})
            h = hashlib.sha256()
            for chunk in s3.get_object(Bucket=store.bucket, Key=key)["Body"].iter_chunks(1 << 20):
                h.update(chunk)
        except Exception as e:  # noqa: BLE001 — one clear error naming the store
            raise store.describe_error(e, f"copying {path} to s3://{store.bucket}/{key}") from None
        if h.hexdigest() != digest:
            raise ServiceError(f"s3://{store.bucket}/{key} reads back with sha256 {h.hexdigest()}, not {digest} ({path}): "
                               "the copy is corrupt; run the migration again")
        copied += 1
        nbytes += path.stat().st_size
    versions = sorted(p.parent.relative_to(data_root).as_posix() for p in files if p.name == "manifest.json")
    return {"from": str(data_root), "to": store.uri(*parts), "files": len(files), "copied": copied, "skipped": skipped,
            "bytes_copied": nbytes, "dataset_versions": versions}


def team_storage() -> team.Storage:
    """The team's bucket: RMFLOW_STORAGE_URL's (with the AWS_* credentials), else the local object
    store `rmflow up --team` runs under RMFLOW_HOME."""
    configured = team.team_storage()
    if configured is not None:
        return configured
    state = objectstore.service().state()
    if not state or not state.get("port"):
        raise ServiceError("no team bucket: set RMFLOW_STORAGE_URL (and AWS_* credentials) or run `rmflow up --team` first")
    return objectstore.storage(state["port"])


def storage_at(uri: str) -> team.Storage:
    """`uri` (s3://BUCKET[/PREFIX]) in the team's object store (its endpoint and credentials)."""
    base = team_storage()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"--data-to must look like s3://BUCKET[/PREFIX], not {uri}")
    return team.Storage(parts.netloc, parts.path.strip("/"), base.endpoint_url, base.access_key_id, base.secret_access_key, base.local)


def team_mlflow_uri() -> str:
    """The MLflow server `rmflow up --team` started, else MLFLOW_TRACKING_URI when it names a server.
    In that order, unlike clients (rmcore.paths.mlflow_tracking_uri): while moving, the environment
    may still name the embedded store the models come from."""
    import os

    from rmcore.paths import team_mlflow_server

    if team_mlflow_server():
        return team_mlflow_server()
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise ServiceError("no team MLflow server: run `rmflow up --team` first or pass --to-mlflow http://…")


def migrate(source_mlflow: str | None = None, target_mlflow: str | None = None, data_from: Path | None = None,
            data_to: str | None = None, models: list[str] | None = None, mlflow: bool = True, data: bool = True,
            labelstudio_export: Path | None = None, labelstudio_import: Path | None = None,
            projects: list[str] | None = None) -> dict[str, Any]:
    """The whole move, with the embedded install's defaults: RMFLOW_HOME's SQLite store → the team
    MLflow server, RMFLOW_HOME/datasets → the team bucket's `datasets/` (each overridable); Label
    Studio's projects exported to / imported from a file (the server LABEL_STUDIO_URL or the local
    one names, as every other command finds it): only `projects` (titles) when given."""
    from rmcore.paths import embedded_mlflow_store, rmflow_home

    out: dict[str, Any] = {}
    if labelstudio_export is not None:
        from rmcore.atomic import write_atomic
        from rmflow.infra import labelstudio_api as lst

        dump = export_labelstudio(lst.connect(), projects)
        write_atomic(Path(labelstudio_export), json.dumps(dump))
        out["labelstudio_export"] = {"file": str(labelstudio_export), "projects": [p["title"] for p in dump["projects"]],
                                     "tasks": sum(len(p["tasks"]) for p in dump["projects"])}
    if mlflow:
        source_mlflow = source_mlflow or embedded_mlflow_store()
        if source_mlflow.startswith("sqlite:///") and not Path(source_mlflow.removeprefix("sqlite:///")).is_file():
            # MLflow would create an empty store there and report nothing to copy
            raise FileNotFoundError(f"no embedded MLflow store at {source_mlflow.removeprefix('sqlite:///')} (pass --from-mlflow)")
        out["mlflow"] = migrate_models(source_mlflow, target_mlflow or team_mlflow_uri(), models)
    if data:
        root = Path(data_from) if data_from else rmflow_home() / "datasets"
        if data_from is None and not root.is_dir():
            out["datasets"] = {"from": str(root), "files": 0, "note": "no datasets under RMFLOW_HOME: nothing to copy"}
        else:
            store = storage_at(data_to) if data_to else team_storage()
            out["datasets"] = migrate_datasets(root, store, *([] if data_to else ["datasets"]))
    if labelstudio_import is not None:
        from rmflow.infra import labelstudio_api as lst

        out["labelstudio"] = import_labelstudio(lst.connect(), json.loads(Path(labelstudio_import).read_text()))
    return out


# ---- Label Studio projects --------------------------------------------------------------------
# Two steps, so one machine can move its own Label Studio (the embedded one and the team one are the
# same managed service, never up together): export while the embedded server runs, `rmflow up
# --team`, import into the server on PostgreSQL.

SOURCE_TASK = "rmflow_migrated_from"  # in a target task's `meta`: "PROJECT TITLE#SOURCE TASK ID"
IMPORT_CHUNK = 200
# what Label Studio's import keeps of an annotation besides its annotator; ids and timestamps it
# sets itself (the time of the import)
ANNOTATION_FIELDS = ("result", "lead_time", "was_cancelled", "ground_truth")


def export_labelstudio(ls, titles: list[str] | None = None) -> dict[str, Any]:
    """Every project of client `ls` (only `titles` when given): title, label config, description,
    its tasks with their annotations (each annotator named by email), and the users who annotated."""
    from rmflow.infra import labelstudio_api as lst

    with lst.api_errors():
        users = {u.id: u for u in ls.users.list()}
        projects = [ls.projects.get(id=p.id) for p in ls.projects.list() if not titles or p.title in titles]
    out = []
    for p in projects:
        tasks = []
        for t in lst.pull_tasks(ls, p.id):
            annotations = []
            for a in t.get("annotations") or []:
                user = users.get(_user_id(a.get("completed_by")))
                annotations.append({**{k: a[k] for k in ANNOTATION_FIELDS if a.get(k) is not None},
                                    **({"completed_by": {"email": user.email}} if user is not None and user.email else {})})
            tasks.append({"id": t["id"], "data": t["data"], "meta": t.get("meta") or {}, "annotations": annotations})
        out.append({"title": p.title, "label_config": p.label_config, "description": p.description or "", "tasks": tasks})
    annotators = {a["completed_by"]["email"] for p in out for t in p["tasks"] for a in t["annotations"] if "completed_by" in a}
    return {"projects": out, "users": [{"email": u.email, "first_name": u.first_name or "", "last_name": u.last_name or ""}
                                       for u in users.values() if u.email in annotators]}


def import_labelstudio(ls, dump: dict[str, Any]) -> dict[str, Any]:
    """Imports an `export_labelstudio` dump into client `ls`: annotators (created by email when
    missing, without a password: they set one, or an admin does), projects (created with the same
    label config when missing; one with the title and another config is an error), then the tasks
    not imported before (each carries its source id in `meta`), annotations with them, each on its
    annotator. Task and annotation ids are the target's own."""
    from rmflow.infra import labelstudio_api as lst

    with lst.api_errors():
        have = {u.email for u in ls.users.list()}
        for user in dump["users"]:
            if user["email"] not in have:
                # the email as username: unique in the target, where a source username may be taken
                ls.users.create(email=user["email"], username=user["email"], first_name=user["first_name"],
                                last_name=user["last_name"])
    out = []
    for p in dump["projects"]:
        with lst.api_errors():
            pid = lst.find_project(ls, p["title"])
            created = pid is None
            if created:
                pid = ls.projects.create(title=p["title"], label_config=p["label_config"], description=p["description"]).id
        if not created and lst.label_config(ls, pid) != p["label_config"]:
            raise ValueError(f"Label Studio project {p['title']!r} exists in the target with another label config: "
                             "rename one of them, then import again")
        done = {(t.get("meta") or {}).get(SOURCE_TASK) for t in lst.pull_tasks(ls, pid)}
        new = [{"data": t["data"], "meta": {**t["meta"], SOURCE_TASK: f"{p['title']}#{t['id']}"}, "annotations": t["annotations"]}
               for t in p["tasks"] if f"{p['title']}#{t['id']}" not in done]
        with lst.api_errors():
            for start in range(0, len(new), IMPORT_CHUNK):
                ls.projects.import_tasks(id=pid, request=new[start:start + IMPORT_CHUNK])
        out.append({"title": p["title"], "id": pid, "created": created, "tasks": len(p["tasks"]), "tasks_copied": len(new),
                    "annotations_copied": sum(len(t["annotations"]) for t in new)})
    return {"projects": out}


def _user_id(completed_by: Any) -> Any:
    return completed_by.get("id") if isinstance(completed_by, dict) else completed_by
