"""Score a predictions file for a task, with the task's official metrics.

Predictions are one line per unique source (per entry for DART) in the reader's order, which is
what ``prefixtune generate --task T`` writes. E2E also takes the official layouts (see
``metrics.e2e.read_predictions``). WebNLG is reported as S (seen categories), U (unseen), A (all).
"""

from __future__ import annotations

from pathlib import Path

from .data import DataError, Example, data_dir, group_references, jsonl, read_task

MODEL_BASED = ("BERTScore", "BLEURT", "MoverScore")


def read_lines(path: str | Path, expected: int) -> list[str]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != expected:
        raise DataError(f"{path}: {len(lines)} lines, expected {expected} (one per unique source, in reader order)")
    return lines


def evaluate(task: str, predictions: str | Path, split: str = "test", references: str | Path | None = None,
             variant: str = "official", data: str | Path | None = None, ter: bool = True) -> dict:
    """Scores as ``{column: {metric: value}}``; column "A" (all), plus "S"/"U" for WebNLG.

    ``ter=False`` skips TER (pure Python, about 5 CPU minutes on DART test)."""
    from .metrics import e2e, rouge, webnlg

    if not Path(predictions).is_file():
        raise FileNotFoundError(f"predictions file not found: {predictions}")
    # settings a task has no use for are refused, not ignored: the scores would not be what was asked
    if references is not None and task not in ("e2e", "jsonl"):
        raise ValueError(f"--references is for --task e2e or jsonl; --task {task} scores against its {split} split "
                         "in the data directory")
    if variant != "official" and task != "e2e":
        raise ValueError(f"--variant {variant} is an E2E scorer variant; --task {task} has one scorer")
    if task == "jsonl" and split != "test":
        raise ValueError(f"--split {split} picks a named task's references; --task jsonl scores against --references")
    if task == "e2e":
        if references is None and variant == "official":
            official = {"test": "testset_w_refs.csv", "dev": "devset.csv", "valid": "devset.csv"}
            if split not in official:
                raise ValueError(f"E2E split must be one of {sorted(official)}, got {split!r}")
            name = official[split]
            references = data_dir(data) / "e2e" / "original" / name
        if references is not None:
            mrs, refs = e2e.read_references(references)
        else:  # the paper's variant scores against the tokenised references of the prefix-tuning files
            groups = group_references(read_task("e2e", split, data))
            mrs, refs = [g.source for g in groups], [g.references for g in groups]
        return {"A": e2e.score(e2e.read_predictions(predictions, mrs), refs, variant=variant)}

    groups = _groups(task, split, references, data)
    preds = read_lines(predictions, len(groups))
    refs = [g.references for g in groups]
    if task == "webnlg":
        columns = webnlg.columns([g.category for g in groups], _seen(data))
        return webnlg.score_columns(preds, refs, columns, max_refs=3, ter=ter)
    if task == "dart":
        return {"A": webnlg.score(preds, refs, max_refs=3, dataset="dart", ter=ter)}  # the official script reads 3 ref files
    if task in ("xsum", "dialogsum"):
        return {"A": rouge.score(preds, refs)}
    # jsonl: the table-to-text family (all references) and ROUGE
    return {"A": {**webnlg.score(preds, refs, max_refs=None, ter=ter), **rouge.score(preds, refs)}}


def _groups(task: str, split: str, references, data) -> list[Example]:
    if task == "jsonl":
        if references is None:
            raise ValueError("--task jsonl needs --references FILE.jsonl ({\"source\", \"target\"} rows)")
        return group_references(jsonl.read(references))
    return group_references(read_task(task, split, data))


def _seen(data) -> set[str]:
    from .data import webnlg as reader

    return reader.seen_categories(data_dir(data))


def format_table(scores: dict) -> str:
    metrics = list(dict.fromkeys(m for col in scores.values() for m in col))
    width = max(len(m) for m in metrics) + 2
    lines = [" " * width + "".join(f"{c:>10}" for c in scores)]
    for m in metrics:
        lines.append(f"{m:<{width}}" + "".join(f"{scores[c].get(m, float('nan')):>10.4f}" for c in scores))
    return "\n".join(lines)
