"""`rmflow` — the command line. Thin: parse arguments, call rmcore/tasks/flows, print the result
as one JSON object on the last stdout line (rich output for humans goes to stderr)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import datasets
import typer
from transformers.utils import logging as hf_logging

from rmflow.output import console, emit, fail

# per-file "Loading weights" / "Saving the dataset" bars drown the CLI's own progress output
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reward-model stage of RLHF, end to end.")


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
    from rmcore.converters import KINDS, StrictModeError, convert_file
    from rmcore.dataset import write_preference_dataset

    if kind not in KINDS:
        fail(f"unknown KIND {kind!r}; expected one of {', '.join(KINDS)}")
    fractions = _fractions(split)
    ls_options = {}
    if kind == "label-studio":
        ls_options = {
            "prompt_field": prompt_field,
            "items_field": items_field,
            "label_config": label_config.read_text() if label_config else None,
        }
    try:
        result = convert_file(kind, input, strict=strict, **ls_options)
    except (StrictModeError, FileNotFoundError) as e:
        fail(str(e))
    options = {"kind": kind, **{k: v for k, v in ls_options.items() if v}}
    manifest = write_preference_dataset(result, out, options, fractions)
    summary = {k: manifest[k] for k in ("version", "prompts", "pairs", "ties", "groups", "quarantined", "cancelled", "splits")}
    console.print(
        f"[green]converted[/] {input} → {out}: {summary['pairs']} pairs, {summary['ties']} ties, "
        f"{summary['groups']} groups, {summary['quarantined']} quarantined (version {summary['version']})"
    )
    if manifest["quarantined"]:
        console.print(f"[yellow]quarantined records and reasons:[/] {out / 'quarantine.jsonl'}")
    emit({**summary, "intransitive": manifest["intransitive"], "duplicates": manifest["duplicates"], "out": str(out)})


def _run_config(config: Optional[Path], overrides: dict):
    """A RunConfig from an optional YAML/JSON file, overridden by the flags that were given."""
    import yaml
    from pydantic import ValidationError

    from rmcore.config import RunConfig

    base = yaml.safe_load(config.read_text()) if config else {}
    for section, values in overrides.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        elif values is not None:
            base[section] = values
    try:
        return RunConfig.model_validate(base)
    except ValidationError as e:
        fail(f"invalid run config: {e}")


@app.command()
def train(
    data: Path = typer.Option(..., help="Dataset folder written by `rmflow convert` or `rmflow collect`."),
    out: Path = typer.Option(Path("out/model"), help="Where the trained reward model is saved."),
    loss: Optional[str] = typer.Option(None, help="bt, bt_logexp, margin, kwise or plackett_luce."),
    backbone: Optional[str] = typer.Option(None, help="minilm or a Hugging Face checkpoint folder."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per (prompt, response)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the train split (default 1)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    pairs_per_step: Optional[int] = typer.Option(None, help="Strict pairs per optimiser step."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing α for pairwise losses."),
    adaptive_margin: Optional[float] = typer.Option(None, help="Coefficient of the per-pair strength margin."),
    center_rewards: Optional[float] = typer.Option(None, help="Reward-centering coefficient."),
    margin_scale: Optional[float] = typer.Option(None, help="Scale of the data margin in the margin loss."),
    pooling: Optional[str] = typer.Option(None, help="last, mean or first."),
    head: Optional[str] = typer.Option(None, help="auto, scalar or seqcls."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (0 = full fine-tuning)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="Enable gradient checkpointing."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers (0/1 = in-process)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="One GPU per Ray worker."),
    ray_address: Optional[str] = typer.Option(None, help="Existing Ray cluster (default RAY_ADDRESS / local)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    max_failures: Optional[int] = typer.Option(None, help="Worker-group restarts allowed."),
    ensemble: Optional[int] = typer.Option(None, help="Preference-strength ensemble size M (0 = off)."),
    strategy: Optional[str] = typer.Option(None, help="none, flip, soft, margin, flip+margin, soft+margin."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON RunConfig; flags override it."),
) -> None:
    """Train a reward model; prints pairs trained, speed and validation accuracy."""
    from tasks.train import run_training

    cfg = _run_config(config, {
        "loss": {"name": loss, "label_smoothing": label_smoothing, "adaptive_margin": adaptive_margin,
                 "center_rewards": center_rewards, "margin_scale": margin_scale},
        "model": {"backbone": backbone, "max_length": max_length, "pooling": pooling, "head": head,
                  "lora_r": lora_r, "gradient_checkpointing": gradient_checkpointing},
        "optim": {"epochs": epochs, "lr": lr, "pairs_per_step": pairs_per_step, "seed": seed, "eval_every": eval_every},
        "scale": {"workers": workers, "use_gpu": gpu, "ray_address": ray_address,
                  "checkpoint_every": checkpoint_every, "max_failures": max_failures},
        "strength": {"ensemble": ensemble, "strategy": strategy},
        "device": device,
    })
    try:
        summary = run_training(cfg, data, out)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    summary.pop("group_train_counts", None)
    summary.pop("history", None)
    console.print(f"[green]trained[/] {summary['pairs_trained']} pairs in {summary['train_s']:.1f}s "
                  f"({summary['pairs_per_s']:.1f} pairs/s); validation accuracy {summary['val_accuracy']:.3f} → {out}")
    emit(summary)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="A saved reward model folder."),
    data: Path = typer.Option(..., help="A dataset folder (its --split is used) or a raw preference file."),
    format: Optional[str] = typer.Option(None, "--format", help="Format of a raw file: label-studio, hh-rlhf, qa-feedback, trl."),
    split: str = typer.Option("test", help="Split of a dataset folder."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Accuracy, ties, ECE and margin of a saved reward model."""
    from rmcore.evaluate import evaluate_saved_model

    try:
        metrics, _ = evaluate_saved_model(model, data, split, format, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"accuracy {metrics['accuracy']:.3f} on {metrics['n']} pairs ({metrics['ties']} ties), ECE {metrics['ece']:.3f}")
    emit(metrics)


