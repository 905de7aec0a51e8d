"""Experiment 5, prefix length (the paper's Figure 4): E2E lengths 1-40 and XSUM lengths 10-200;
quality and decoding speed per length."""

from __future__ import annotations

from . import Scale
from .report import compare, find, finding, fmt, line_plot, mean, metric, sd, spread, table, train_info

TITLE = "Prefix length: quality and speed (E2E, XSUM)"
SCALE_TEXT = ("E2E: lengths {s.lengths}, {s.train_size} training pairs (sampling 0), {s.seeds} seeds, {e2e}, "
              "{beams}. XSUM: lengths {s.summary_lengths} on our 1,210-article XSUM training split, sources cut "
              "to {s.max_source_tokens} tokens, {s.seeds} seeds, selected on dev loss, {s.summary_test_examples} test "
              "articles with the paper's summarization decoding. Decoding speed: output tokens per CPU second of the "
              "whole test decode (batch 48; CPU time, since the decodes ran with 1 or 2 threads beside other work).")


def e2e_runs(scale: Scale, length: int):
    ev = scale.eval("e2e")
    return [scale.run("e2e", "prefix", length=length, train_examples=scale.train_size, sampling=0, seed=s, evals=(ev,))
            for s in range(scale.seeds)]


def xsum_runs(scale: Scale, length: int):
    return [scale.run("xsum", "prefix", summary=True, length=length, seed=s, evals=(scale.eval("xsum", summary=True),))
            for s in range(scale.seeds)]


def plan(scale: Scale):
    return [r for n in scale.lengths for r in e2e_runs(scale, n)] + [r for n in scale.summary_lengths for r in xsum_runs(scale, n)]


def _speed(results, run, ev):
    """Output tokens per CPU second of the run's test decode (per wall second where CPU time was not
    counted): wall time swings with the decode's threads (1 or 2) and whatever else ran; CPU time much
    less (measured on this ledger: 23-80 tokens per wall second, 33-40 per CPU second for E2E)."""
    r = find(results, run)
    if r is None or ev.key() not in r["evals"]:
        return None
    e = r["evals"][ev.key()]
    return e["output_tokens"] / (e.get("decode_cpu_seconds") or e["decode_seconds"])


def report(results, scale: Scale, ctx) -> str:
    ev, xv = scale.eval("e2e"), scale.eval("xsum", summary=True)
    e_rows, bleu, bleu_sd, speed = [], [], [], []
    for n in scale.lengths:
        runs = e2e_runs(scale, n)
        b = [metric(results, r, ev, "BLEU") for r in runs]
        bleu.append(mean(b))
        bleu_sd.append(sd(b))
        speed.append(mean([_speed(results, r, ev) for r in runs]))
        e_rows.append([n, fmt(train_info(results, runs[0], "stored_percent"), 3), spread(b),
                       spread([metric(results, r, ev, "SER") for r in runs]),
                       fmt(mean([train_info(results, r, "dev_loss") for r in runs]), 3), fmt(speed[-1], 1)])
    x_rows, rl, rl_sd = [], [], []
    for n in scale.summary_lengths:
        runs = xsum_runs(scale, n)
        v = [metric(results, r, xv, "ROUGE-L") for r in runs]
        rl.append(mean(v))
        rl_sd.append(sd(v))
        x_rows.append([n, fmt(train_info(results, runs[0], "stored_percent"), 3),
                       " / ".join(fmt(mean([metric(results, r, xv, k) for r in runs])) for k in ("ROUGE-1", "ROUGE-2")), spread(v),
                       fmt(mean([train_info(results, r, "dev_loss") for r in runs]), 3),
                       fmt(mean([_speed(results, r, xv) for r in runs]), 1)])
    p1, p2 = ctx.plot_path("e2e"), ctx.plot_path("xsum")
    line_plot(p1, list(scale.lengths), {"E2E BLEU": (bleu, bleu_sd)}, "prefix length", "BLEU", "E2E by prefix length", logx=True)
    line_plot(p2, list(scale.summary_lengths), {"XSUM ROUGE-L": (rl, rl_sd)}, "prefix length", "ROUGE-L", "XSUM by prefix length", logx=True)
    findings = []
    if 10 in scale.lengths:
        ten = e2e_runs(scale, 10)
        for other in (n for n in scale.lengths if n != 10):
            findings.append(finding(ctx, f"Length 10 beats length {other} on E2E", "table-to-text best at 10; shorter is "
                                    "worse, longer slightly worse (Figure 4)", compare(results, ten, e2e_runs(scale, other), ev, "BLEU"),
                                    +1, f"BLEU, length 10 − length {other}"))
    lo, hi = min(scale.summary_lengths), max(scale.summary_lengths)
    findings.append(finding(ctx, f"Length {hi} beats length {lo} on XSUM", "summarization improves up to length 200 "
                            "(Figure 4)", compare(results, xsum_runs(scale, hi), xsum_runs(scale, lo), xv, "ROUGE-L"), +1,
                            f"ROUGE-L, length {hi} − length {lo}"))
    return "\n".join([
        "## E2E", "", table(["length", "stored %", "BLEU", "SER %", "dev NLL (selected)", "decode tokens/CPU s"], e_rows), "",
        "## XSUM", "", table(["length", "stored %", "ROUGE-1 / 2 (mean)", "ROUGE-L", "dev NLL (selected)",
                              "decode tokens/CPU s"], x_rows), "",
        f"![E2E by length]({p1.name})", "", f"![XSUM by length]({p2.name})", "",
        "## Findings", "", *findings, "",
        "Decoding speed comes from the test decodes, which ran beside other work: results/perf.md has the controlled "
        "decoding benchmark (length 200 vs 10: 0.86x greedy, 0.90x beam 5).", ""])
