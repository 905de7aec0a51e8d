"""ROUGE for summarisation (XSUM, DialogSum), with Google's ``rouge-score`` package.

ROUGE-1, ROUGE-2 and ROUGE-L use the Porter stemmer and rouge-score's default tokeniser (lower-case, runs
of ``[a-z0-9]``). This is the setup of the BART/PEGASUS/Prefix-Tuning XSUM numbers. ROUGE-Lsum is the
summary-level LCS over sentences, and rouge-score takes sentences from newlines: we put each sentence on
its own line first (split after ``.``, ``!`` or ``?`` followed by whitespace; nltk's punkt model, which
others use, is a download we cannot make here). Newlines do not change the other three metrics.

Scores are F-measures, averaged over examples and given as 0-100. With several references per example
(DialogSum has 3), each metric takes the best reference of the example (rouge-score's ``score_multi``:
highest F-measure, chosen per metric) before averaging.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

METRICS = {"ROUGE-1": "rouge1", "ROUGE-2": "rouge2", "ROUGE-L": "rougeL", "ROUGE-Lsum": "rougeLsum"}


def score(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean F-measure (0-100) of ROUGE-1/2/L/Lsum; ``references[i]`` is one string or a list of strings."""
    per = item_scores(predictions, references)
    return {name: sum(row[name] for row in per) / len(per) for name in METRICS}


def item_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[dict[str, float]]:
    """Per example, the F-measure (0-100) of ROUGE-1/2/L/Lsum (best reference per metric)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions")
    scorer = rouge_scorer.RougeScorer(list(METRICS.values()), use_stemmer=True)
    out = []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"references[{i}] is empty")
        scores = scorer.score_multi([sentence_lines(r) for r in refs], sentence_lines(prediction))
        out.append({name: 100 * scores[key].fmeasure for name, key in METRICS.items()})
    return out


def sentence_lines(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum."""
    return "\n".join(part for line in text.splitlines() for part in SENTENCE_END.split(line.strip()) if part)
