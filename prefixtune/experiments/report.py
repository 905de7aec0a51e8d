"""Small helpers the experiment reports share: finding scores in results, paired comparisons and
their verdicts, tables, spreads, plots."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from . import ledger, stats
from .runs import Eval, Run, step_seconds, training_seconds


def find(results: list[dict], run: Run) -> dict | None:
    """The result of ``run`` (None if it failed)."""
    key = run.training()
    for r in results:
        if r.get("run") == key and "error" not in r:
            return r
    return None


# the E2E scorer reports these as fractions; the paper (and our tables) in percent
PERCENT = {"e2e": ("BLEU", "METEOR", "ROUGE_L")}


def metric(results: list[dict], run: Run, ev: Eval, name: str, column: str = "A") -> float | None:
    r = find(results, run)
    if r is None or ev.key() not in r["evals"]:
        return None
    value = r["evals"][ev.key()]["scores"].get(column, {}).get(name)
    return value * 100 if value is not None and name in PERCENT.get(ev.task, ()) else value


def scored_items(results: list[dict], runs: list[Run], ev: Eval) -> str:
    """How many test items the finished runs of ``runs`` were scored on, e.g. "77" ("" if none is)."""
    found = sorted({r["evals"][ev.key()]["n"] for run in runs if (r := find(results, run)) and ev.key() in r["evals"]})
    return "/".join(map(str, found))


def item_stats(results: list[dict], run: Run, ev: Eval, name: str, subset: str | None = None) -> list | None:
    """Per-item statistics of ``name`` (see runs.score_outputs) of one evaluation; ``subset``: WebNLG "S"/"U"."""
    r = find(results, run)
    if r is None or ev.key() not in r["evals"] or "items" not in r["evals"][ev.key()]:
        return None
    items = r["evals"][ev.key()]["items"]
    rows = items.get(name)
    if rows is None:
        return None
    if subset:
        rows = [x for x, c in zip(rows, items["category"]) if c == subset]
    return rows


def metric_fn(task: str, name: str):
    """The corpus metric of ``name`` computed from summed per-item statistics (vectorised)."""
    from ..metrics import e2e, webnlg

    if name == "BLEU":
        return (lambda s: 100 * e2e.pymteval_bleu_from_stats(s)) if task == "e2e" else webnlg.bleu_from_stats
    if name == "SER":
        return stats.percent_ratio
    return stats.mean_of_first  # ROUGE-1/2/L


def compare(results: list[dict], a: list[Run], b: list[Run], ev: Eval, name: str, subset: str | None = None,
            ev_b: Eval | None = None) -> stats.Comparison | None:
    """Paired comparison of runs ``a[i]`` vs ``b[i]`` (same subsample and seed) on metric ``name`` of
    evaluation ``ev`` (``ev_b`` for b if another); pairs where either run is missing are left out.
    None without any complete pair."""
    pairs, used = [], []
    for ra, rb in zip(a, b):
        x, y = item_stats(results, ra, ev, name, subset), item_stats(results, rb, ev_b or ev, name, subset)
        if x is not None and y is not None:
            pairs.append((x, y))
            used += [ra, rb]
    if not pairs:
        return None
    c = stats.paired_bootstrap([x for x, _ in pairs], [y for _, y in pairs], metric_fn(ev.task, name))
    unconverged = [run.label() for run in used if (cap := at_cap(find(results, run)["train"])) and cap["still_improving"]]
    return replace(c, planned=len(a), unconverged=tuple(dict.fromkeys(unconverged)))


def at_cap(train: dict) -> dict | None:
    """How a run stood when its step cap, not its stopping rule, ended it (None when the stopping rule
    did): ``best_step``, ``cap``, ``after_best`` (evaluations after its best) and ``still_improving``
    (its best evaluation is its last one: it had not converged within the cap), with ``last_gain``, how
    much that last evaluation bettered the best before it (dev BLEU points or dev-loss nats; None if
    it is the first). The learning rate decays to 0 over the cap, so the last evaluations' gains are small
    by design; a run still improving there is flagged, not discarded."""
    if train.get("stopped_early", True) or train.get("best_step") is None:  # (None: it never evaluated)
        return None
    key = train.get("selected_by") or "dev_loss"
    curve = [h for h in train["dev_curve"] if h["step"] > 0 and h.get(key) is not None]
    best = train["best_step"]
    after = sum(h["step"] > best for h in curve)
    earlier = [h[key] for h in curve if h["step"] < best]
    gain = None
    if not after and earlier:
        last = curve[-1][key]
        gain = last - max(earlier) if key == "dev_score" else min(earlier) - last
    return {"best_step": best, "cap": train.get("max_steps", train["steps"]), "after_best": after,
            "still_improving": not after, "last_gain": gain, "selected_by": key}


def cap_section(results: list[dict], runs: list[Run]) -> str:
    """The report's list of its finished runs that the step cap ended ("" when there is none)."""
    rows = []
    for run in {r.key(): r for r in runs}.values():
        r = find(results, run)
        cap = r and at_cap(r["train"])
        if not cap:
            continue
        still = "**yes**" if cap["still_improving"] else "no"
        if cap["last_gain"] is not None:  # (a gain in dev BLEU, a fall in dev loss)
            still += (f": dev BLEU +{cap['last_gain']:.4f}" if cap["selected_by"] == "dev_score"
                      else f": dev loss −{cap['last_gain']:.4f}") + " at its last evaluation"
        rows.append([f"`{run.label()}`", f"`{run.key()}`", cap["best_step"], cap["cap"], cap["after_best"], still])
    if not rows:
        return ""
    return "\n".join([
        "## Runs ended by the step cap", "",
        f"{len(rows)} finished run{'s' if len(rows) > 1 else ''} of this report did not meet the stopping rule "
        "(patience) before the step cap. A run whose best evaluation is its last one was still improving: it had not "
        "converged within the cap, and a finding resting on it says so. The others had stopped improving, but fewer "
        "evaluations than the patience had passed.", "",
        table(["run", "key", "best step", "cap", "evaluations after the best", "still improving"], rows), ""])


