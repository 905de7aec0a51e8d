"""E2E NLG Challenge in the Prefix-Tuning layout: ``e2e/prefix_tuning_format/src1_{train,valid,test}.txt``.

Each line is ``name : The Eagle | Type : coffee shop | ...||tokenised text``; the table part is
already linearised as the paper does. Official files: https://github.com/tuetschek/e2e-dataset
(CSV) and https://github.com/XiangLi1999/PrefixTuning (this layout).
"""

from __future__ import annotations

from pathlib import Path

from . import DataError, Example

SPLITS = {"train": "src1_train.txt", "valid": "src1_valid.txt", "dev": "src1_valid.txt", "test": "src1_test.txt"}


def read(data_dir: str | Path, split: str) -> list[Example]:
    if split not in SPLITS:
        raise ValueError(f"E2E split must be one of {sorted(SPLITS)}, got {split!r}")
    path = Path(data_dir) / "e2e" / "prefix_tuning_format" / SPLITS[split]
    if not path.is_file():
        raise FileNotFoundError(f"E2E file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "||" not in line:
                raise DataError(f"{path}:{n}: expected 'table||text', found no '||' in {line[:80]!r}")
            source, target = line.split("||", 1)
            if not source.strip() or not target.strip():
                raise DataError(f"{path}:{n}: empty {'table' if not source.strip() else 'text'} in {line[:80]!r}")
            examples.append(Example(source.strip(), target.strip()))
    return examples
