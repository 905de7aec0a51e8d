"""Writes the README's architecture support table from tests/architectures.py (the matrix the tests run).

    python scripts/support_table.py          # rewrite the table in README.md
    python scripts/support_table.py --check  # exit 1 if README.md's table is not the generated one
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- support-table:start (scripts/support_table.py) -->", "<!-- support-table:end -->"


def table() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from architectures import ARCHS

    works = [a for a in ARCHS if a.expect == "works"]
    refused = [a for a in ARCHS if a.expect == "refused"]
    lines = [f"{len(works)} configurations work and {len(refused)} are refused with an error that names them "
             f"(transformers {_version()}; each row is a tiny random config tested in `tests/test_architectures.py`).",
             "", "| family | `model_type` | kind | attention tested | prefix |", "| --- | --- | --- | --- | --- |"]
    for a in works + refused:
        kind = "encoder-decoder" if a.seq2seq else "decoder-only"
        status = "works" + (", words in front" if a.rotary else "") if a.expect == "works" else f"refused: {a.why}"
        lines.append(f"| {a.family} | `{a.model_type}` | {kind} | {', '.join(a.attn)} | {status} |")
    lines += ["", "\"words in front\": a words-initialised prefix equals running the words in front of the input "
              "(relative positions); elsewhere the words' activations at positions 0..n-1."]
    return "\n".join(lines)


def _version() -> str:
    import transformers

    return transformers.__version__


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md's support table is out of date: run python scripts/support_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
