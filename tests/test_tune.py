"""`rmflow tune` on a real local Ray runtime and MLflow store: a small sweep (tiny backbone, 4 trials,
2 at a time) whose trials are MLflow child runs, one trial's worker killed mid-training and retried
from its checkpoint, and a best config that `rmflow train --config` reproduces."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: float = 400) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rmflow.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _kill_first_checkpointed_trial(sweep: Path, killed: dict, stop: threading.Event) -> None:
    """Kills the process of the first trial that has reported a checkpoint (the real actor process)."""
    while not stop.is_set():
        for trial_dir in sorted((sweep / "attempts").glob("*")) if (sweep / "attempts").is_dir() else []:
            pids = list(trial_dir.iterdir())
            if len(pids) == 1 and any(sweep.glob(f"*{trial_dir.name}*/checkpoint_*")):
                try:
                    os.kill(int(pids[0].name), signal.SIGKILL)
                except ProcessLookupError:  # finished in between: try another trial
                    continue
                killed.update(trial=trial_dir.name, pid=int(pids[0].name))
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sweep(tiny_bert, synthetic_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("tune")
    space = work / "sweep.yaml"
    space.write_text(yaml.safe_dump({
        "trials": 4, "concurrent": 2, "grace_epochs": 1.0, "max_failures": 2,
        "space": {"optim.lr": {"choice": [3e-3, 1e-3, 3e-4, 1e-4]}, "optim.epochs": {"choice": [3]},
                  "optim.warmup_ratio": None, "optim.weight_decay": {"choice": [0.0, 0.01]}}}))
    name = "sweep-test"
    home = tmp_path_factory.getbasetemp() / "rmflow_home"  # the autouse fixture's, which module fixtures precede
    mp = pytest.MonkeyPatch()
    mp.setenv("RMFLOW_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_checkpointed_trial, args=(home / "tune" / name, killed, stop), daemon=True)
    killer.start()
    try:
        out = _cli("tune", "--data", str(synthetic_dataset), "--out", str(work / "model"), "--backbone", str(tiny_bert),
                   "--max-length", "64", "--sweep", str(space), "--sweep-name", name)
    finally:
        stop.set()
        mp.undo()
    return {"out": out, "killed": killed, "work": work, "home": home}


def test_sweep_trials_are_mlflow_child_runs(sweep):
    from mlflow import MlflowClient

    from rmcore.paths import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri())
    out = sweep["out"]
    assert len(out["trials"]) == 4 and all(t["error"] is None for t in out["trials"]), out["trials"]
    experiment = client.get_experiment_by_name("rmflow").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 4
    lrs = {float(r.data.params["optim.lr"]) for r in children}
    assert lrs <= {3e-3, 1e-3, 3e-4, 1e-4} and all(r.data.params["optim.epochs"] == "3.0" for r in children)
    for run in children:  # a validation curve, not one number
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) >= 2
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_accuracy"] == out["best_val_accuracy"]


def test_a_killed_trial_is_retried_from_its_checkpoint(sweep):
    killed = sweep["killed"]
    assert killed, "no trial was killed: the sweep finished before any trial checkpointed"
    trial = next(t for t in sweep["out"]["trials"] if t["trial"] == killed["trial"])
    # it went on past the checkpoint it was killed after (the first, at 0.6 epochs): to its end, or until
    # ASHA stopped it at a later rung (1 epoch and on)
    assert trial["restarts"] >= 1 and trial["error"] is None and trial["epoch"] >= 1.0, trial
    attempts = sweep["home"] / "tune" / "sweep-test" / "attempts" / killed["trial"]
    assert str(killed["pid"]) in {p.name for p in attempts.iterdir()} and len(list(attempts.iterdir())) >= 2


def test_best_config_reproduces_with_rmflow_train(sweep, synthetic_dataset):
    out = sweep["out"]
    best = yaml.safe_load(Path(out["config_file"]).read_text())
    assert best["optim"]["lr"] in (3e-3, 1e-3, 3e-4, 1e-4) and best["optim"]["epochs"] == 3
    again = _cli("train", "--data", str(synthetic_dataset), "--config", out["config_file"], "--out", str(sweep["work"] / "again"))
    assert again["val_accuracy"] == out["val_accuracy"]  # the model `tune` trained, retrained from the YAML
    assert (Path(out["model_dir"]) / "config.json").is_file() or any(Path(out["model_dir"]).iterdir())


def test_trials_are_ranked_on_a_selection_set_and_the_best_config_trains_on_the_whole_training_split(sweep, synthetic_dataset):
    """With the default selection_fraction the trials train on the training split less a quarter of its
    prompts and are ranked on the validation split plus those prompts (never on test): every evaluation
    a trial logged counted that many pairs; the parent run records both sizes; the best configuration then
    trains on the whole training split (3 epochs of it: early stopping checks the 3 evaluations before the
    end, the first of which sets the best, so patience 3 is never reached)."""
    from mlflow import MlflowClient

    from rmcore.dataset import read_manifest
    from rmcore.paths import mlflow_tracking_uri

    out = sweep["out"]
    full = read_manifest(synthetic_dataset)["splits"]
    started = json.loads((Path(out["sweep"]) / "rmflow_sweep.json").read_text())
    ranked_on = read_manifest(Path(started["trial_data_dir"]))["splits"]
    assert ranked_on["test"] == 0 and full["validation"] < ranked_on["validation"] == out["selection_pairs"], ranked_on
    assert ranked_on["train"] + ranked_on["validation"] == full["train"] + full["validation"]
    client = MlflowClient(mlflow_tracking_uri())
    experiment = client.get_experiment_by_name("rmflow").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    counted = {m.value for run in children for m in client.get_metric_history(run.info.run_id, "val_n")}
    assert counted == {ranked_on["validation"]}, counted
    params = client.get_run(out["parent_run_id"]).data.params
    assert params["sweep.selection_fraction"] == "0.25" and params["selection_pairs"] == str(ranked_on["validation"])
    assert params["trial_train_pairs"] == str(ranked_on["train"])
    assert out["pairs_trained"] == 3 * full["train"]


def test_an_interrupted_sweep_resumes(tiny_bert, synthetic_dataset, tmp_path, monkeypatch):
    """The driver (and the local Ray runtime that shares its fate) is SIGKILLed once Tune has recorded a
    finished trial; `rmflow tune --resume` finishes the sweep without training that trial again and
    logs into the same MLflow runs. The sweep selects by validation loss (`--select-by loss`), which the
    resumed sweep keeps: the best trial is the one with the lowest loss, not the highest accuracy. With
    `selection_fraction: 0` the trials are ranked on the validation split itself (no selection set)."""
    from mlflow import MlflowClient

    from rmcore.paths import mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"trials": 3, "concurrent": 1, "grace_epochs": 3.0, "selection_fraction": 0, "space": {
        "optim.lr": {"choice": [3e-3, 1e-3, 3e-4]}, "optim.epochs": {"choice": [2]}, "optim.warmup_ratio": None,
        "optim.weight_decay": None}}))
    path = Path(os.environ["RMFLOW_HOME"]) / "tune" / "resume-test"
    driver = subprocess.Popen([sys.executable, "-m", "rmflow.cli", "tune", "--data", str(synthetic_dataset), "--backbone",
                               str(tiny_bert), "--max-length", "64", "--sweep", str(tmp_path / "sweep.yaml"), "--sweep-name",
                               "resume-test", "--no-train-best", "--select-by", "loss"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if any('\\"TERMINATED\\"' in p.read_text() or '"TERMINATED"' in p.read_text() for p in path.glob("experiment_state*.json")):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep ended before Tune recorded a finished trial"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = {d.name for d in (path / "attempts").iterdir()}
    out = _cli("tune", "--data", str(synthetic_dataset), "--resume", str(path), "--no-train-best")
    assert len(out["trials"]) == 3 and all(t["error"] is None and t["finished"] for t in out["trials"]), out["trials"]
    once = [d for d in (path / "attempts").iterdir() if d.name in done_before and len(list(d.iterdir())) == 1]
    assert once, "every trial started before the kill was trained again"
    assert Path(out["config_file"]).is_file()
    client = MlflowClient(mlflow_tracking_uri())
    experiment = client.get_experiment_by_name("rmflow").experiment_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")) == 3
    assert out["selection_pairs"] == json.loads((Path(synthetic_dataset) / "manifest.json").read_text())["splits"]["validation"]
    assert not (path / "selection").exists()  # selection_fraction 0: ranked on the validation split itself
    best = min(out["trials"], key=lambda t: t["val_loss"])
    assert out["selected_by"] == "val_loss" and out["best_val_loss"] == best["val_loss"], out["trials"]
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["best_trial"] == best["trial"] and parent.data.tags["selected_by"] == "val_loss"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best["val_loss"])


def test_select_metric_table_gives_asha_the_metric_and_direction_of_each_select_by():
    """The table run_sweep hands Tune (metric, mode): a sweep by loss that kept the highest losses would
    pass the resume test, whose trials all finish."""
    from rmcore.config import RunConfig
    from rmcore.train import SELECT_METRIC

    assert SELECT_METRIC[RunConfig().optim.select_by] == ("val_accuracy", "max")
    assert SELECT_METRIC["loss"] == ("val_loss", "min")
