"""Defects found in review, each with the test that failed before its fix: deleted user folders,
unsafe checkpoint loading, query injection through model names, secrets on command lines, a
found Ray cluster breaking local training."""
from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rmcore.config import RunConfig


def test_training_never_deletes_a_folder_rmflow_did_not_write(tiny_bert, synthetic_dataset, tmp_path):
    from rmflow.infra.ray_train import fit, run_ray_training

    out = tmp_path / "my-results"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    cfg = RunConfig.model_validate({"model": {"backbone": str(tiny_bert), "max_length": 64}})
    with pytest.raises(FileExistsError, match="not an rmflow model folder"):
        fit(cfg, synthetic_dataset, out)
    with pytest.raises(FileExistsError, match="not an rmflow model folder"):
        run_ray_training(cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"workers": 2})}), synthetic_dataset, out)
    assert (out / "thesis.tex").read_text() == "months of work"


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/rmflow-pwned"),))


class _FakeCheckpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextmanager
    def as_directory(self):
        yield str(self.folder)


def test_checkpoints_load_tensors_only_never_pickled_code(tmp_path):
    from rmflow.infra.ray_train import STATE_FILE, CheckpointError, _resume_state

    Path("/tmp/rmflow-pwned").unlink(missing_ok=True)
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "micro": 3, "rng": torch.get_rng_state()}, good / STATE_FILE)
    (good / "trained_rank0.json").write_text(json.dumps([1, 0]))
    state = _resume_state(_FakeCheckpoint(good), 0, torch.device("cpu"))
    assert state["micro"] == 3 and state["trained"] == [1, 0]

    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / STATE_FILE, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    (evil / "trained_rank0.json").write_text("[]")
    with pytest.raises(CheckpointError, match="unreadable \\(UnpicklingError"):
        _resume_state(_FakeCheckpoint(evil), 0, torch.device("cpu"))
    assert not Path("/tmp/rmflow-pwned").exists()


@pytest.mark.parametrize("name", ["x' OR name LIKE '%", "a b", "", "../up", "x" * 200, "name'"])
def test_model_names_that_could_rewrite_a_search_filter_are_refused(name, tmp_path, monkeypatch):
    from pydantic import ValidationError

    from rmflow.flows.pipeline import PipelineParams
    from rmflow.infra.mlflow_client import configure_mlflow, model_versions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="invalid model name"):
        model_versions(configure_mlflow(), name)
    with pytest.raises(ValidationError, match="invalid model name"):
        PipelineParams(model_name=name)


@pytest.mark.slow
@pytest.mark.services
def test_label_studio_secrets_never_reach_a_command_line(label_studio, monkeypatch):
    """Every label-studio process rmflow starts, and every user it creates, gets its password and
    token through the environment: nothing in `ps` shows them."""
    import subprocess

    import psutil

    from rmflow.infra import labelstudio as local

    seen: list[list[str]] = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        seen.append([str(c) for c in cmd])
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    token = local.create_user("secrets-check@rmflow.local")
    creds = local.credentials()
    secrets = [token, creds["token"], creds["password"]]
    assert seen and not any(s in " ".join(cmd) for cmd in seen for s in secrets)
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        assert not any(s in line for s in secrets), "a secret is visible in ps"


def test_label_studio_errors_inside_tasks_never_carry_headers():
    """The SDK's ApiError text includes the request headers (session cookie, token); what a task
    raises names only the status and the server's message."""
    from label_studio_sdk.core.api_error import ApiError

    from rmflow.infra.labelstudio_api import LabelStudioError, api_errors

    secret = "Token deadbeefdeadbeef"
    with pytest.raises(LabelStudioError) as info:
        with api_errors():
            raise ApiError(status_code=400, headers={"authorization": secret, "cookie": "sessionid=abc"},
                           body={"detail": "bad project"})
    assert str(info.value) == "Label Studio answered HTTP 400: bad project"
    assert "deadbeef" not in repr(info.value) and info.value.__cause__ is None