def verdict_label(c: stats.Comparison | None, expected: int, digits: int = 2) -> str:
    """The comparison's verdict (its interval as reported, with ``digits`` decimals), marked provisional
    while fewer run pairs are complete than planned (a grid fills its cells one run at a time; one
    pair's interval has no seed variation in it)."""
    if c is None:
        return stats.MISSING
    if c.pairs < c.planned:
        return f"provisional: {c.verdict(expected, digits)} ({c.pairs} of {c.planned} run pairs)"
    return c.verdict(expected, digits)


def finding(ctx, claim: str, paper: str, comparison: stats.Comparison | None, expected: int, what: str,
            digits: int = 2, note: str = "") -> str:
    """One finding as a markdown bullet (paper, ours with its interval, verdict), recorded in
    ``ctx.findings`` for the README's verdict table. ``what``: the difference compared, e.g.
    "BLEU, prefix − fine-tuning"; ``expected``: the paper's sign of that difference."""
    verdict, ours = verdict_label(comparison, expected, digits), "—"
    if comparison is not None:
        ours = comparison.text(digits) + f" ({comparison.pairs} run pair{'s' if comparison.pairs > 1 else ''}, {comparison.items} test items)"
    unconverged = list(comparison.unconverged) if comparison else []
    ctx.findings.append({"experiment": ctx.name, "finding": claim, "paper": paper, "measure": what, "ours": ours,
                         "verdict": verdict, "unconverged": unconverged})
    single = " One run pair: the interval covers test-item variation only." if comparison and comparison.pairs == 1 else ""
    if unconverged:
        single += (f" Not converged: {', '.join(f'`{u}`' for u in unconverged)} {'was' if len(unconverged) == 1 else 'were'} "
                   "still improving at the step cap (see \"Runs ended by the step cap\").")
    return f"- **{claim}** — paper: {paper}. Ours ({what}): {ours}. **Verdict: {verdict}.**{single}" + (f" {note}" if note else "")


def seq_rep(words: list[str], n: int = 4) -> float:
    """The share of an output's word n-grams that occur earlier in it (seq-rep-n of Welleck et al., 2020,
    "Neural Text Generation with Unlikelihood Training"): 0 for an output that never repeats a phrase,
    near 1 for one stuck in a loop."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


REPETITION_NOTE = ("rep-4 %: how much an output repeats itself (the share of its word 4-grams that occur earlier in it, mean "
                   "over the test outputs; Welleck et al., 2020): outputs stuck in a loop cost BLEU and slot errors that the "
                   "teacher-forced dev loss does not show.")


def repetition(results: list[dict], run: Run, ev: Eval, ledger_dir: str | Path) -> float | None:
    """How much a run's test outputs of ``ev`` repeat themselves: the mean seq-rep-4 over outputs, in %,
    read from the ledger's outputs file (None without it). A method whose outputs loop loses BLEU and
    slot accuracy where its dev loss (teacher-forced) does not show it."""
    r = find(results, run)
    name = r and r["evals"].get(ev.key(), {}).get("outputs_file")
    path = ledger.entry(ledger_dir, Run(**r["run"]).key()) / name if name else None
    if path is None or not path.is_file():
        return None
    return 100 * statistics.fmean(seq_rep(line.split()) for line in path.read_text().splitlines())


def train_info(results: list[dict], run: Run, name: str):
    r = find(results, run)
    return None if r is None else r["train"].get(name)


def step_time(results: list[dict], run: Run) -> float | None:
    """Seconds per training step of a run (CPU where counted, see runs.step_seconds)."""
    r = find(results, run)
    return None if r is None else step_seconds(r["train"])


def run_minutes(results: list[dict], run: Run) -> float | None:
    """Minutes a run took: training (its evaluations included) plus its test decoding; CPU time where
    the run counted it over all its sessions (see runs.training_seconds), else wall time."""
    r = find(results, run)
    if r is None:
        return None
    cpu = r["train"].get("train_cpu_seconds") is not None
    decode = sum(e.get("decode_cpu_seconds" if cpu else "decode_seconds", 0) or 0 for e in r["evals"].values())
    return (training_seconds(r["train"]) + decode) / 60


def peak_cell(results: list[dict], run: Run) -> str:
    """A run's peak memory: exact, or an upper bound when an earlier run of its process peaked higher."""
    peak, before = train_info(results, run, "peak_memory_mb"), train_info(results, run, "peak_memory_mb_before")
    if peak is None:
        return "—"
    return f"{peak:,.0f}" if before is None or peak > before + 1 else f"≤ {peak:,.0f}"


def fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def spread(values: list[float | None], digits: int = 2) -> str:
    """``mean ± sd (min–max, n)`` of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f}, n={len(v)})"


def mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.mean(v) if v else None


def sd(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.stdev(v) if len(v) > 1 else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)




def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * max(1, len(series)) / 1.5), 3.6))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_plot(path, xs: list, series: dict[str, tuple[list, list | None]], xlabel: str, ylabel: str, title: str,
              logx: bool = False) -> None:
    """``series[name] = (means, sds or None)``; error bars where sds exist."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (ys, errs) in series.items():
        pts = [(x, y, (errs[i] if errs else None)) for i, (x, y) in enumerate(zip(xs, ys)) if y is not None]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts], marker="o", capsize=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
