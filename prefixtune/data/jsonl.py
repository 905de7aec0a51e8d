"""Generic JSONL: one ``{"source": ..., "target": ..., "references": [...]?}`` object per line."""

from __future__ import annotations

import json
from pathlib import Path

from . import DataError, Example


def read(path: str | Path, need_target: bool = True) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("source"), str):
                raise DataError(f'{path}:{n}: expected an object with a string "source", got {line.strip()[:80]!r}')
            if need_target and "target" not in row:
                raise DataError(f'{path}:{n}: no "target" (training and scoring need one per row), got {line.strip()[:80]!r}')
            target = row.get("target", "")
            if not isinstance(target, str) or (need_target and not target.strip()):
                raise DataError(f'{path}:{n}: expected a non-empty string "target", got {target!r}')
            refs = row.get("references") or []
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise DataError(f'{path}:{n}: "references" must be a list of strings')
            examples.append(Example(row["source"], target, refs))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
