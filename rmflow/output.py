"""The CLI contract: humans get rich output on stderr; the result is one JSON object on the last
stdout line, so scripts can `tail -1 | jq`."""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def emit(result: dict[str, Any]) -> None:
    # strict JSON: NaN/inf (an empty split's accuracy, say) become null
    sys.stdout.write(json.dumps(_finite(result), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def fail(message: str, code: int = 1, **extra: Any) -> None:
    """Prints the error for humans, the JSON result for scripts, and exits non-zero."""
    console.print(f"[bold red]error:[/] {message}")
    emit({"error": message, **extra})
    raise SystemExit(code)
