"""Experiment 3, extrapolation: WebNLG trained on seen categories, scored on seen vs unseen ones; XSUM
trained on news articles, scored on news vs sport articles (topics derived from the text)."""

from __future__ import annotations

from . import Scale
from .report import fmt, holds, mean, metric, table, bar_plot
from .runs import SPORT_WORDS
from .table_to_text import evals as t2t_evals, runs_for as t2t_runs

TITLE = "Extrapolation: unseen WebNLG categories and unseen XSUM topics"
SCALE_TEXT = ("WebNLG: the table-to-text experiment's WebNLG runs (its training set has only the seen categories), "
              "{s.steps} steps of batch {s.batch_size}, {s.test_examples} test entries, half seen and half unseen; "
              "XSUM: prefix (length 10) and fine-tuning trained on the news articles of our XSUM training split "
              "({s.summary_steps} steps of batch {s.summary_batch_size}, articles cut to {s.max_source_tokens} tokens), "
              "scored on {s.summary_test_examples} news and {s.summary_test_examples} sport test articles; decoding {beams}.")
METHODS = ("prefix", "finetune")


def xsum_evals(scale: Scale):
    return {t: scale.eval("xsum", summary=True, subset=t) for t in ("news", "sport")}


def xsum_run(scale: Scale, method: str):
    return scale.run("xsum", method, summary=True, train_topic="news", evals=tuple(xsum_evals(scale).values()))


def plan(scale: Scale):
    web = t2t_runs(scale, "webnlg")
    return [r for m in METHODS for r in web[m]] + [xsum_run(scale, m) for m in METHODS]


def _counts() -> str:
    from collections import Counter

    from .runs import read_task, xsum_topic

    parts = []
    for split in ("train", "test"):
        c = Counter(xsum_topic(e.source) for e in read_task("xsum", split))
        parts.append(f"{split}: {c['news']} news, {c['sport']} sport")
    return "Articles per topic: " + "; ".join(parts) + "."


def report(results, scale: Scale, ctx) -> str:
    web, ev = t2t_runs(scale, "webnlg"), t2t_evals(scale)["webnlg"]
    w = {m: {c: mean([metric(results, r, ev, "BLEU", c) for r in web[m]]) for c in "SUA"} for m in METHODS}
    rows = [[m, fmt(w[m]["S"]), fmt(w[m]["U"]), fmt(w[m]["A"]), p] for m, p in zip(METHODS, ("62.9 / 45.6 / 55.1", "64.2 / 27.7 / 46.5"))]
    xe = xsum_evals(scale)
    x = {m: {t: [metric(results, xsum_run(scale, m), e, k) for k in ("ROUGE-1", "ROUGE-2", "ROUGE-L")] for t, e in xe.items()}
         for m in METHODS}
    xrows = [[m, " / ".join(fmt(v) for v in x[m]["news"]), " / ".join(fmt(v) for v in x[m]["sport"])] for m in METHODS]
    plot = ctx.plot_path("bleu")
    bar_plot(plot, ["WebNLG seen", "WebNLG unseen", "XSUM news (R-L)", "XSUM sport (R-L)"],
             {m: [w[m]["S"], w[m]["U"], x[m]["news"][2], x[m]["sport"][2]] for m in METHODS}, "score",
             "Seen vs unseen: prefix vs fine-tuning")
    gap_u = None if None in (w["prefix"]["U"], w["finetune"]["U"]) else w["prefix"]["U"] - w["finetune"]["U"]
    gap_s = None if None in (x["prefix"]["sport"][2], x["finetune"]["sport"][2]) else x["prefix"]["sport"][2] - x["finetune"]["sport"][2]
    return "\n".join([
        "## WebNLG: trained on seen categories (BLEU)", "",
        table(["method", "seen S", "unseen U", "all A", "paper S / U / A"], rows), "",
        "## XSUM: trained on news, tested on news and on sport (ROUGE-1 / 2 / L)", "",
        table(["method", "news (seen topic)", "sport (unseen topic)"], xrows), "",
        "Topics: XSUM's rows here have no URL or section field, so an article is *sport* when its text uses at least "
        f"4 distinct words of this list, else *news*: {', '.join(SPORT_WORDS)} "
        "(`prefixtune.experiments.runs.xsum_topic`). Training uses the news articles of our XSUM training split "
        "(prefixtune/data/summarization.py: a fixed split of the 1,910 XSUM test-pool articles present here); the "
        "paper's split is news → sport from XSUM's URLs on the full dataset. " + _counts(), "",
        f"![extrapolation]({plot.name})", "",
        "## Which findings hold at this scale", "",
        f"- **Unseen WebNLG categories** (paper: prefix 45.6 vs fine-tuning 27.7 BLEU): ours {fmt(w['prefix']['U'])} vs "
        f"{fmt(w['finetune']['U'])}" + ("" if gap_u is None else f" ({gap_u:+.2f}). ")
        + holds(None if gap_u is None else gap_u > 0, "Holds in direction.", "Does not hold here."),
        f"- **Unseen XSUM topic** (paper: prefix ahead of fine-tuning on news → sport): ROUGE-L on sport, prefix "
        f"{fmt(x['prefix']['sport'][2])} vs fine-tuning {fmt(x['finetune']['sport'][2])}. "
        + holds(None if gap_s is None else gap_s > 0, "Holds in direction.", "Does not hold here."),
        "- **Drop from seen to unseen** (the paper's point is that prefix-tuning extrapolates better): WebNLG BLEU "
        f"S → U: prefix {_drop(w['prefix']['S'], w['prefix']['U'])}, fine-tuning {_drop(w['finetune']['S'], w['finetune']['U'])}; "
        f"XSUM ROUGE-L news → sport: prefix {_drop(x['prefix']['news'][2], x['prefix']['sport'][2])}, fine-tuning "
        f"{_drop(x['finetune']['news'][2], x['finetune']['sport'][2])}. A smaller drop for the prefix is in the paper's "
        "direction even where fine-tuning's absolute score is higher.",
        "- One seed per method: gaps of a couple of points are within seed noise at this scale.", ""])


def _drop(seen, unseen) -> str:
    return "—" if seen is None or unseen is None else f"{unseen - seen:+.2f}"
