"""Paired bootstrap intervals and verdicts (prefixtune/experiments/stats.py), and the per-item BLEU
statistics they resample (they must give the scorers' corpus BLEU on any subset)."""

import csv
from pathlib import Path

import numpy as np
import pytest

from prefixtune.experiments import stats
from prefixtune.metrics import e2e, webnlg

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def scores(rng, pairs, items, shift, item_sd=5.0, run_sd=1.0, noise=1.0):
    """Per-item scores [pairs, items, 2] ([score, 1]: a mean metric) of two systems on shared items:
    item difficulty shared by both systems, a per-run offset, and independent noise."""
    difficulty = rng.normal(50, item_sd, size=items)
    def system(offset):
        runs = offset + rng.normal(0, run_sd, size=(pairs, 1))
        x = difficulty + runs + rng.normal(0, noise, size=(pairs, items))
        return np.stack([x, np.ones_like(x)], axis=-1)
    return system(shift), system(0.0)


def test_clearly_separated_systems_hold_and_reverse():
    rng = np.random.default_rng(1)
    a, b = scores(rng, pairs=4, items=300, shift=3.0)
    c = stats.paired_bootstrap(a, b, stats.mean_of_first)
    assert c.low > 0 and abs(c.diff - 3.0) < 1.5 and c.pairs == 4 and c.items == 300
    assert c.verdict(+1) == stats.HOLDS and c.verdict(-1) == stats.REVERSED
    d = stats.paired_bootstrap(b, a, stats.mean_of_first)
    assert d.high < 0 and d.verdict(+1) == stats.REVERSED


@pytest.mark.parametrize("pairs,run_sd", [(2, 1.0), (6, 1.0), (3, 0.0)])
def test_null_case_covers_zero_about_95_percent_of_the_time(pairs, run_sd):
    """Coverage of the 95% interval when the systems are equal: runs that vary (run_sd > 0) or not.
    (A percentile bootstrap over run pairs covered 61% with 2 pairs and 83% with 6 here.)"""
    rng = np.random.default_rng(2)
    covered = 0
    for k in range(100):
        a, b = scores(rng, pairs=pairs, items=120, shift=0.0, run_sd=run_sd)
        c = stats.paired_bootstrap(a, b, stats.mean_of_first, replicates=300, seed=k)
        covered += c.verdict(+1) == stats.NOT_SEPARABLE
    assert 88 <= covered <= 100


def test_run_variance_widens_the_interval():
    """Same item noise, but runs that disagree: the interval must be wider than with agreeing runs."""
    rng = np.random.default_rng(3)
    a1, b1 = scores(rng, pairs=4, items=200, shift=1.0, run_sd=0.0)
    a2, b2 = scores(rng, pairs=4, items=200, shift=1.0, run_sd=3.0)
    w1 = stats.paired_bootstrap(a1, b1, stats.mean_of_first)
    w2 = stats.paired_bootstrap(a2, b2, stats.mean_of_first)
    assert (w2.high - w2.low) > 2 * (w1.high - w1.low)


def test_identical_systems_are_not_separable_and_bad_shapes_are_refused():
    a = np.ones((2, 5, 2))
    assert stats.paired_bootstrap(a, a, stats.mean_of_first).verdict(+1) == stats.NOT_SEPARABLE
    with pytest.raises(ValueError, match="shape"):
        stats.paired_bootstrap(a, np.ones((2, 4, 2)), stats.mean_of_first)
    with pytest.raises(ValueError):
        stats.verdict(-1, 1, 0)


def test_a_difference_below_the_reported_precision_is_not_a_verdict():
    # two near-zero BLEU scores (6e-14 and 6e-10, in points: 6e-12 and 6e-8) reported as +0.00 [+0.00, +0.00]
    assert stats.verdict(5.6e-8, 5.6e-8, +1) == stats.HOLDS  # float-noise tolerance only
    assert stats.verdict(5.6e-8, 5.6e-8, +1, digits=2) == stats.NOT_SEPARABLE
    assert stats.verdict(-0.004, -0.001, +1, digits=2) == stats.NOT_SEPARABLE  # shown as [-0.00, -0.00]
    assert stats.verdict(0.006, 0.02, +1, digits=2) == stats.HOLDS  # shown as [+0.01, +0.02]
    assert stats.verdict(-0.02, -0.006, +1, digits=2) == stats.REVERSED
    assert stats.verdict(0.004, 0.02, -1, digits=3) == stats.REVERSED  # [+0.004, +0.020]


def test_e2e_bleu_from_item_stats_equals_the_scorer_on_subsets():
    rows = list(csv.DictReader(open(DATA / "e2e" / "original" / "testset_w_refs.csv", encoding="utf-8")))
    refs = {}
    for r in rows:
        refs.setdefault(r["mr"], []).append(r["ref"])
    refs = list(refs.values())
    out = (DATA / "system_outputs" / "e2e-cleaning" / "train-orig_test-orig" / "tgen-std.run0.txt").read_text().splitlines()
    items = np.array(e2e.pymteval_bleu_item_stats(out, refs))
    assert items.shape == (630, 9)
    assert abs(e2e.pymteval_bleu_from_stats(items.sum(0)) - e2e.pymteval_bleu_nist(out, refs)[0]) < 1e-12
    sub = list(range(0, 630, 7))
    # the references' n-gram weights do not enter BLEU: a subset's BLEU needs only its own items
    expected = e2e.pymteval_bleu_nist([out[i] for i in sub], [refs[i] for i in sub])[0]
    assert abs(e2e.pymteval_bleu_from_stats(items[sub].sum(0)) - expected) < 1e-12
    batch = e2e.pymteval_bleu_from_stats(np.stack([items.sum(0), items[sub].sum(0)]))
    assert batch.shape == (2,) and abs(batch[1] - expected) < 1e-12


def test_webnlg_bleu_from_item_stats_equals_the_scorer_on_subsets():
    from prefixtune.data import group_references, read_task

    groups = group_references(read_task("webnlg", "test", DATA))
    out = (DATA / "system_outputs" / "dart" / "bart-large_webnlg-all.txt").read_text(encoding="utf-8").splitlines()
    refs = [g.references for g in groups]
    items = np.array(webnlg.bleu_item_stats(out, refs))
    full = webnlg.score(out, refs, meteor=False, ter=False)["BLEU"]
    assert abs(webnlg.bleu_from_stats(items.sum(0)) - full) < 1e-9
    sub = list(range(1, len(out), 5))
    part = webnlg.score([out[i] for i in sub], [refs[i] for i in sub], meteor=False, ter=False)["BLEU"]
    assert abs(webnlg.bleu_from_stats(items[sub].sum(0)) - part) < 1e-9
