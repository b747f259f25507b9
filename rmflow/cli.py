"""`rmflow` — the command line. Thin: parse arguments, call rmcore/tasks/flows, print the result
as one JSON object on the last stdout line (rich output for humans goes to stderr)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rmflow.output import console, emit, fail

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


def _fractions(spec: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        fail(f"--split must be three numbers, got {spec!r}")
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        fail(f"--split must be three non-negative fractions summing to 1, got {spec!r}")
    return parts  # type: ignore[return-value]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