@app.command()
def promote(
    model: Optional[Path] = typer.Option(None, help="Saved reward model folder to register, evaluate and gate."),
    name: str = typer.Option("rmflow-reward", help="Registered model name."),
    eval_data: Optional[Path] = typer.Option(None, help="Evaluation set: a dataset folder (its --split) or a raw file."),
    split: str = typer.Option("test", help="Split of a dataset folder to evaluate on."),
    format: Optional[str] = typer.Option(None, "--format", help="Format of a raw evaluation file."),
    min_accuracy: Optional[float] = typer.Option(None, help="Gate: minimum strict accuracy."),
    max_ece: Optional[float] = typer.Option(None, help="Gate: maximum ECE."),
    max_length_bias: Optional[float] = typer.Option(None, help="Gate: maximum |Spearman(reward, length)|."),
    delta: Optional[float] = typer.Option(None, help="Gate: allowed accuracy drop vs the champion (CI low ≥ -δ)."),
    rollback: bool = typer.Option(False, "--rollback", help="Move `champion` back to `previous` instead."),
) -> None:
    """Register a model in MLflow, evaluate it, and promote it to `champion` if it passes the gate."""
    from rmcore.config import GateConfig
    from tasks import registry

    if rollback:
        try:
            result = registry.rollback(name)
        except ValueError as e:
            fail(str(e))
        console.print(f"[yellow]rolled back[/] {name}: champion is now version {result['champion_version']}")
        emit(result)
        return
    if model is None or eval_data is None:
        fail("--model and --eval-data are required (or --rollback)")
    gate = GateConfig(**{k: v for k, v in {"min_accuracy": min_accuracy, "max_ece": max_ece,
                                            "max_length_bias": max_length_bias, "delta": delta}.items() if v is not None})
    try:
        result = registry.promote(model, name, eval_data, gate, split, format)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    result.pop("report_markdown")
    verdict = "[green]promoted[/]" if result["passed"] else "[red]refused[/]"
    console.print(f"{verdict} {name} v{result['version']}; champion is v{result['champion_version']}")
    for reason in result["reasons"]:
        console.print(f"  - {reason}")
    emit({k: result[k] for k in ("version", "passed", "reasons", "champion_version", "metrics", "created")})


