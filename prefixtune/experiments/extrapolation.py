"""Experiment 3, extrapolation: WebNLG trained on its seen categories and scored on seen (S) / unseen (U)
/ all (A) test categories (the paper's Table 1, WebNLG columns); XSUM trained on news articles and
scored on news and on sport articles (the paper's news -> sports split; topics derived from the text)."""

from __future__ import annotations

from ..data.summarization import XSUM_SIZES
from . import Scale
from .report import bar_plot, compare, finding, fmt, mean, metric, scored_items, spread, table
from .runs import SPORT_WORDS

TITLE = "Extrapolation: unseen WebNLG categories and an unseen XSUM topic"
SCALE_TEXT = ("WebNLG: a random subset of {s.webnlg_train_examples} of the training pairs (all from the 10 seen "
              "categories; the full 18k is too slow here), {s.seeds} seeds, batch {s.batch_size}, prefix length 10, "
              "adapters of 3%; {webnlg}, {beams}, the official "
              "metrics. XSUM: prefix (length 10) and fine-tuning trained on the news articles of our XSUM training split "
              "(sources cut to {s.max_source_tokens} tokens), {s.seeds} seeds, selected on dev loss; scored on up to "
              "{s.summary_test_examples} news and {s.summary_test_examples} sport articles of our "
              f"{XSUM_SIZES['test']}-article XSUM test split (the table gives how many it has) with the paper's summarization decoding.")
METHODS = ("prefix", "finetune", "adapter-3")
XSUM_METHODS = ("prefix", "finetune")
WEBNLG_PAPER = {"prefix": (62.9, 45.6, 55.1), "finetune": (64.2, 27.7, 46.5), "adapter-3": (60.4, 48.3, 54.9)}  # Table 1 BLEU S/U/A


def webnlg_runs(scale: Scale, method: str):
    ev = scale.eval("webnlg")
    return [scale.run("webnlg", method, train_examples=scale.webnlg_train_examples, sampling=0, seed=s, evals=(ev,))
            for s in range(scale.seeds)]


def xsum_evals(scale: Scale):
    return {t: scale.eval("xsum", summary=True, subset=t) for t in ("news", "sport")}


def xsum_runs(scale: Scale, method: str):
    return [scale.run("xsum", method, summary=True, train_topic="news", seed=s, evals=tuple(xsum_evals(scale).values()))
            for s in range(scale.seeds)]


def plan(scale: Scale):
    return [r for m in METHODS for r in webnlg_runs(scale, m)] + [r for m in XSUM_METHODS for r in xsum_runs(scale, m)]


def report(results, scale: Scale, ctx) -> str:
    ev = scale.eval("webnlg")
    web = {m: webnlg_runs(scale, m) for m in METHODS}
    rows = []
    for m in METHODS:
        cells = [spread([metric(results, r, ev, "BLEU", c) for r in web[m]]) for c in "SUA"]
        rows.append([m, *cells, fmt(mean([metric(results, r, ev, "METEOR", "U") for r in web[m]]), 3),
                     fmt(mean([metric(results, r, ev, "TER", "U") for r in web[m]]), 3), " / ".join(map(str, WEBNLG_PAPER[m]))])
    xe = xsum_evals(scale)
    xs = {m: xsum_runs(scale, m) for m in XSUM_METHODS}
    xrows = [[m] + [spread([metric(results, r, e, "ROUGE-L") for r in xs[m]]) for e in xe.values()] for m in XSUM_METHODS]
    plot = ctx.plot_path("bleu")
    bar_plot(plot, ["WebNLG seen", "WebNLG unseen", "XSUM news (R-L)", "XSUM sport (R-L)"],
             {m: [mean([metric(results, r, ev, "BLEU", c) for r in web[m]]) for c in "SU"]
              + ([mean([metric(results, r, e, "ROUGE-L") for r in xs[m]]) for e in xe.values()] if m in xs else [None, None])
              for m in METHODS}, "score", "Seen vs unseen")
    findings = [
        finding(ctx, "Prefix-tuning beats fine-tuning on unseen WebNLG categories", "45.6 vs 27.7 BLEU (+17.9)",
                compare(results, web["prefix"], web["finetune"], ev, "BLEU", "U"), +1, "BLEU on U, prefix − fine-tuning"),
        finding(ctx, "Prefix-tuning beats fine-tuning on all WebNLG categories", "55.1 vs 46.5 (+8.6)",
                compare(results, web["prefix"], web["finetune"], ev, "BLEU"), +1, "BLEU on A, prefix − fine-tuning"),
        finding(ctx, "Fine-tuning is slightly ahead on seen WebNLG categories", "62.9 vs 64.2 (−1.3)",
                compare(results, web["prefix"], web["finetune"], ev, "BLEU", "S"), -1, "BLEU on S, prefix − fine-tuning"),
        finding(ctx, "Adapters (3%) are slightly ahead of prefix-tuning on unseen categories", "45.6 vs 48.3 (−2.7: adapters ahead)",
                compare(results, web["prefix"], web["adapter-3"], ev, "BLEU", "U"), -1, "BLEU on U, prefix − adapter 3%"),
        finding(ctx, "Prefix-tuning beats fine-tuning on an unseen XSUM topic (news → sport)", "prefix ahead (Table 4)",
                compare(results, xs["prefix"], xs["finetune"], xe["sport"], "ROUGE-L"), +1, "ROUGE-L on sport, prefix − fine-tuning"),
    ]
    drops = []
    for m in METHODS:
        s = mean([metric(results, r, ev, "BLEU", "S") for r in web[m]])
        u = mean([metric(results, r, ev, "BLEU", "U") for r in web[m]])
        drops.append(f"{m} {'—' if None in (s, u) else f'{u - s:+.2f}'}")
    return "\n".join([
        "## WebNLG, trained on the seen categories (BLEU; METEOR and TER on U)", "",
        table(["method", "BLEU S", "BLEU U", "BLEU A", "METEOR U", "TER U", "paper BLEU S / U / A"], rows), "",
        f"Seen → unseen BLEU change (mean over seeds): {', '.join(drops)} (paper: prefix −17.3, fine-tuning −36.5, adapters −12.1).", "",
        "## XSUM, trained on news: ROUGE-L on news (seen topic) and sport (unseen topic)", "",
        table(["method"] + [f"{t} ({n} test articles)" if (n := scored_items(results, [r for m in xs.values() for r in m], e))
                            else t for t, e in xe.items()], xrows), "",
        "Topics: XSUM's rows here have no URL or section field, so an article is *sport* when its text uses at least "
        f"4 distinct words of this list, else *news*: {', '.join(SPORT_WORDS)} "
        "(`prefixtune.experiments.runs.xsum_topic`); the paper splits by URL on the full dataset.", "",
        f"![extrapolation]({plot.name})", "", "## Findings", "", *findings, ""])
