"""DART v1.1.1 (``dart/``): dev JSON and test XML; there is no train split here (evaluation and transfer target).

Source: ``subject : relation : object`` joined by `` | ``, relations lower-cased, as the Prefix-Tuning
code does. References are grouped per XML entry (``key`` = entry id), which is how the official
DART references are laid out (one line per entry). Official data: https://github.com/Yale-LILY/dart.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import DataError, Example
from .webnlg import parse_xml

FILES = {"dev": "dart-v1.1.1-full-dev.json", "valid": "dart-v1.1.1-full-dev.json", "test": "dart-v1.1.1-full-test.xml"}


def linearise(triples) -> str:
    return " | ".join(f"{s} : {p.lower()} : {o}" for s, p, o in triples)


def read(data_dir: str | Path, split: str) -> list[Example]:
    if split not in FILES:
        raise ValueError(f"DART split must be one of {sorted(FILES)} (there is no train split), got {split!r}")
    path = Path(data_dir) / "dart" / FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"DART file not found: {path}")
    if path.suffix == ".xml":
        # the WebNLG XML format; every <lex> is a reference (its comment names the source dataset)
        return parse_xml(path, good_only=False, linearise=linearise, skip_empty=True)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    examples = []
    for i, row in enumerate(rows):
        triples = row.get("tripleset")
        if not triples or any(len(t) != 3 for t in triples):
            raise DataError(f"{path}: item {i}: 'tripleset' must be a list of [subject, relation, object]")
        for ann in row.get("annotations", []):
            if not ann.get("text", "").strip():
                raise DataError(f"{path}: item {i}: empty annotation text")
            examples.append(Example(linearise(triples), ann["text"].strip(), key=f"{i}", category=ann.get("source")))
    return examples