@app.command()
def score(
    model: str = typer.Option(..., help="models:/NAME@champion, models:/NAME/VERSION, runs:/… or a model folder."),
    prompt: list[str] = typer.Option(..., help="Prompt (repeat for a batch)."),
    response: list[str] = typer.Option(..., help="Response (repeat; one per --prompt)."),
) -> None:
    """Score (prompt, response) pairs with a reward model."""
    from rmcore.scoring import load_scorer

    try:
        rewards = load_scorer(model).score(prompt, response).tolist()
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    for p, r, s in zip(prompt, response, rewards):
        console.print(f"{s:+.4f}  {p[:40]!r} → {r[:40]!r}")
    emit({"rewards": rewards, "model": model})


def _ls_failure(e: Exception) -> str:
    from label_studio_sdk.core.api_error import ApiError

    from tasks import labelstudio as lst

    if isinstance(e, ApiError):
        return lst.describe_api_error(e)
    if isinstance(e, (lst.LabelStudioError, OSError, ValueError)):
        return str(e)
    raise e


ls_app = typer.Typer(help="The local Label Studio server, projects and simulated annotators.", no_args_is_help=True)
app.add_typer(ls_app, name="labelstudio")


@ls_app.command("up")
def ls_up(port: int = typer.Option(8080, help="Preferred port (a busy one moves to a free one).")) -> None:
    """Install (once) and start Label Studio on 127.0.0.1; prints its URL."""
    from infra import labelstudio

    try:
        result = labelstudio.up(port, log=console.print)
    except RuntimeError as e:
        fail(str(e))
    console.print(f"Label Studio at [bold]{result['url']}[/] (user {labelstudio.ADMIN}; token in {labelstudio.ls_home() / 'token'})")
    emit(result)


@ls_app.command("down")
def ls_down() -> None:
    """Stop the Label Studio that rmflow started (and nothing else)."""
    from infra import labelstudio

    emit({"stopped": labelstudio.down()})


@ls_app.command("status")
def ls_status() -> None:
    from infra import labelstudio

    emit(labelstudio.status())


