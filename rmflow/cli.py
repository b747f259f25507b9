"""`rmflow` — the command line. A thin map from commands to the stage functions the flows run
(`tasks/`) and to rmcore; it parses arguments, prints rich output on stderr and the result as one
JSON object on the last stdout line. `train` and `promote` options are generated from the config
models (rmflow/options.py), so a new config field is a new flag without an edit here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import datasets
import typer
from transformers.utils import logging as hf_logging

from rmcore.config import GateConfig, RunConfig
from rmcore.names import DEFAULT_MODEL, DEFAULT_PROJECT, DEFAULT_RESPONSES, SENSOR_INTERVAL_S
from rmcore.retrain import RetrainPolicy
from rmcore.sweep import SweepConfig
from rmflow.options import parse_sets, with_config_options
from rmflow.output import console, emit, fail

# per-file "Loading weights" / "Saving the dataset" bars drown the CLI's own progress output
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reward-model stage of RLHF, end to end.")
EXPECTED = (FileNotFoundError, FileExistsError, ValueError)  # bad input: one clear line, no traceback


@app.callback()
def _root() -> None:
    """Reward-model stage of RLHF: Label Studio → Prefect → Ray Train → MLflow."""


@app.command()
def convert(
    kind: str = typer.Argument(..., help="Input format: label-studio, hh-rlhf, qa-feedback or trl."),
    input: Path = typer.Argument(..., help="The file to convert (JSON, JSON Lines, optionally gzipped)."),
    out: Path = typer.Option(Path("out/dataset"), "--out", help="Dataset folder to write."),
    strict: bool = typer.Option(False, help="Stop at the first malformed record instead of quarantining it."),
    prompt_field: Optional[str] = typer.Option(None, help="Label Studio: task data field holding the prompt."),
    items_field: Optional[str] = typer.Option(None, help="Label Studio: task data field holding the List items."),
    label_config: Optional[Path] = typer.Option(None, help="Label Studio: the project's label config XML file."),
    split: str = typer.Option("0.8,0.1,0.1", help="train,validation,test fractions (split by prompt hash)."),
) -> None:
    """Convert human preference data into a versioned pairwise + K-wise dataset."""
    from rmcore.converters import KINDS, StrictModeError, convert_to_dataset

    if kind not in KINDS:
        fail(f"unknown KIND {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        manifest = convert_to_dataset(kind, input, out, strict, split, prompt_field, items_field, label_config)
    except (StrictModeError, *EXPECTED) as e:
        fail(str(e))
    summary = {k: manifest[k] for k in ("version", "prompts", "pairs", "ties", "groups", "quarantined", "cancelled", "splits")}
    console.print(f"[green]converted[/] {input} → {out}: {summary['pairs']} pairs, {summary['ties']} ties, "
                  f"{summary['groups']} groups, {summary['quarantined']} quarantined (version {summary['version']})")
    if manifest["quarantined"]:
        console.print(f"[yellow]quarantined records and reasons:[/] {out / 'quarantine.jsonl'}")
    emit({**summary, "intransitive": manifest["intransitive"], "duplicates": manifest["duplicates"], "out": str(out)})


@app.command()
@with_config_options(RunConfig)
def train(
    data: str = typer.Option(..., help="Dataset folder written by `rmflow convert` or `rmflow collect`, or a dataset "
                             "version in the team's bucket (s3://…; every worker copies it, README \"Team deployment\")."),
    out: Path = typer.Option(Path("out/model"), help="Where the trained reward model is saved (new, empty, or an earlier rmflow model)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON RunConfig; flags and --set override it."),
    set_: list[str] = typer.Option([], "--set", help="section.field=value override of any config field (repeatable)."),
    run_name: Optional[str] = typer.Option(None, help="Name of the Ray Train run under --storage-path (default: a new one). "
                                           "Give the name of a run that failed (the store went away, the driver died) to "
                                           "resume it from its last checkpoint there (with the same dataset and training settings: other ones are refused)."),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Train a reward model (with a strength ensemble first when --ensemble > 0); prints pairs
    trained, speed and validation accuracy."""
    from pydantic import ValidationError

    from rmcore.config import load_run_config
    from rmflow.infra.process import ServiceError
    from rmflow.tasks.strength import build_strength_dataset
    from rmflow.tasks.train import train_model

    try:
        cfg = load_run_config(config, {**(overrides or {}), **parse_sets(set_)})
    except ValidationError as e:
        fail(f"invalid run config: {e}")
    except ValueError as e:
        fail(str(e))
    data = data if data.startswith("s3://") else Path(data)
    try:
        strength = None
        if cfg.strength.ensemble:
            strength = build_strength_dataset(cfg, data)
            cfg, data = strength.run, Path(strength.dataset)
        trained = train_model(cfg, data, out, run_name)
    except (*EXPECTED, ServiceError) as e:  # a service error names the store or server and what to do
        fail(str(e))
    summary = {k: v for k, v in trained.summary.items() if k not in ("group_train_counts", "history")}
    if strength is not None:
        summary |= {"strength": strength.summary, "data_dir": strength.dataset, "strength_report": trained.strength_report}
    console.print(f"[green]trained[/] {summary['pairs_trained']} pairs in {summary['train_s']:.1f}s "
                  f"({summary['pairs_per_s']:.1f} pairs/s); validation accuracy {summary['val_accuracy']:.3f} → {out}")
    emit(summary)


