"""Paired comparisons for the experiment reports: mean difference, 95% interval, verdict.

Two systems (e.g. prefix-tuning and fine-tuning) are compared on *paired runs* (the same training
subsample and seed, one run of each) scored on the *same test items*. Every run keeps per-item
sufficient statistics of each metric (``stats[run, item, k]``: BLEU's n-gram counts, a ROUGE
F-score and a count of 1, slot errors and slots...), from which ``metric`` computes the corpus
score of any multiset of items, so a corpus-level metric such as BLEU is resampled exactly.

The interval has two sources of variation:

- **test items**: a bootstrap over the test items (each replicate draws the items with replacement,
  the same draw for every run, which keeps the pairing, and recomputes every run's corpus metric);
  its variance is that of the mean difference over test sets like this one;
- **runs**: the variance of the per-pair differences across run pairs (other subsamples and seeds)
  divided by the number of pairs.

The interval is mean ± t x sqrt(sum of the two variances), with Welch-Satterthwaite degrees of
freedom (the run part has pairs - 1; the item part is taken as exact). Why not a percentile
bootstrap over runs too: with 2-6 run pairs it is far too narrow (measured in tests/test_stats.py:
61% coverage of a 95% interval with 2 pairs, 83% with 6, when runs vary); the t interval keeps the
nominal coverage. With one run pair the interval reflects test-item variation only; the reports
say so.

Verdict of a finding with an expected direction (the paper's): *holds* when the interval lies
entirely on the paper's side of 0, *reversed* when it lies entirely on the other side, *not
separable at this scale* when it covers 0. While fewer run pairs are complete than the experiment
plans, the reports mark the verdict provisional (``report.verdict_label``): with one pair the
interval has no seed variation in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HOLDS, REVERSED, NOT_SEPARABLE, MISSING = "holds", "reversed", "not separable at this scale", "runs missing"


@dataclass
class Comparison:
    diff: float  # mean over run pairs of metric(a) - metric(b), on all test items
    low: float  # 95% interval of that mean (test items and run pairs)
    high: float
    pairs: int
    items: int
    a: float  # mean metric of each system
    b: float
    planned: int = 0  # run pairs the experiment plans (0: not stated); see report.verdict_label
    unconverged: tuple[str, ...] = ()  # runs of the pairs still improving at their step cap (report.at_cap)

    def verdict(self, expected: int, digits: int | None = None) -> str:
        """``expected``: +1 if the paper finds a > b, -1 if a < b. ``digits``: the decimals the
        interval is reported with (see :func:`verdict`)."""
        return verdict(self.low, self.high, expected, digits)

    def text(self, digits: int = 2) -> str:
        return f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def verdict(low: float, high: float, expected: int, digits: int | None = None) -> str:
    """*holds* / *reversed* when the interval [low, high] excludes 0 on the expected / the other side,
    else *not separable*. With ``digits`` (the decimals the interval is reported with), a bound
    that rounds to 0 there counts as 0: a reader must not see "+0.00 [+0.00, +0.00]" called a
    difference (two near-zero BLEU scores, 6e-14 and 6e-10, did that). Without it, only float
    noise (1e-9) is ignored."""
    if expected not in (1, -1):
        raise ValueError(f"expected must be +1 or -1, got {expected}")
    tiny = 1e-9 if digits is None else max(1e-9, 0.5 * 10.0**-digits)
    if low >= tiny or high <= -tiny:
        return HOLDS if (low >= tiny) == (expected > 0) else REVERSED
    return NOT_SEPARABLE


def paired_bootstrap(a, b, metric: Callable, replicates: int = 2000, seed: int = 0, level: float = 0.95,
                     chunk: int = 250) -> Comparison:
    """Compare systems ``a`` and ``b``: arrays ``[pairs, items, k]`` of per-item statistics (pair ``r``
    of ``a`` and of ``b`` share subsample and seed; item ``i`` is the same test item everywhere).
    ``metric(summed)`` maps summed statistics ``[..., k]`` to scores ``[...]`` (vectorised)."""
    from scipy.stats import t as student

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"need two [pairs, items, stats] arrays of one shape, got {a.shape} and {b.shape}")
    pairs, items, _ = a.shape
    if pairs == 0 or items == 0:
        raise ValueError("nothing to compare (no run pairs or no test items)")
    ma, mb = metric(a.sum(axis=1)), metric(b.sum(axis=1))
    d = ma - mb  # per pair, on all test items
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, replicates, chunk):
        n = min(chunk, replicates - start)
        weights = rng.multinomial(items, np.full(items, 1 / items), size=n).astype(np.float64)  # [n, items]
        dd = metric(np.einsum("bi,rik->brk", weights, a)) - metric(np.einsum("bi,rik->brk", weights, b))  # [n, pairs]
        reps.append(dd.mean(axis=1))
    v_items = float(np.var(np.concatenate(reps), ddof=1))
    v_runs = float(np.var(d, ddof=1)) / pairs if pairs > 1 else 0.0
    if v_runs > 0:
        df = (v_items + v_runs) ** 2 / (v_runs ** 2 / (pairs - 1))
        half = float(student.ppf(0.5 + level / 2, df)) * (v_items + v_runs) ** 0.5
    else:
        from statistics import NormalDist

        half = NormalDist().inv_cdf(0.5 + level / 2) * v_items ** 0.5
    diff = float(d.mean())
    return Comparison(diff, diff - half, diff + half, pairs, items, float(np.mean(ma)), float(np.mean(mb)))


# --- metrics from summed per-item statistics ------------------------------------------------------


def mean_of_first(summed):
    """Mean of a per-item score stored as ``[score, 1]``."""
    s = np.asarray(summed, dtype=np.float64)
    return s[..., 0] / np.maximum(s[..., 1], 1e-12)


def percent_ratio(summed):
    """100 x (sum of the first statistic) / (sum of the last): e.g. slot errors per table value."""
    s = np.asarray(summed, dtype=np.float64)
    return 100 * s[..., 0] / np.maximum(s[..., -1], 1e-12)
