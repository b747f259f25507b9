"""Command-line options generated from the pydantic configs, as HfArgumentParser does for
dataclasses: one flag per field, the field's description is its help, its flag is the field name
in kebab case (or the `cli` name declared on the field). Adding a config field adds its flag."""
from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(`section.field`, FieldInfo) of every non-model field, nested sections flattened."""
    out = []
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += leaf_fields(f.annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", f))
    return out


def flag_of(dotted: str, f: FieldInfo) -> str:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return str(extra.get("cli") or dotted.rsplit(".", 1)[-1]).replace("_", "-")


def _choices(annotation: Any) -> list[str]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    out: list[str] = []
    for a in args:
        if isinstance(a, type) and issubclass(a, Enum):
            out += [str(m.value) for m in a]
        elif typing.get_origin(a) is Literal:
            out += [str(v) for v in typing.get_args(a)]
    return out


def _cli_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    return base if base in (bool, int, float) else str


def config_parameters(model: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, tuple[str, inspect.Parameter]]:
    """Python parameter name → (`section.field`, the typer parameter) for every field of `model`."""
    params: dict[str, tuple[str, inspect.Parameter]] = {}
    flags: dict[str, str] = {}
    for dotted, f in leaf_fields(model):
        if dotted.split(".")[0] in skip:
            continue
        flag = flag_of(dotted, f)
        if flag in flags:
            raise ValueError(f"CLI flag --{flag} would serve both {flags[flag]} and {dotted}: declare a `cli` name")
        flags[flag] = dotted
        kind = _cli_type(f.annotation)
        choices = _choices(f.annotation)
        default = f.get_default(call_default_factory=True)
        default = default.value if isinstance(default, Enum) else default
        help_text = (f.description or "") + (f" One of: {', '.join(choices)}." if choices else "") + f" [config {dotted}; default {default}]"
        decl = f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"
        option = typer.Option(None, decl, help=help_text, show_default=False)
        py_name = flag.replace("-", "_")
        params[py_name] = (dotted, inspect.Parameter(py_name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                                     annotation=Optional[kind]))
    return params


def with_config_options(model: type[BaseModel], skip: tuple[str, ...] = ()):
    """Adds one option per field of `model` to a typer command; the command receives them as
    `overrides`: `section.field` → value, only those given on the command line."""
    generated = config_parameters(model, skip)

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "overrides"]
        clash = {p.name for p in own} & set(generated)
        if clash:
            raise ValueError(f"{fn.__name__}: parameters {sorted(clash)} clash with generated config options")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            overrides = {generated[k][0]: kwargs.pop(k) for k in list(kwargs) if k in generated}
            return fn(**kwargs, overrides={k: v for k, v in overrides.items() if v is not None})

        command.__signature__ = sig.replace(parameters=own + [p for _, p in generated.values()])
        return command

    return decorate


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`section.field=value` pairs (values read as YAML scalars: 3, 0.5, true, null, text)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes section.field=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
