"""METEOR 1.5, run through the jar that pycocoevalcap ships (with its English paraphrase table).

All three official scorers we reproduce call the same jar the same way: ``-l en -norm``, one aggregate
score over the whole corpus (not a mean of sentence scores). The E2E scorer talks to it through
pycocoevalcap's ``-stdio`` wrapper; the WebNLG and DART scripts run it on files (``-r N`` with the
references padded by empty lines). Both give the same number: the jar scores each reference separately
and keeps the best one, and an empty padding reference never beats a real one (checked on the WebNLG and
DART outputs, see tests/test_metrics.py). So we always use the stdio wrapper, which lets one JVM score
several corpora.

Needs ``java`` on PATH (the jar wants up to 2 GB of heap).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from pycocoevalcap.meteor.meteor import Meteor


class Meteor15:
    """One METEOR 1.5 JVM (``-l en -norm``), reused for any number of corpora. Use as a context manager."""

    def __init__(self):
        # Starting the JVM and loading the paraphrase table is the slow part (seconds); scoring is fast.
        self._meteor = Meteor()

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """The jar's aggregate METEOR of ``hypotheses[i]`` against ``references[i]`` (a list of strings each).

        Empty strings in a reference list are scored as references (the file mode's padding lines).
        """
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        # The jar reads one request per line, fields separated by '|||'. pycocoevalcap already deletes
        # '|||' from hypotheses (as the E2E scorer does); we must keep it out of references ourselves.
        res = {i: [_one_line(h)] for i, h in enumerate(hypotheses)}
        gts = {i: [_one_line(r).replace("|||", "| | |") for r in refs] for i, refs in enumerate(references)}
        score, _ = self._meteor.compute_score(gts, res)
        return float(score)

    def close(self) -> None:
        # pycocoevalcap only stops the JVM in __del__; closing its stdin ends it now.
        process = self._meteor.meteor_p
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()

    def __enter__(self) -> Meteor15:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
