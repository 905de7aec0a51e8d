"""The learning-rate grid: 3 peak learning rates per method at the reference cell (E2E, 500 training
pairs, sampling 0, seed 0), extended past an edge that wins (``extend``), each run trained to its
best dev score; a method's rate is the one
whose run selected the best evaluation by the score runs are selected on (dev BLEU at this E2E
cell; dev loss for runs without a dev score). Every other experiment reads the chosen rates from
the ledger (``chosen``); the chosen run itself is the seed-0 run of that cell in the other experiments.

Why not the lowest dev loss: dev loss can stop improving before the generation metric does (issue
11), and on this grid it did for fine-tuning: lr 1e-4 reached a dev loss 0.008 below lr 3e-5's, at
3.9 dev BLEU less. Choosing a baseline's rate on a score the comparison does not report would
handicap it; the report shows the rate dev loss would have chosen beside each choice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import Scale
from . import ledger as ledger_mod
from .report import fmt, table
from .runs import step_seconds, training_seconds

TITLE = "Learning rate per method: a grid at E2E 500 examples (3 rates, extended past an edge), chosen on dev BLEU"
SCALE_TEXT = ("Grid: E2E, {s.train_size} training pairs (random sampling 0), seed 0, batch {s.batch_size}; per method "
              "the peak rates of the table below (3, and up to {s.lr_grid_extra} more: while a grid's chosen rate is at its edge, the next rate "
              "past that edge on the 1-3-10 steps is added and run); the rate whose run selected the best dev BLEU (the score every "
              "table-to-text run is selected and stopped on, {s.dev_score_examples} dev inputs decoded as the protocol says) is chosen; the "
              "rate with the lowest dev loss (per target token, {s.dev_examples} dev pairs) is shown beside it. A chosen "
              "rate still at the edge of its grid (after the added rates) is flagged.")


def names(scale: Scale) -> list[str]:
    return [n for n in scale.methods if n in scale.lr_grid]


def runs_for(scale: Scale, name: str):
    return [scale.run("e2e", name, lr=lr, train_examples=scale.train_size, sampling=0, seed=0) for lr in scale.lr_grid[name]]


def plan(scale: Scale):
    # prefix and fine-tuning first: the low-data experiment (the first verdicts) needs only them
    order = sorted(names(scale), key=lambda n: (n not in ("prefix", "finetune"), scale.methods.index(n)))
    return [r for n in order for r in runs_for(scale, n)]


def chosen(scale: Scale, ledger_dir: str | Path, by: str = "selection") -> dict[str, float]:
    """{method name: learning rate} for every method whose grid is complete in the ledger: the rate
    whose run selected the best evaluation by its selection score (``by="selection"``: dev BLEU where
    the run has one, else dev loss), or (``by="dev_loss"``) the one that reached the lowest dev loss."""
    out = {}
    for name in names(scale):
        ranked = []
        for run in runs_for(scale, name):
            result = ledger_mod.read(ledger_dir, run.key(), items=False)
            t = (result or {}).get("train", {})
            if t.get("min_dev_loss") is None:
                break
            score = t.get("dev_score") if by == "selection" else None
            ranked.append((-score if score is not None else t["min_dev_loss"], run.lr))  # lower is better
        else:
            out[name] = min(ranked)[1]
    return out


def next_rate(lr: float, down: bool) -> float:
    """The next rate on the 1-3-10 steps of the grids (1e-4 -> 3e-5 down, 3e-4 up)."""
    mantissa, exponent = (int(x) for x in f"{lr:.0e}".split("e"))
    if down:
        return float(f"3e{exponent - 1}") if mantissa < 3 else float(f"1e{exponent}")
    return float(f"3e{exponent}") if mantissa < 3 else float(f"1e{exponent + 1}")


def extend(scale: Scale, ledger_dir: str | Path) -> tuple[dict, dict]:
    """(``scale.lr_grid`` with the rates the ledger calls for, the rates chosen on it: see ``chosen``): while a method's complete grid chooses
    its lowest (highest) rate, the next lower (higher) rate joins it, up to ``scale.lr_grid_extra`` per method.
    A choice at the edge can be beaten just past it (the paper's prefix rate is outside some grids)."""
    grids = dict(scale.lr_grid)
    while True:
        picks = chosen(replace(scale, lr_grid=grids), ledger_dir)
        grown = {}
        for name, lr in picks.items():
            rates = sorted(grids[name])
            if len(rates) > 1 and lr in (rates[0], rates[-1]) and len(rates) < len(scale.lr_grid[name]) + scale.lr_grid_extra:
                grown[name] = tuple(rates) + (next_rate(lr, down=lr == rates[0]),)
        if not grown:
            return grids, picks
        grids.update(grown)


def report(results, scale: Scale, ctx) -> str:
    from .report import find

    rows, curves = [], {}
    for name in names(scale):
        runs = runs_for(scale, name)
        pick = scale.chosen_lr.get(name)
        losses = [(find(results, run) or {}).get("train", {}).get("min_dev_loss") for run in runs]
        by_loss = None if None in losses else min(zip(losses, [r.lr for r in runs]))[1]  # the dev-loss choice
        for run in runs:
            r = find(results, run)
            t = r["train"] if r else {}
            edge = pick is not None and run.lr == pick and len(scale.lr_grid[name]) > 1 and pick in (min(scale.lr_grid[name]), max(scale.lr_grid[name]))
            mark = ("**chosen**" + (" (edge of the grid)" if edge else "")) if run.lr == pick else ""
            if run.lr == by_loss and by_loss != pick:
                mark = (mark + "; " if mark else "") + "lowest dev loss"
            rows.append([name, f"{run.lr:g}", fmt(t.get("min_dev_loss"), 4), fmt(t.get("dev_loss"), 4), fmt(t.get("dev_score")),
                         t.get("best_step", "—"), t.get("steps", "—"), "yes" if t.get("stopped_early") else ("no" if t else "—"),
                         fmt(None if not t else step_seconds(t)), fmt(None if not t else training_seconds(t) / 60, 1), mark])
            if r:
                curves[(name, run.lr)] = t["dev_curve"]
    plot = ctx.plot_path("curves")
    _plot_curves(plot, curves)
    # would selecting on dev loss pick the same evaluation as dev BLEU? (issue 11: dev loss can stop
    # improving before the generation metric does)
    sel = []
    for (name, lr), curve in curves.items():
        evals = [h for h in curve if h["step"] > 0 and h.get("dev_score") is not None]
        if evals:
            by_loss = min(evals, key=lambda h: h["dev_loss"])
            by_bleu = max(evals, key=lambda h: h["dev_score"])
            sel.append([name, f"{lr:g}", by_bleu["step"], by_loss["step"], fmt(by_bleu["dev_score"]),
                        fmt(by_loss["dev_score"]), fmt(by_bleu["dev_score"] - by_loss["dev_score"])])
    override = {k: v for k, v in scale.lr.items()}
    return "\n".join([
        "## The grid", "",
        table(["method", "peak lr", "lowest dev loss", "dev loss at selected eval", "dev BLEU at selected eval",
               "step of selected eval", "steps run", "stopped early", "s/step", "run minutes", "choice"], rows), "",
        "Lowest dev loss: over the run's evaluations; the run itself keeps the evaluation with the best dev BLEU "
        "(table-to-text selection), whose dev loss and BLEU are the next two columns. The rate chosen is the one with "
        "the best dev BLEU at its selected evaluation; \"lowest dev loss\" marks the rate that choosing on dev loss "
        "would have taken where it differs (dev loss can stop improving before the generation metric does). s/step: "
        "CPU seconds per training step over the whole run; run minutes: CPU time of training with its evaluations, "
        "over all of a resumed run's sessions (runs from before CPU time was counted per evaluation: wall time, "
        "which pauses and load inflate); one thread, beside the grid's other process on 2 cores.", "",
        f"Chosen rates: {', '.join(f'{k} {v:g}' for k, v in scale.chosen_lr.items()) or 'none yet'}."
        + (f" Overridden on the command line: {override}." if override else ""), "",
        f"![dev curves]({plot.name})", "",
        "## Dev loss vs dev BLEU as the selection score", "",
        table(["method", "lr", "step by dev BLEU", "step by dev loss", "dev BLEU there", "dev BLEU at the dev-loss step",
               "dev BLEU lost by selecting on loss"], sel) if sel else "No runs yet.", "",
        "Runs are selected and stopped on dev BLEU; this table shows, on the grid's runs, which evaluation dev loss "
        "would have picked instead and how much dev BLEU that would have cost.", "",
    ])


def _plot_curves(path, curves: dict) -> None:
    from .report import _plt

    plt = _plt()
    methods = sorted({m for m, _ in curves}) or ["(none yet)"]
    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        for (m, lr), curve in sorted(curves.items(), key=lambda kv: kv[0][1]):
            if m == method:
                pts = [(h["step"], h["dev_loss"]) for h in curve if h["dev_loss"] is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"lr {lr:g}")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("dev loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