@app.command()
@with_config_options(RunConfig)
def tune(
    data: Path = typer.Option(..., help="Dataset folder written by `rmflow convert` or `rmflow collect`."),
    out: Path = typer.Option(Path("out/model"), help="Where the best configuration's model is trained (as `rmflow train --out`)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON RunConfig the sweep starts from; flags and --set override it."),
    set_: list[str] = typer.Option([], "--set", help="section.field=value override of any config field (repeatable)."),
    sweep: Optional[Path] = typer.Option(None, help="YAML SweepConfig (trials, time_budget_s, concurrent, selection_fraction, "
                                         "space: {section.field: {loguniform|uniform|randint|choice: args}}, merged over the "
                                         "default space)."),
    trials: Optional[int] = typer.Option(None, help="Configurations to try (overrides the --sweep file; default "
                                         f"{SweepConfig.model_fields['trials'].default})."),
    time_budget_s: Optional[float] = typer.Option(None, help="Stop the sweep after this many seconds."),
    concurrent: Optional[int] = typer.Option(None, help="Trials at once (default: as many as the CPUs hold)."),
    selection_fraction: Optional[float] = typer.Option(None, help="Fraction of the training prompts the trials are ranked on "
                                                       "(with the validation split) instead of trained on (default "
                                                       f"{SweepConfig.model_fields['selection_fraction'].default}; 0 = the "
                                                       "validation split alone)."),
    sweep_name: Optional[str] = typer.Option(None, help="Name of the sweep (its folder under RMFLOW_HOME/tune and its MLflow run)."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted sweep from its folder (Tuner.restore)."),
    train_best: bool = typer.Option(True, help="Train the best configuration into --out after the sweep."),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Search the run config on Ray Tune (trials ranked on a selection set, the validation split plus
    --selection-fraction of the training prompts, by accuracy or by loss with --select-by loss; ASHA stops
    the weak ones; every trial an MLflow child run), write the best config as YAML and train it on the
    whole training split into --out."""
    from pydantic import ValidationError

    from rmcore.config import load_run_config
    from rmcore.sweep import load_sweep_config
    from rmflow.tasks.train import train_model
    from rmflow.tasks.tune import tune_config

    try:
        base = load_run_config(config, {**(overrides or {}), **parse_sets(set_)})
        settings = load_sweep_config(sweep, {"trials": trials, "time_budget_s": time_budget_s, "concurrent": concurrent,
                                             "selection_fraction": selection_fraction})
    except ValidationError as e:
        fail(f"invalid config: {e}")
    except ValueError as e:
        fail(str(e))
    try:
        tuned = tune_config(base, data, settings, sweep_name, resume=resume)
        for t in tuned.trials:
            restarts = f", {t['restarts']} restarts" if t["restarts"] else ""
            console.print(f"  trial {t['trial']}: val acc {t['val_accuracy']}, val loss {t['val_loss']} at epoch {t['epoch']}"
                          f"{'' if t['finished'] else ' (stopped early by ASHA)'}{restarts}")
        loss = "n/a" if tuned.best_val_loss is None else f"{tuned.best_val_loss:.4f}"
        console.print(f"[green]best[/] by {tuned.selected_by} on a selection set of {tuned.selection_pairs} pairs: accuracy "
                      f"{tuned.best_val_accuracy:.3f}, loss {loss} → {tuned.config_file}")
        result = tuned.model_dump(mode="json", exclude={"run"})
        if train_best:
            trained = train_model(tuned.run, data, out)
            result |= {"model_dir": trained.model_dir, "val_accuracy": trained.summary["val_accuracy"],
                       "best_step": trained.summary["best_step"], "pairs_trained": trained.summary["pairs_trained"]}
            console.print(f"[green]trained[/] the best config → {out} (validation accuracy {trained.summary['val_accuracy']:.3f})")
    except (*EXPECTED, RuntimeError) as e:
        fail(str(e))
    emit(result)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="A saved reward model folder."),
    data: Path = typer.Option(..., help="A dataset folder (its --split is used) or a raw preference file."),
    format: Optional[str] = typer.Option(None, "--format", help="Format of a raw file: label-studio, hh-rlhf, qa-feedback, trl."),
    split: str = typer.Option("test", help="Split of a dataset folder."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The evaluation the gate uses: accuracy, ties, ECE, margin, length bias, accuracy by rank distance."""
    from rmcore.evaluate import evaluate_saved_model

    try:
        metrics = evaluate_saved_model(model, data, split, format, device).metrics
    except EXPECTED as e:
        fail(str(e))
    console.print(f"accuracy {metrics['accuracy']:.3f} on {metrics['n']} pairs ({metrics['ties']} ties), ECE {metrics['ece']:.3f}, "
                  f"length bias {metrics['length_bias']:+.3f}")
    emit(metrics)


@app.command()
@with_config_options(GateConfig)
def promote(
    model: Optional[Path] = typer.Option(None, help="Saved reward model folder to register, evaluate and gate."),
    name: str = typer.Option(DEFAULT_MODEL, help="Registered model name."),
    eval_data: Optional[Path] = typer.Option(None, help="Evaluation set: a dataset folder (its --split) or a raw file."),
    split: str = typer.Option("test", help="Split of a dataset folder to evaluate on."),
    format: Optional[str] = typer.Option(None, "--format", help="Format of a raw evaluation file."),
    rollback: bool = typer.Option(False, "--rollback", help="Move `champion` back to `previous` instead."),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Register a model in MLflow, evaluate it against the champion, promote it if it passes the gate."""
    from rmflow.tasks.evaluate import evaluate_version
    from rmflow.tasks.promote import gate_and_promote
    from rmflow.tasks.promote import rollback as roll_back
    from rmflow.tasks.register import register_model

    if rollback:
        try:
            result = roll_back(name)
        except ValueError as e:
            fail(str(e))
        console.print(f"[yellow]rolled back[/] {name}: champion is now version {result['champion_version']}")
        emit(result)
        return
    if model is None or eval_data is None:
        fail("--model and --eval-data are required (or --rollback)")
    try:
        gate = GateConfig(**(overrides or {}))
        registered = register_model(name, model)
        promoted = gate_and_promote(evaluate_version(registered, eval_data, split, format), gate)
    except EXPECTED as e:
        fail(str(e))
    verdict = "[green]promoted[/]" if promoted.passed else "[red]refused[/]"
    console.print(f"{verdict} {name} v{promoted.version}; champion is v{promoted.champion_version}")
    for reason in promoted.reasons:
        console.print(f"  - {reason}")
    emit({**promoted.model_dump(include={"version", "passed", "reasons", "champion_version", "metrics"}), "created": registered.created})


@app.command()
def score(
    model: str = typer.Option(..., help="models:/NAME@champion, models:/NAME/VERSION, runs:/… or a model folder."),
    prompt: list[str] = typer.Option(..., help="Prompt (repeat for a batch)."),
    response: list[str] = typer.Option(..., help="Response (repeat; one per --prompt)."),
    normalize: bool = typer.Option(False, help="(r - mean) / std with the training completions' reward statistics."),
) -> None:
    """Score (prompt, response) pairs with a reward model."""
    from rmflow.infra.model_uri import load_scorer

    try:
        rewards = load_scorer(model).score(prompt, response, normalize=normalize).tolist()
    except EXPECTED as e:
        fail(str(e))
    for p, r, s in zip(prompt, response, rewards):
        console.print(f"{s:+.4f}  {p[:40]!r} → {r[:40]!r}")
    emit({"rewards": rewards, "model": model})


@app.command()
def export(
    model: str = typer.Option(..., help="models:/NAME@champion, models:/NAME/VERSION, runs:/… or a model folder."),
    out: Path = typer.Option(..., help="New folder for the Hugging Face model (AutoModelForSequenceClassification, num_labels=1)."),
) -> None:
    """Write a reward model as a standard Hugging Face checkpoint that TRL, OpenRLHF, vLLM and
    RewardBench load; its config.json carries the reward mean/std (OpenRLHF's names)."""
    from rmcore.export import export_hf
    from rmflow.infra.model_uri import model_folder

    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose a new folder")
    try:
        with model_folder(model) as folder:
            written = export_hf(folder, out)
    except EXPECTED as e:
        fail(str(e))
    console.print(f"[green]exported[/] {written['architecture']} → {out}")
    emit({**written, "out": str(out), "model": model})


@app.command("serve-rm")
def serve_rm(
    model: str = typer.Option(..., help="models:/NAME@champion (followed after promotions), models:/NAME/VERSION or a model folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback exposes it to your network."),
    port: int = typer.Option(8000, help="Port."),
    normalize: bool = typer.Option(False, help="Normalise rewards by default ((r - mean) / std over the training completions)."),
    max_batch: int = typer.Option(64, help="Most texts scored in one batch."),
    max_wait_ms: float = typer.Option(5.0, help="After a request arrives, wait this long for more to batch with it."),
    refresh: float = typer.Option(10.0, help="Seconds between checks of the alias (a promotion is served within this)."),
    max_chars: int = typer.Option(32000, help="Longest text accepted (longer: HTTP 413)."),
    max_queue: int = typer.Option(1024, help="Most texts admitted and not yet answered; beyond, HTTP 503 with Retry-After."),
    max_body_mb: float = typer.Option(8.0, help="Largest request body in MiB (larger: HTTP 413)."),
    max_tokens: int = typer.Option(1024, help="Most padded tokens per forward chunk (a batch is cut into length-sorted chunks: "
                                   "short texts are not padded to the longest)."),
    dtype: str = typer.Option("auto", help="auto: bfloat16 autocast on GPU, float32 on CPU; bfloat16: also on CPU (faster on "
                              "AVX512-BF16 CPUs, rewards differ by ~1e-2); float32: exact everywhere."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads per server process (0 = torch's default)."),
    replicas: int = typer.Option(0, help="Serve N replicas as a Ray Serve deployment (RAY_ADDRESS or a local Ray; one GPU each "
                                 "when present); 0 = one plain HTTP server process."),
) -> None:
    """Online reward server for RL trainers: OpenRLHF's POST /get_reward {"query": [...]}, and
    POST /score {"prompt": [...], "response": [...]}; dynamic batching; follows the alias; GET /health
    and Prometheus GET /metrics. Set RMFLOW_RM_TOKEN to require `Authorization: Bearer <token>`."""
    from rmflow.infra.reward_server import ServerOptions

    options = ServerOptions(token=os.environ.get("RMFLOW_RM_TOKEN") or None, normalize=normalize, max_batch=max_batch,
                            max_wait_ms=max_wait_ms, refresh_s=refresh, max_chars=max_chars, max_queue=max_queue,
                            max_body_bytes=int(max_body_mb * 1024 * 1024), max_tokens=max_tokens, dtype=dtype)
    console.print(f"serving {model} on http://{host}:{port} (/get_reward, /score, /health, /metrics)"
                  + (f" as {replicas} Ray Serve replicas" if replicas else ""))
    try:
        if replicas:
            from rmflow.infra.reward_serve_ray import serve_replicas

            serve_replicas(model, host, port, options, replicas, torch_threads)
        else:
            from rmflow.infra.reward_server import serve as run

            run(model, host, port, options, torch_threads)
    except EXPECTED as e:
        fail(str(e))


def _ls_failure(e: Exception) -> str:
    from rmflow.infra.labelstudio_api import LabelStudioError

    if isinstance(e, (LabelStudioError, OSError, ValueError)):
        return str(e)
    raise e


ls_app = typer.Typer(help="The local Label Studio server, projects and simulated annotators.", no_args_is_help=True)
app.add_typer(ls_app, name="labelstudio")


@ls_app.command("up")
def ls_up(port: int = typer.Option(8080, help="Preferred port (a busy one moves to a free one).")) -> None:
    """Install (once) and start Label Studio on 127.0.0.1; prints its URL."""
    from rmflow.infra import labelstudio

    try:
        result = labelstudio.up(port, log=console.print)
    except RuntimeError as e:
        fail(str(e))
    console.print(f"Label Studio at [bold]{result['url']}[/] (user {labelstudio.ADMIN}; token in {labelstudio.ls_home() / 'token'})")
    emit(result)


@ls_app.command("down")
def ls_down() -> None:
    """Stop the Label Studio that rmflow started (and nothing else)."""
    from rmflow.infra import labelstudio

    emit({"stopped": labelstudio.down()})


@ls_app.command("status")
def ls_status() -> None:
    from rmflow.infra import labelstudio

    emit(labelstudio.status())


@ls_app.command("seed")
def ls_seed(
    project: str = typer.Option(..., help="Project title (created if missing)."),
    synthetic: int = typer.Option(0, help="Import N synthetic prompts with a hidden gold reward."),
    k: int = typer.Option(DEFAULT_RESPONSES, help="Responses per prompt."),
    from_file: Optional[Path] = typer.Option(None, "--from", help="JSONL of {prompt, responses[], order?[]}, or a "
                                             "dataset's rankings.jsonl (annotators then replay the human orders)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Create the ranking project and import tasks (re-importing the same content adds nothing)."""
    from rmcore.synthetic import synthetic_items
    from rmflow.infra import labelstudio_api as lst

    try:
        items = lst.items_from_file(from_file) if from_file else [
            {"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(synthetic, k, seed)]
        ls = lst.connect()
        project_id = lst.ensure_project(ls, project, k)
        result = lst.import_tasks(ls, project_id, items, seed)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    console.print(f"project {project!r} (id {project_id}): {result['imported']} tasks imported, {result['skipped']} already there")
    emit({"project_id": project_id, **result})


@ls_app.command("simulate-annotators")
def ls_simulate(
    project: str = typer.Option(..., help="Project title."),
    annotators: int = typer.Option(2, help="Simulated annotators (real Label Studio users)."),
    noise: float = typer.Option(0.5, help="Gumbel noise on the gold reward (0 = perfect annotators)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Each simulated annotator ranks every task it has not annotated yet, through the API."""
    from rmflow.infra import labelstudio_api as lst

    try:
        result = lst.simulate_annotators(lst.ensure_project(lst.connect(), project), annotators, noise, seed)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    emit(result)


@ls_app.command("reannotate")
def ls_reannotate(
    project: str = typer.Option(..., help="Project title."),
    data: Path = typer.Option(..., help="A strength-annotated dataset folder (written by `rmflow train --ensemble M`)."),
    max_tasks: int = typer.Option(50, help="Send at most this many new re-annotation tasks."),
) -> None:
    """Active labelling: send the ensemble's most doubtful train pairs back as tasks tagged for
    re-annotation; their labels supersede the old ones at the next `rmflow collect`."""
    from rmflow.tasks.reannotate import request_reannotation

    try:
        result = request_reannotation(project, data, max_tasks)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    console.print(f"{result['sent']} pairs sent for re-annotation ({result['candidates']} doubtful pairs in {data})")
    emit(result)


@app.command()
def collect(
    project: str = typer.Option(..., help="Label Studio project title."),
    out: Path = typer.Option(Path("out/labels"), help="Dataset root: versions are written to OUT/<version>/."),
    full: bool = typer.Option(False, help="Pull every task instead of only those changed since the last snapshot."),
) -> None:
    """Pull rankings from Label Studio into a versioned dataset (only tasks changed since the last
    snapshot are fetched); the watermark (OUT/watermark.json) then advances, so a second call with
    nothing new reports 0 and writes no new version."""
    from rmcore.watermark import advance_watermark, read_watermark
    from rmflow.tasks.collect import pull_snapshot
    from rmflow.tasks.dataset import build_dataset

    try:
        snapshot = pull_snapshot(project, out, full=full)
        labels = build_dataset(snapshot, out, read_watermark(out))
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    advance_watermark(out, labels.watermark)
    console.print(f"{labels.new_rankings} new rankings ({labels.total_rankings} in all, "
                  f"{labels.quarantined} quarantined) → {labels.dataset}")
    emit({**labels.model_dump(exclude={"watermark", "previous_watermark"}), "watermark": labels.watermark.at,
          "previous_watermark": labels.previous_watermark.at,
          **snapshot.model_dump(include={"snapshot", "annotations", "fetched", "deleted", "incremental", "cursor"})})


def _pipeline_params(params_file: Optional[Path], project: str, model_name: str, workers: int) -> dict[str, Any]:
    """The deployments' default PipelineParams: a JSON/YAML file (PipelineParams fields), else the options."""
    if params_file is not None:
        import yaml

        return yaml.safe_load(params_file.read_text()) or {}
    return {"project": project, "model_name": model_name, "run": {"scale": {"workers": workers}}}


# the options `up` and `serve` share (serve is what `up` runs in the background)
ParamsFile = Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="JSON/YAML file of the pipeline's default "
                       "parameters (PipelineParams: project, model_name, run, gate, ...); overrides --project/--model-name/--workers.")]
Interval = Annotated[int, typer.Option(help="Seconds between label-sensor polls, the backstop for lost webhooks (0: no schedule).")]
Project = Annotated[str, typer.Option(help="Label Studio project the deployments train from.")]
ModelName = Annotated[str, typer.Option(help="Registered model name.")]
Workers = Annotated[int, typer.Option(help="Ray Train workers for each training.")]


@app.command()
@with_config_options(RetrainPolicy)
def up(
    label_studio: bool = typer.Option(True, help="Also start Label Studio (off when LABEL_STUDIO_URL names yours)."),
    deployments: bool = typer.Option(True, help="Also serve the deployments and run the webhook receiver."),
    project: Project = DEFAULT_PROJECT,
    model_name: ModelName = DEFAULT_MODEL,
    workers: Workers = 1,
    params: ParamsFile = None,
    interval: Interval = SENSOR_INTERVAL_S,
    webhook: bool = typer.Option(True, help="Register the project's Label Studio webhook to the receiver."),
    webhook_url: Optional[str] = typer.Option(None, help="The receiver's URL as Label Studio reaches it (a remote Label "
                                              "Studio cannot reach 127.0.0.1; put a proxy in front and give its URL)."),
    wait: bool = typer.Option(False, help="When the deployments must restart (other settings, Prefect moved) while a "
                              "pipeline run is in progress, wait for it to finish instead of refusing."),
    team: bool = typer.Option(False, help="Run Prefect, MLflow and Label Studio on the team backends: PostgreSQL and an S3 "
                              "bucket (RMFLOW_DATABASE_URL, RMFLOW_STORAGE_URL, AWS_*; README \"Team deployment\"), starting a "
                              "local PostgreSQL and SeaweedFS when those are not set."),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Start the local stack on 127.0.0.1 as background services: Prefect server, MLflow server,
    Label Studio, the webhook receiver and the served deployments (reward-pipeline with its
    labels-ready trigger, label-sensor, request-reannotation). A retrain starts when
    --min-new-labels annotations are new since the last successful run (--min-interval-s,
    --max-interval-s: see README, "Running rmflow as a service"). Safe to run again: it restarts only
    what runs with other settings, and never the deployments under a pipeline run (it names the
    run and stops; --wait waits for it)."""
    from pydantic import ValidationError

    from rmflow.flows.pipeline import PipelineParams
    from rmflow.infra import stack

    serve = None
    if deployments:
        try:
            pipeline = PipelineParams.model_validate(_pipeline_params(params, project, model_name, workers)).model_dump(mode="json")
            policy = RetrainPolicy.model_validate(overrides or {})
        except ValidationError as e:
            fail(f"invalid pipeline parameters: {e}")
        serve = {"params": pipeline, "policy": policy, "interval_s": interval, "webhook": webhook, "webhook_url": webhook_url}
    label_studio = label_studio and not os.environ.get("LABEL_STUDIO_URL")
    try:
        result = stack.up(label_studio, serve, wait=wait, team_backends=team)
    except Exception as e:  # noqa: BLE001 — a service that would not start: one clear line
        fail(_ls_failure(e) if "Label Studio" in str(e) else str(e))
    for name, svc in result.items():
        console.print(f"{name:12} {svc['url']}")
    if deployments:
        console.print(f"\nPrefect UI: {result['prefect']['url']}/deployments — run reward-pipeline from there; "
                      f"{policy.min_new_labels} new annotations in {serve['params'].get('project', project)} start it too.")
    emit(result)


@app.command()
def down() -> None:
    """Stop the services rmflow started (and nothing else)."""
    from rmflow.infra import stack

    emit(stack.down())


@app.command()
def status() -> None:
    """Each local service rmflow manages: URL, pid and whether its health check answers."""
    from rmflow.infra import stack

    result = stack.status()
    for name, svc in result.items():
        state = "[green]healthy[/]" if svc["healthy"] else ("[yellow]unhealthy[/]" if svc["running"] else "[dim]stopped[/]")
        console.print(f"{name:12} {state:24} {svc['url'] or '-':28} pid {svc['pid'] or '-'}"
                      + (f"  ({svc['reason']})" if svc["running"] and svc["reason"] else ""))
    emit(result)


@app.command()
def migrate(
    from_mlflow: Optional[str] = typer.Option(None, help="Source tracking URI (default: RMFLOW_HOME's embedded SQLite store)."),
    to_mlflow: Optional[str] = typer.Option(None, help="Target MLflow server (default: the one `rmflow up --team` started)."),
    data_from: Optional[Path] = typer.Option(None, help="Source data root (default: RMFLOW_HOME/datasets)."),
    data_to: Optional[str] = typer.Option(None, help="Target s3://BUCKET/PREFIX (default: the team bucket's datasets/)."),
    model: Optional[list[str]] = typer.Option(None, help="Only this registered model (repeatable; default: all)."),
    mlflow: bool = typer.Option(True, help="Copy the registered models."),
    data: bool = typer.Option(True, help="Copy the dataset versions."),
    labelstudio_export: Optional[Path] = typer.Option(None, help="Write Label Studio's projects, tasks and annotations to this file "
                                                      "(from LABEL_STUDIO_URL or the local server; run before `up --team`)."),
    labelstudio_import: Optional[Path] = typer.Option(None, help="Import such a file into Label Studio (after `up --team`)."),
    project: Optional[list[str]] = typer.Option(None, help="Export only this Label Studio project (repeatable; default: all)."),
) -> None:
    """Move an embedded install onto the team backends: every registered model's versions (files
    re-uploaded through the team MLflow server), tags, source runs and aliases, and the dataset
    versions into the bucket, each verified by sha256; Label Studio's projects through an export file.
    Never changes the source; safe to run again (copies nothing twice). README, "Team deployment"."""
    from mlflow.exceptions import MlflowException

    from rmflow.infra import migrate as mig
    from rmflow.infra.labelstudio_api import LabelStudioError
    from rmflow.infra.process import ServiceError

    try:
        result = mig.migrate(from_mlflow, to_mlflow, data_from, data_to, model or None, mlflow, data, labelstudio_export,
                             labelstudio_import, project or None)
    except (*EXPECTED, ServiceError, LabelStudioError, MlflowException) as e:  # MLflow's names the server it called
        fail(str(e))
    if "mlflow" in result:
        console.print(f"mlflow: {result['mlflow']['versions_copied']} version(s) copied, "
                      f"{len(result['mlflow']['versions'])} in all; aliases: "
                      + (", ".join(f"{a['name']}@{a['alias']} → {a['version']}" for a in result["mlflow"]["aliases"]) or "none"))
    if "datasets" in result:
        console.print(f"datasets: {result['datasets'].get('copied', 0)} file(s) copied, {result['datasets'].get('skipped', 0)} already there")
    emit(result)


@app.command()
@with_config_options(RetrainPolicy)
def serve(
    project: Project = DEFAULT_PROJECT,
    model_name: ModelName = DEFAULT_MODEL,
    workers: Workers = 1,
    params: ParamsFile = None,
    interval: Interval = SENSOR_INTERVAL_S,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Register and serve the deployments on the Prefect server, in the foreground (`rmflow up`
    runs this in the background)."""
    from rmflow.flows.deploy import serve_deployments
    from rmflow.flows.pipeline import PipelineParams
    from rmflow.infra import stack

    api = stack.prefect_api_url()
    if not api:
        fail("no Prefect server: run `rmflow up` or set PREFECT_API_URL")
    pipeline = PipelineParams.model_validate(_pipeline_params(params, project, model_name, workers))
    console.print(f"serving reward-pipeline, label-sensor and request-reannotation on {api} (Ctrl-C stops)")
    with stack.using_prefect(api):
        serve_deployments(pipeline, RetrainPolicy.model_validate(overrides or {}), interval)


@app.command()
def receiver(
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback exposes it to your network."),
    port: int = typer.Option(8765, help="Port."),
) -> None:
    """The webhook receiver, in the foreground: Label Studio annotation webhooks → Prefect events
    (needs PREFECT_API_URL; the shared secret is RMFLOW_WEBHOOK_SECRET or RMFLOW_HOME/receiver/secret)."""
    from rmflow.infra.receiver import serve as run

    run(host, port)


@app.command()
def demo(
    prompts: int = typer.Option(60, help="Synthetic prompts labelled first (they trigger the first training)."),
    more: int = typer.Option(60, help="Prompts labelled afterwards (they trigger the gated retrain); at most --prompts."),
    workers: int = typer.Option(2, help="Ray Train workers."),
) -> None:
    """End to end on a fresh machine, as a user operates it: `rmflow up` (servers, webhook
    receiver, deployments) → Label Studio + simulated annotators → webhook events → label trigger →
    reward-pipeline deployment runs (Ray training, MLflow registry, gate, champion), twice. The
    stack keeps running; `rmflow down` stops it."""
    from rmflow.flows.demo import run_demo

    try:
        result = run_demo(prompts, more, workers=workers, say=lambda m: console.print(f"[bold cyan]demo[/] {m}"))
    except (RuntimeError, TimeoutError, ValueError) as e:
        fail(str(e))
    console.print(f"\n[bold]champion[/]: {result['model_uri']} (version {result['champion_version']})")
    urls = result["urls"]
    console.print(f"  Prefect UI     {urls['prefect']}/deployments  → reward-pipeline → Run → Custom run: pick a loss, backbone, workers")
    console.print(f"  Label Studio   {urls['label_studio']}  (user {result['label_studio_user']}; password in RMFLOW_HOME/labelstudio/password)"
                  " — new annotations start a retrain")
    console.print(f"  MLflow         {urls['mlflow']}/#/models/{result['model_uri'].split('/')[1].split('@')[0]}")
    console.print(f"  score it:      rmflow score --model {result['model_uri']} --prompt '...' --response '...'")
    console.print("  stop it all:   rmflow down    (rmflow status shows what runs)")
    emit(result)


bench_app = typer.Typer(help="Benchmarks that print numbers (JSON lines); ratios are measured in one process.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


# name → (module under rmflow.bench, help); each forwards its arguments to the module's own parser
BENCHES = {
    "train": ("train_vs_trl", "rmflow vs TRL's RewardTrainer on the shared data."),
    "quality": ("quality", "Test accuracy: TRL defaults vs rmflow defaults vs rmflow tuned (Ray Tune, --trials budget)."),
    "secrets": ("secrets", "bt vs margin vs flip+margin vs soft+margin with an ensemble."),
    "slices": ("slices", "One reward model per preference-strength slice (Secrets of RLHF)."),
    "collect": ("collect", "Full vs incremental collection on a 20,000-task Label Studio project."),
    "serving": ("serving", "rmflow serve-rm vs mlflow models serve, same model, 1/8/32 clients."),
    "packing": ("packing", "Padded batch-of-8 vs length-bucketed vs packed, a random decoder on hh-rlhf lengths."),
}


def _bench(module: str):
    def run(ctx: typer.Context) -> None:
        import importlib

        importlib.import_module(f"rmflow.bench.{module}").main(ctx.args)

    return run


for _name, (_module, _help) in BENCHES.items():
    bench_app.command(_name, help=f"{_help} See `python -m rmflow.bench.{_module} --help`.",
                      context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_bench(_module))


def main() -> None:
    # no telemetry from Prefect's server or client: this machine has no internet and wants none
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
