"""Summarization: the XSUM test-article pool (``summarization/xsum/``) and DialogSum (``summarization/dialogsum/``).

XSUM: only 1,910 distinct *test* articles exist here (two overlapping 1,000-row files), so we make
our own split of that pool: ids sorted, shuffled with ``random.Random(XSUM_SPLIT_SEED)``, then
the first ``XSUM_SIZES["test"]`` are test, the next ``XSUM_SIZES["dev"]`` dev, the rest train.
Official XSUM: https://github.com/EdinburghNLP/XSum. DialogSum (train/dev: 1 reference, test: 3):
https://github.com/cylnlp/dialogsum.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import DataError, Example

XSUM_FILES = ("xsum_test_subset_lookback-lens.jsonl", "xsum_test_subset_llm-decoding.jsonl")
XSUM_SPLIT_SEED = 2021
XSUM_SIZES = {"test": 500, "dev": 200}  # train: the remaining 1,210
DIALOGSUM_FILES = {"train": "dialogsum.train.jsonl", "dev": "dialogsum.dev.jsonl", "valid": "dialogsum.dev.jsonl",
                   "test": "dialogsum.test.jsonl"}


def _jsonl(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _text(path: Path, n: int, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{n}: expected a non-empty string {field!r}")
    return value.strip()


def read_xsum(data_dir: str | Path, split: str) -> list[Example]:
    if split == "valid":
        split = "dev"
    if split not in ("train", "dev", "test"):
        raise ValueError(f"XSUM split must be train, dev or test, got {split!r}")
    pool: dict[str, Example] = {}
    for name in XSUM_FILES:
        path = Path(data_dir) / "summarization" / "xsum" / name
        for n, row in _jsonl(path):
            key = str(row.get("id"))
            pool.setdefault(key, Example(_text(path, n, row, "document"), _text(path, n, row, "summary"), key=key))
    ids = sorted(pool)
    random.Random(XSUM_SPLIT_SEED).shuffle(ids)
    test, dev = XSUM_SIZES["test"], XSUM_SIZES["dev"]
    chosen = {"test": ids[:test], "dev": ids[test : test + dev], "train": ids[test + dev :]}[split]
    return [pool[i] for i in chosen]


def read_dialogsum(data_dir: str | Path, split: str) -> list[Example]:
    if split not in DIALOGSUM_FILES:
        raise ValueError(f"DialogSum split must be one of {sorted(DIALOGSUM_FILES)}, got {split!r}")
    path = Path(data_dir) / "summarization" / "dialogsum" / DIALOGSUM_FILES[split]
    examples = []
    for n, row in _jsonl(path):
        source = _text(path, n, row, "dialogue")
        if "summary" in row:
            examples.append(Example(source, _text(path, n, row, "summary"), key=row.get("fname"), category=row.get("topic")))
        else:  # test: three references per dialogue, one example per reference
            for k in (1, 2, 3):
                examples.append(Example(source, _text(path, n, row, f"summary{k}"), key=row.get("fname"),
                                        category=row.get(f"topic{k}")))
    return examples
