"""Atomic text writes: every run, ledger, report and job file prefixtune keeps is written to a
temporary name beside it, then renamed over it, so a crash or a reader in another process never
sees half a file. The temporary name is unique per process and call (grid processes and server
threads write side by side). Prefix files: :func:`prefixtune.prefix.save_safetensors`."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