@ls_app.command("seed")
def ls_seed(
    project: str = typer.Option(..., help="Project title (created if missing)."),
    synthetic: int = typer.Option(0, help="Import N synthetic prompts with a hidden gold reward."),
    k: int = typer.Option(4, help="Responses per prompt."),
    from_file: Optional[Path] = typer.Option(None, "--from", help="JSONL of {prompt, responses[], order?[]}, or a "
                                             "dataset's rankings.jsonl (annotators then replay the human orders)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Create the ranking project and import tasks (re-importing the same content adds nothing)."""
    from rmcore.synthetic import synthetic_items
    from tasks import labelstudio as lst

    if from_file:
        items = lst.items_from_file(from_file)
    else:
        items = [{"prompt": i.prompt, "responses": i.responses, "gold": i.gold} for i in synthetic_items(synthetic, k, seed)]
    try:
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
    from tasks import labelstudio as lst

    try:
        project_id = lst.ensure_project(lst.connect(), project, 4)
        result = lst.simulate_annotators(project_id, annotators, noise, seed)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    emit(result)


@ls_app.command("reannotate")
def ls_reannotate(
    project: str = typer.Option(..., help="Project title."),
    data: Path = typer.Option(..., help="A strength-annotated dataset folder (written by `rmflow train --ensemble M`)."),
    max_tasks: int = typer.Option(50, help="Send at most this many new re-annotation tasks."),
) -> None:
    """Active labelling: send the ensemble's most doubtful pairs back as tasks tagged for re-annotation;
    their labels supersede the old ones at the next `rmflow collect`."""
    from tasks import labelstudio as lst

    try:
        result = lst.request_reannotation(project, data, max_tasks)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    console.print(f"{result['sent']} pairs sent for re-annotation ({result['candidates']} doubtful pairs in {data})")
    emit(result)


@app.command()
def collect(
    project: str = typer.Option(..., help="Label Studio project title."),
    out: Path = typer.Option(Path("out/labels"), help="Dataset root: versions are written to OUT/<version>/."),
) -> None:
    """Pull rankings from Label Studio into a versioned dataset; a second call with nothing new
    reports 0 and writes no new version."""
    from tasks import labelstudio as lst

    try:
        summary = lst.collect_rankings(project, out)
    except Exception as e:  # noqa: BLE001 — turned into one clear line below
        fail(_ls_failure(e))
    lst.commit_watermark(out, summary["watermark"])
    console.print(f"{summary['new_rankings']} new rankings ({summary['total_rankings']} in all, "
                  f"{summary['quarantined']} quarantined) → {summary['dataset']}")
    emit(summary)


@app.command()
def up(label_studio: bool = typer.Option(True, help="Also start Label Studio.")) -> None:
    """Start the local stack (Prefect server, MLflow server, Label Studio) on 127.0.0.1."""
    from infra import stack

    try:
        result = stack.up(label_studio)
    except RuntimeError as e:
        fail(str(e))
    for name, svc in result.items():
        console.print(f"{name:12} {svc['url']}")
    emit(result)


@app.command()
def down() -> None:
    """Stop the services rmflow started (and nothing else)."""
    from infra import stack

    emit(stack.down())


@app.command()
def status() -> None:
    """Which local services run, and where."""
    from infra import stack

    emit(stack.status())


@app.command()
def serve(
    project: str = typer.Option("rmflow-rankings", help="Label Studio project to watch."),
    model_name: str = typer.Option("rmflow-reward", help="Registered model name."),
    min_new_labels: int = typer.Option(20, help="New annotations that trigger a retrain."),
    interval: int = typer.Option(300, help="Seconds between label-sensor runs."),
    workers: int = typer.Option(1, help="Ray Train workers for each training."),
) -> None:
    """Register and serve the pipeline and label-sensor deployments on the Prefect server."""
    from flows.deploy import serve_deployments
    from flows.pipeline import PipelineParams
    from infra import stack

    api = stack.prefect_api_url()
    if not api:
        fail("no Prefect server: run `rmflow up` or set PREFECT_API_URL")
    console.print(f"serving reward-pipeline and label-sensor on {api} (Ctrl-C stops)")
    with stack.using_prefect(api):
        serve_deployments(PipelineParams(project=project, model_name=model_name, run={"scale": {"workers": workers}}),
                          min_new_labels, interval)


@app.command()
def demo(
    prompts: int = typer.Option(60, help="Synthetic prompts labelled before the first training."),
    more: int = typer.Option(30, help="Prompts labelled afterwards, to trigger the retrain."),
    workers: int = typer.Option(2, help="Ray Train workers."),
) -> None:
    """End to end on a fresh machine: Label Studio + simulated annotators → Prefect pipeline →
    Ray training → MLflow registry, gate and champion; then new labels trigger a gated retrain."""
    from flows.demo import run_demo

    result = run_demo(prompts, more, workers=workers, say=lambda m: console.print(f"[bold cyan]demo[/] {m}"))
    console.print(f"\n[bold]champion[/]: {result['model_uri']} (version {result['champion_version']})")
    for name, url in result["urls"].items():
        console.print(f"  {name:13} {url}")
    console.print(f"  score it:     rmflow score --model {result['model_uri']} --prompt '...' --response '...'")
    emit(result)


bench_app = typer.Typer(help="Benchmarks that print numbers (JSON lines); ratios are measured in one process.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_train(ctx: typer.Context) -> None:
    """rmflow vs TRL's RewardTrainer on the shared data (see `python -m bench.train_vs_trl --help`)."""
    from bench.train_vs_trl import main as run

    run(ctx.args)


@bench_app.command("secrets", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_secrets(ctx: typer.Context) -> None:
    """bt vs margin vs flip+margin vs soft+margin with an ensemble (see `python -m bench.secrets --help`)."""
    from bench.secrets import main as run

    run(ctx.args)


def _fractions(spec: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        fail(f"--split must be three numbers, got {spec!r}")
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        fail(f"--split must be three non-negative fractions summing to 1, got {spec!r}")
    return parts  # type: ignore[return-value]


def main() -> None:
    # no telemetry from Prefect's server or client: this machine has no internet and wants none
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
