"""WebNLG Challenge 2017 (XML release under ``webnlg2017/``), linearised as the Prefix-Tuning paper does.

Source: `` | subject : property : object`` before each modified triple (so it starts with " | ").
Training pairs use the references marked ``comment="good"`` (all of them in this release), as the
paper's code does. Test: ``test/testdata_with_lex.xml``; an entry is *unseen* (``U``) when its
category does not occur in training, else *seen* (``S``); ``A`` = all.
Official data: https://gitlab.com/shimorina/webnlg-dataset (2017 challenge release), or the
Prefix-Tuning repository's ``data/webnlg_challenge_2017/``.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from . import DataError, Example

SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "test": "test/testdata_with_lex.xml"}


def linearise(triples: list[tuple[str, str, str]]) -> str:
    return "".join(f" | {s} : {p} : {o}" for s, p, o in triples)


def parse_xml(path: Path, good_only: bool = True, linearise=linearise, skip_empty: bool = False) -> list[Example]:
    """Examples of one WebNLG-format XML file (one per reference), keyed by entry id (DART uses it too).

    An empty reference is an error, unless ``skip_empty`` (DART's official test references leave
    them out), in which case the skipped ones are reported in a warning."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line = e.position[0] if hasattr(e, "position") else "?"
        raise DataError(f"{path}:{line}: malformed XML ({e})") from None
    examples, skipped = [], []
    for entry in root.iter("entry"):
        eid = entry.get("eid")
        triples = []
        for t in entry.iter("mtriple"):
            parts = [x.strip() for x in (t.text or "").split(" | ")]
            if len(parts) != 3:
                raise DataError(f"{path}: entry {eid}: triple {t.text!r} is not 'subject | property | object'")
            triples.append(tuple(parts))
        if not triples:
            raise DataError(f"{path}: entry {eid} has no <mtriple>")
        lexes = [lex for lex in entry.iter("lex") if not good_only or lex.get("comment", "good") == "good"]
        for lex in lexes:
            text = (lex.text or "").strip()
            if not text:
                if skip_empty:
                    skipped.append(f"{eid}/{lex.get('lid')}")
                    continue
                raise DataError(f"{path}: entry {eid}, lex {lex.get('lid')}: empty reference")
            examples.append(Example(linearise(triples), text, key=f"{path.name}#{eid}", category=entry.get("category")))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} empty reference(s): {', '.join(skipped[:10])}", stacklevel=2)
    return examples


def read(data_dir: str | Path, split: str) -> list[Example]:
    if split not in SPLITS:
        raise ValueError(f"WebNLG split must be one of {sorted(SPLITS)}, got {split!r}")
    base = Path(data_dir) / "webnlg2017"
    target = base / SPLITS[split]
    files = sorted(target.glob("*triples/*.xml")) if target.is_dir() else [target]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"WebNLG {split} files not found under {target}")
    return [ex for f in files for ex in parse_xml(f)]


def seen_categories(data_dir: str | Path) -> set[str]:
    """Categories of the training set: test entries outside them are the 'unseen' (U) columns."""
    return {ex.category for ex in read(data_dir, "train")}
