"""The CLI contract: humans get rich output on stderr; the result is one JSON object on the last
stdout line, so scripts can `tail -1 | jq`."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1, **extra: Any) -> None:
    """Prints the error for humans, the JSON result for scripts, and exits non-zero."""
    console.print(f"[bold red]error:[/] {message}")
    emit({"error": message, **extra})
    raise SystemExit(code)
