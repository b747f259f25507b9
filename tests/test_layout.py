"""The layout the design fixes, checked on the source: rmcore imports no service layer, stage
modules never import each other, infra reaches no stage or flow, and no module imports itself
back through a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {"rmcore": "rmcore", "rmflow": "rmflow", "tasks": "rmflow.tasks", "flows": "rmflow.flows",
             "infra": "rmflow.infra", "bench": "rmflow.bench"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in INSTALLED.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {m: imports(p, set(modules())) - {m} for m, p in modules().items()}


def test_rmcore_imports_no_service_layer():
    for mod, deps in GRAPH.items():
        if mod.startswith("rmcore"):
            assert all(d.startswith("rmcore") for d in deps), (mod, deps)


def test_stage_modules_never_import_each_other():
    for mod, deps in GRAPH.items():
        if mod.startswith("rmflow.tasks."):
            assert not [d for d in deps if d.startswith("rmflow.tasks")], (mod, deps)
            assert not [d for d in deps if d.startswith(("rmflow.flows", "rmflow.cli", "rmflow.bench"))], (mod, deps)


def test_infra_reaches_no_stage_flow_or_cli():
    for mod, deps in GRAPH.items():
        if mod.startswith("rmflow.infra"):
            assert not [d for d in deps if d.startswith(("rmflow.tasks", "rmflow.flows", "rmflow.cli", "rmflow.bench"))], (mod, deps)


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in GRAPH.get(mod, ()):
            if dep in GRAPH and not (dep.count(".") < mod.count(".") and mod.startswith(dep + ".")):  # a package's own modules
                assert state.get(dep) != 1, " → ".join(path + [dep])
                if dep not in state:
                    visit(dep, path + [dep])
        state[mod] = 2

    for mod in GRAPH:
        if mod not in state:
            visit(mod, [mod])


def test_the_registered_model_code_needs_rmcore_only():
    """The pyfunc's code file ships with rmcore (code_paths) and nothing else of the project, so
    loading the champion never needs rmflow installed."""
    assert {d.split(".")[0] for d in GRAPH["rmflow.tasks.reward_pyfunc"]} <= {"rmcore"}
