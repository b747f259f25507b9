"""Writing a file whole or not at all: the one way rmflow writes state that a crash, a power cut or
a concurrent reader must never see half-written (watermarks, snapshots, service state, secrets)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644, replace: bool = True) -> bool:
    """Writes `data` to a temporary file beside `path`, flushed to disk, then puts it in place in one
    step. With `replace=False` an existing file wins (two first writers of a secret must agree on
    one); returns whether this call's data is what `path` now holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            return True
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
