"""Experiment 6, summarization (the paper's Table 2): prefix-tuning (two sizes) vs fine-tuning on the XSUM
pool and on DialogSum, ROUGE-1/2/L."""

from __future__ import annotations

from . import Scale
from .report import bar_plot, compare, finding, fmt, mean, metric, spread, table, train_info

TITLE = "Summarization: prefix-tuning (two sizes) vs fine-tuning on XSUM and DialogSum"
SCALE_TEXT = ("XSUM: our 1,210-article training split; DialogSum: a random {s.dialogsum_train_examples} of its training "
              "dialogues; sources cut to {s.max_source_tokens} tokens, batch {s.summary_batch_size}, prefix lengths "
              "{s.summary_prefix_lengths}, {s.seeds} seeds, selected on dev loss ({s.summary_dev_examples} dev "
              "documents); {s.summary_test_examples} test documents per dataset (DialogSum: 3 references each), the "
              "paper's summarization decoding (beam 6, 10-60 new tokens, no repeated trigram).")
XSUM_PAPER = {"finetune": (45.14, 22.27, 37.25), "prefix-2%": (43.80, 20.93, 36.05), "prefix-0.1%": (42.92, 20.03, 35.05)}


def runs_for(scale: Scale, task: str) -> dict[str, list]:
    ev = (scale.eval(task, summary=True),)
    extra = {"train_examples": scale.dialogsum_train_examples} if task == "dialogsum" else {}
    out = {f"prefix-{n}": [scale.run(task, "prefix", summary=True, length=n, seed=s, evals=ev, **extra) for s in range(scale.seeds)]
           for n in scale.summary_prefix_lengths}
    out["finetune"] = [scale.run(task, "finetune", summary=True, seed=s, evals=ev, **extra) for s in range(scale.seeds)]
    return out


def plan(scale: Scale):
    return [r for t in ("xsum", "dialogsum") for runs in runs_for(scale, t).values() for r in runs]


def report(results, scale: Scale, ctx) -> str:
    out, rl, findings = [], {}, []
    big, small = f"prefix-{max(scale.summary_prefix_lengths)}", f"prefix-{min(scale.summary_prefix_lengths)}"
    for task, title in (("xsum", "XSUM pool"), ("dialogsum", "DialogSum")):
        ev = scale.eval(task, summary=True)
        methods = runs_for(scale, task)
        rows = []
        for name, runs in methods.items():
            s = [spread([metric(results, r, ev, k) for r in runs]) for k in ("ROUGE-1", "ROUGE-2", "ROUGE-L")]
            rl[(task, name)] = mean([metric(results, r, ev, "ROUGE-L") for r in runs])
            paper = " / ".join(map(str, XSUM_PAPER["finetune" if name == "finetune" else "prefix-2%" if name == big else "prefix-0.1%"]))
            rows.append([name, fmt(train_info(results, runs[0], "stored_percent"), 3), *s,
                         fmt(mean([train_info(results, r, "dev_loss") for r in runs]), 3)] + ([paper] if task == "xsum" else []))
        header = ["method", "stored %", "ROUGE-1", "ROUGE-2", "ROUGE-L", "dev NLL"] + (["paper R-1 / 2 / L (BART-large, full XSUM)"] if task == "xsum" else [])
        out += [f"## {title}", "", table(header, rows), ""]
        paper = {"xsum": "fine-tuning ahead: ROUGE-L 37.25 vs 36.05 (2% prefix)", "dialogsum": "not in the paper (XSUM: fine-tuning ahead)"}[task]
        findings.append(finding(ctx, f"Fine-tuning beats the larger prefix on {title}", paper,
                                compare(results, methods[big], methods["finetune"], ev, "ROUGE-L"), -1,
                                f"ROUGE-L, {big} − fine-tuning"))
        paper = {"xsum": "36.05 vs 35.05 ROUGE-L (+1.0)", "dialogsum": "not in the paper (XSUM: larger better)"}[task]
        findings.append(finding(ctx, f"The larger prefix beats the smaller on {title}", paper,
                                compare(results, methods[big], methods[small], ev, "ROUGE-L"), +1, f"ROUGE-L, {big} − {small}"))
    plot = ctx.plot_path("rougeL")
    names = list(runs_for(scale, "xsum"))
    bar_plot(plot, names, {t: [rl.get((t, n)) for n in names] for t in ("xsum", "dialogsum")}, "ROUGE-L", "Summarization test sets")
    return "\n".join(out + [f"![ROUGE-L]({plot.name})", "", "## Findings", "", *findings, ""])