@pytest.mark.slow
@pytest.mark.services
def test_a_ray_cluster_already_on_the_machine_does_not_break_local_training(tmp_path):
    """A running `ray start --head`, then the address file it leaves once killed: training without
    RAY_ADDRESS starts its own runtime both times (and says so) instead of failing on the found one."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from rmflow.infra.process import free_port

    port = free_port(6391)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    probe = ("import json, ray; from rmflow.infra.ray_train import init_ray; mode = init_ray(None); "
             "print(json.dumps({**mode, 'gcs': ray.get_runtime_context().gcs_address}))")

    def ours() -> list[psutil.Process]:  # the head's processes only: they name its unique port
        found = []
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if f"127.0.0.1:{port}" in line or f"gcs_server_port={port}" in line:
                found.append(p)
        return found

    try:
        with_head = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                              timeout=300, check=True).stdout.strip().splitlines()[-1])
        assert with_head["ray"] == "local" and not with_head["gcs"].endswith(f":{port}")
    finally:
        for p in ours():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stale = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                      timeout=300, check=True).stdout.strip().splitlines()[-1])
    assert stale["ray"] == "local"


def test_a_tune_state_recorded_before_a_setting_existed_is_reused_not_re_tuned(tmp_path):
    """The pipeline's tune state keeps the base config it tuned; one written before `optim.select_by`
    existed lacks it. Its default is what that rmflow did, so the recorded best config is reused: a
    re-tune would cost a whole sweep (here it would fail, the dataset folder does not exist)."""
    import yaml

    from rmcore.sweep import SweepConfig
    from rmflow.tasks.tune import STATE_FILE, tune_or_reuse

    base, sweep = RunConfig(), SweepConfig()
    older = base.model_dump(mode="json")
    del older["optim"]["select_by"]
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"optim": {"lr": 1e-4}}))
    (tmp_path / STATE_FILE).write_text(json.dumps({"base": older, "sweep": sweep.model_dump(mode="json"),
                                                   "config_file": str(best), "best_val_accuracy": 0.6, "runs_since": 1}))
    tuned = tune_or_reuse(base, tmp_path / "no-such-dataset", sweep, tmp_path, retune_every=5)
    assert not tuned.tuned and tuned.run.optim.lr == 1e-4 and tuned.best_val_loss is None
    assert json.loads((tmp_path / STATE_FILE).read_text())["runs_since"] == 2


@pytest.mark.parametrize("selection_fraction, retunes", [(0.0, False), (None, True)])
def test_a_tune_state_from_before_selection_sets_is_reused_only_where_it_ranked_the_same_way(tmp_path, selection_fraction, retunes):
    """A tune state recorded before `selection_fraction` existed ranked its trials on the validation split
    alone: with `selection_fraction: 0` that is the same sweep and its best config is reused; with the
    default (0.25) the sweep settings changed and it is re-tuned (which fails here, reaching the missing
    dataset: proof that a sweep was started)."""
    import yaml

    from rmcore.sweep import SweepConfig
    from rmflow.tasks.tune import STATE_FILE, tune_or_reuse

    sweep = SweepConfig() if selection_fraction is None else SweepConfig(selection_fraction=selection_fraction)
    older = sweep.model_dump(mode="json")
    del older["selection_fraction"]
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"optim": {"lr": 1e-4}}))
    (tmp_path / STATE_FILE).write_text(json.dumps({"base": RunConfig().model_dump(mode="json"), "sweep": older,
                                                   "config_file": str(best), "best_val_accuracy": 0.6, "runs_since": 1}))
    if retunes:
        with pytest.raises(FileNotFoundError, match="no-such-dataset"):
            tune_or_reuse(RunConfig(), tmp_path / "no-such-dataset", sweep, tmp_path, retune_every=5)
    else:
        tuned = tune_or_reuse(RunConfig(), tmp_path / "no-such-dataset", sweep, tmp_path, retune_every=5)
        assert not tuned.tuned and tuned.run.optim.lr == 1e-4


def test_a_removed_default_space_entry_survives_the_run_form_and_the_tune_state(tmp_path):
    """A sweep without one of the default space's entries (set to null) keeps it out after its settings are
    dumped and read back, as the Prefect run form and the pipeline's tune state do: the default space is
    merged in on every validation, so the dump names the removal. The recorded state, written now or by an
    rmflow that dumped the space without the entry, is the same sweep: its best config is reused (a re-tune
    would reach the missing dataset)."""
    import yaml

    from rmcore.sweep import SweepConfig
    from rmflow.flows.pipeline import PipelineParams
    from rmflow.tasks.tune import STATE_FILE, tune_or_reuse

    sweep = SweepConfig.model_validate({"space": {"optim.weight_decay": None, "loss.label_smoothing": {"choice": [0.0, 0.1]}}})
    assert "optim.weight_decay" not in sweep.space and "optim.lr" in sweep.space
    assert SweepConfig.model_validate(sweep.model_dump(mode="json")) == sweep
    params = PipelineParams.model_validate({"tune": {"enabled": True, "sweep": sweep.model_dump(mode="json")}})
    assert PipelineParams.model_validate(json.loads(params.model_dump_json())).tune.sweep.space == sweep.space

    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"optim": {"lr": 1e-4}}))
    now = sweep.model_dump(mode="json")
    before = now | {"space": {k: v for k, v in now["space"].items() if v is not None}}
    for n, recorded in enumerate((now, before)):
        (tmp_path / STATE_FILE).write_text(json.dumps({"base": RunConfig().model_dump(mode="json"), "sweep": recorded,
                                                       "config_file": str(best), "best_val_accuracy": 0.6, "runs_since": 1}))
        tuned = tune_or_reuse(RunConfig(), tmp_path / "no-such-dataset", sweep, tmp_path, retune_every=5)
        assert not tuned.tuned and tuned.run.optim.lr == 1e-4, n
    # and a sweep that searches the entry again is another sweep
    with pytest.raises(FileNotFoundError, match="no-such-dataset"):
        tune_or_reuse(RunConfig(), tmp_path / "no-such-dataset", SweepConfig(), tmp_path, retune_every=5)
