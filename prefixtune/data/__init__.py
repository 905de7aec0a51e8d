"""Dataset readers: one file per dataset. Each returns a list of :class:`Example` in file order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    source: str
    target: str
    references: list[str] = field(default_factory=list)  # all references of this source (multi-reference scoring)


class DataError(ValueError):
    """Malformed input: the message names the file and line."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit``, else $PREFIXTUNE_DATA, else ../shared/data when it exists."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get("PREFIXTUNE_DATA"):
        path = Path(os.environ["PREFIXTUNE_DATA"])
    else:
        path = Path("../shared/data")
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist; pass --data DIR or set PREFIXTUNE_DATA "
            "(see README, 'Data', for where to get the official files)"
        )
    return path


def group_references(examples: list[Example]) -> list[Example]:
    """One example per unique source, in first-appearance order, with all its targets as references."""
    grouped: dict[str, Example] = {}
    for ex in examples:
        if ex.source not in grouped:
            grouped[ex.source] = Example(ex.source, ex.target, [])
        grouped[ex.source].references.extend(ex.references or [ex.target])
    return list(grouped.values())
