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
    key: str | None = None  # what references are grouped by; None = the source text (DART test: the entry id)
    category: str | None = None  # WebNLG/DART category, DialogSum topic, ...


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
        key = ex.key if ex.key is not None else ex.source
        if key not in grouped:
            grouped[key] = Example(ex.source, ex.target, [], ex.key, ex.category)
        grouped[key].references.extend(ex.references or [ex.target])
    return list(grouped.values())


# --- named tasks ---------------------------------------------------------------------------------

TASKS = ("e2e", "webnlg", "dart", "xsum", "dialogsum", "jsonl")
TABLE_TO_TEXT = {"num_beams": 5, "max_new_tokens": 80}
# the paper's summarisation decoding (BART on XSUM): beam 6, with length limits
SUMMARIZATION = {"num_beams": 6, "max_new_tokens": 60, "min_new_tokens": 10, "no_repeat_ngram_size": 3}
DECODING = {"e2e": TABLE_TO_TEXT, "webnlg": TABLE_TO_TEXT, "dart": TABLE_TO_TEXT, "jsonl": TABLE_TO_TEXT,
            "xsum": SUMMARIZATION, "dialogsum": SUMMARIZATION}


def read_task(task: str, split: str, data: str | os.PathLike | None = None) -> list[Example]:
    """Examples of a named task's split, read from the data directory."""
    from . import dart, e2e, summarization, webnlg

    readers = {"e2e": e2e.read, "webnlg": webnlg.read, "dart": dart.read,
               "xsum": summarization.read_xsum, "dialogsum": summarization.read_dialogsum}
    if task not in readers:
        raise ValueError(f"unknown task {task!r}; named tasks are {sorted(readers)} (or jsonl with a file)")
    return readers[task](data_dir(data), split)
