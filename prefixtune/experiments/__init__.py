"""The paper's experiments, one command each: ``prefixtune experiment NAME`` (see ``--help``).

Each experiment module has ``plan(scale) -> list[Run]`` (what to train and score) and
``report(results, scale, ctx) -> str`` (the markdown of results/NAME.md, next to the paper's
numbers, with plots written through ``ctx``). Every run is trained to its best dev score (see
runs.py, "Protocol") and recorded in the ledger (results/ledger/, see ledger.py); runs are shared
across experiments, so rerunning a command only does what the ledger lacks, and ``--report-only``
rewrites the report from the ledger alone. ``prefixtune experiment grid`` works through every
experiment's runs in the order of ``grid.py`` (learning-rate grid first), one process per core.

Learning rates: one per method, chosen by the ``lr-grid`` experiment (3 values per method at the
reference cell, E2E 500 examples, by the dev BLEU its run selected) and read from the ledger; a run
whose method's grid is not complete yet has ``lr=None`` and waits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..methods import METHODS
from ..options import check_choices, option
from .report import cap_section
from .runs import Eval, Run, run_all

NAMES = ("lr-grid", "low-data", "initialisation", "table-to-text", "extrapolation", "prefix-length", "summarization")


def split_name(name: str) -> tuple[str, float | None]:
    """"adapter-3" -> ("adapter", 0.03): a method sized by a fraction of the model (a ``size``
    option), with its percentage; "prefix" -> ("prefix", None)."""
    for method, spec in METHODS.items():
        if "size" in spec.options and name.startswith(method + "-"):
            return method, float(name[len(method) + 1 :]) / 100
    return name, None


# The method names (with sizes) of the paper's table, and the learning-rate grid of each: its
# method's (prefixtune/methods.py).
TABLE_METHODS = ("prefix", "finetune", "ft-top2", "adapter-0.1", "adapter-3", "lora", "peft-prefix", "prompt", "infix")
LR_GRID = {name: METHODS[split_name(name)[0]].lr_grid for name in TABLE_METHODS}

DIFFERENCES = (
    "**What differs from the paper.** Base model: SmolLM2-135M-Instruct (the paper: GPT-2 medium, 345M, for "
    "table-to-text; BART-large for summarization), dequantised from its 4-bit GGUF release, so every method starts "
    "from a slightly damaged model that fine-tuning (which changes the weights) can repair and a frozen-model method "
    "(prefix, adapters, LoRA) cannot. Compute: 2 CPU cores, so smaller training sets (stated per experiment), "
    "a step cap per run and fewer runs per cell than the paper's. Arithmetic: {arithmetic}.")


@dataclass
class Scale:
    """How every experiment is run: the protocol of issue 11 (train to the best dev score, full test
    sets, the paper's decoding) at sizes that fit 2 CPU cores. See README, "Experiments"."""

    batch_size: int = option(8, "table-to-text batch size")
    summary_batch_size: int = option(4, "summarization batch size")
    max_source_tokens: int = option(192, "summarization sources are cut to this many tokens")
    max_epochs: float = option(10.0, "cap per run: max(this many epochs, --min-steps)")
    summary_max_epochs: float = option(4.0, "the same for summarization")
    min_steps: int = option(600, "cap: at least this many steps")
    eval_epochs: float = option(0.5, "evaluate every this many epochs...")
    min_eval_steps: int = option(10, "...but at most every this many steps")
    patience: int = option(3, "evaluations without improvement before stopping")
    dev_examples: int = 200  # dev pairs for the dev loss (table-to-text)
    summary_dev_examples: int = 100
    dev_score_examples: int = option(100, "dev inputs decoded for the dev BLEU that selects table-to-text runs")
    select: Literal["dev_bleu", "dev_loss"] = option(
        "dev_bleu", "what table-to-text runs are selected and stopped on (summarization: dev loss)")
    dev_decoding: Literal["test", "greedy"] = option(
        "test", "how the dev BLEU decodes: as the test set (the paper's beam search, in --decode-dtype) or greedy "
        "float32 (earlier runs; greedy outputs can end where the beam's repeat themselves)")
    arithmetic: Literal["bf16-autocast", "float32"] = option(
        "bf16-autocast", "bfloat16 autocast with float32 master weights for every method, or float32 throughout")
    decode_dtype: Literal["bfloat16", "float32"] = option(
        "bfloat16", "dtype of test decoding (bfloat16: ~2x faster on CPUs with AMX/avx512_bf16; E2E BLEU within 0.3 of "
        "float32 on the validation cell, see results/perf.md)")
    test_examples: int = option(0, "table-to-text test inputs (0 = all: 630 E2E, 1,862 WebNLG)")
    summary_test_examples: int = option(200, "summarization test documents")
    num_beams: int = option(0, "beam size (0 = the paper's decoding per task: beam 5; summarization beam 6 with "
                            "length limits)")
    train_size: int = option(500, "E2E size of the reference cell (LR grid, main table, prefix length)")
    arithmetic_cell: int = 100  # E2E size of the low-data cell also trained in the other arithmetic
    webnlg_train_examples: int = option(2000, "WebNLG seen-category training subset")
    dialogsum_train_examples: int = option(1000, "DialogSum training subset (XSUM: our whole 1,210-article split)")
    train_sizes: tuple[int, ...] = option((50, 100, 200, 500), "low-data E2E sizes")
    init_sizes: tuple[int, ...] = option((50, 100), "initialisation experiment sizes")
    init_texts: tuple[str, ...] = option(("table-to-text:", "elephant", "divide"),
                                         "word initialisations compared with random (task words: table-to-text:, summarize)")
    samplings: int = option(3, "random training subsets per low-data size")
    seeds: int = option(2, "seeds per subset and cell")
    lengths: tuple[int, ...] = option((1, 5, 10, 20, 40), "E2E prefix lengths")
    summary_lengths: tuple[int, ...] = option((10, 50, 200), "XSUM prefix lengths")
    summary_prefix_lengths: tuple[int, ...] = option((10, 200), "the two prefix sizes of the summarization experiment "
                                                     "(~0.1% and ~2% of the model)")
    methods: tuple[str, ...] = option(TABLE_METHODS, "table-to-text methods (adapter-3 = adapters of 3% of the model)")
    lr_grid: dict = field(default_factory=lambda: dict(LR_GRID))  # the rates tried per method name
    lr_grid_extra: int = option(2, "rates a learning-rate grid may add past its edge while the edge rate wins "
                                "(0: none)")
    lr: dict = field(default_factory=dict)  # explicit learning rates per method name (else: the grid's choice)
    chosen_lr: dict = field(default_factory=dict)  # filled from the ledger by resolve_lrs()
    model: str = option("smollm2-135m", "base model (embedded default, or a Hugging Face id / directory)")

    def __post_init__(self):
        for name in self.methods:
            method, size = split_name(name)
            if method not in METHODS:
                raise ValueError(f"unknown method {name!r} in --methods; use {', '.join(METHODS)} (adapter-3 = 3%)")
            self.lr_grid.setdefault(name, METHODS[method].lr_grid)  # e.g. adapter-1, not in LR_GRID
        check_choices(self)

    def lr_for(self, name: str) -> float | None:
        """The learning rate of method ``name``: explicit, else the grid's choice, else None (not chosen yet)."""
        return self.lr.get(name, self.chosen_lr.get(name))

    def run(self, task: str, name: str = "prefix", summary: bool = False, **kw) -> Run:
        """A run of method ``name`` (of Scale.methods: "adapter-3" = adapters of 3%) under this protocol."""
        method, size = split_name(name)
        base = dict(task=task, method=method, lr=self.lr_for(name), model=self.model,
                    batch_size=self.summary_batch_size if summary else self.batch_size,
                    max_source_tokens=self.max_source_tokens if summary else None,
                    max_epochs=self.summary_max_epochs if summary else self.max_epochs, min_steps=self.min_steps,
                    eval_epochs=self.eval_epochs, min_eval_steps=self.min_eval_steps, patience=self.patience,
                    dev_examples=self.summary_dev_examples if summary else self.dev_examples,
                    select="dev_loss" if summary else self.select, dev_score_examples=self.dev_score_examples,
                    autocast=self.arithmetic == "bf16-autocast")
        if base["select"] == "dev_bleu":  # (how dev BLEU decodes; runs selected on dev loss keep their keys)
            base.update(dev_score_decoding=self.dev_decoding,
                        dev_score_dtype=self.decode_dtype if self.dev_decoding == "test" else "float32")
        if size:
            base["size"] = size
        return Run(**{**base, **kw})

    def eval(self, task: str, summary: bool = False, **kw) -> Eval:
        n = self.summary_test_examples if summary else self.test_examples
        base = dict(task=task, n=n or 10**9, num_beams=self.num_beams, max_source_tokens=self.max_source_tokens if summary else None,
                    dtype=self.decode_dtype)
        if kw.get("decoder") == "peft":  # PEFT's own generate: as it is, in float32
            base["dtype"] = "float32"
        return Eval(**{**base, **kw})

    def test_sets(self) -> dict[str, str]:
        """How each test set is used, for the reports' protocol lines."""
        n = self.test_examples
        return {"e2e": f"a fixed random {n} of the 630 E2E test tables" if n else "all 630 E2E test tables",
                "webnlg": f"a fixed random {n} of the 1,862 WebNLG test entries" if n else
                "all 1,862 WebNLG test entries (971 seen, 891 unseen categories)",
                "beams": f"beam {self.num_beams}" if self.num_beams else "the paper's decoding (beam 5)"}

    def describe_dev_decoding(self) -> str:
        if self.dev_decoding == "greedy":
            return "greedy, float32"
        return (f"decoded as the test set is: {self.test_sets()['beams']}, {self.decode_dtype}")

    def describe_arithmetic(self) -> str:
        training = ("bfloat16 autocast for every method (float32 weights, gradients and AdamW state; matrix products "
                    "in bfloat16)" if self.arithmetic == "bf16-autocast" else "float32 training")
        dev = self.decode_dtype if self.dev_decoding == "test" else "float32"
        return f"{training}; test decoding in {self.decode_dtype} (dev BLEU for selection in {dev})"


def resolve_lrs(scale: Scale, ledger_dir: str | Path) -> Scale:
    """``scale`` with ``chosen_lr`` read from the ledger: per method whose learning-rate grid is complete,
    the rate whose run selected the best dev BLEU (see lr_grid.chosen). A rate chosen at the edge of its
    grid extends the grid by the next rate past that edge (lr_grid.extend), and the method waits for
    that run: the choice must be inside the rates tried."""
    from . import lr_grid

    grids, picks = lr_grid.extend(scale, ledger_dir)
    return replace(scale, lr_grid=grids, chosen_lr=picks)


class Context:
    """Where a report writes: results/NAME.md, results/NAME.json, results/NAME-*.png."""

    def __init__(self, name: str, results_dir: Path, command: str, scale: Scale):
        self.name, self.dir, self.command, self.scale = name, Path(results_dir), command, scale
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plots: list[str] = []
        self.findings: list[dict] = []  # verdict rows, for the README's table

    def plot_path(self, tag: str) -> Path:
        name = f"{self.name}-{tag}.png"
        self.plots.append(name)
        return self.dir / name


def module(name: str):
    from importlib import import_module

    return import_module(f".{name.replace('-', '_')}", __name__)


def run_experiment(name: str, scale: Scale, runs_dir: str | Path = "runs/experiments", results_dir: str | Path = "results",
                   data=None, threads: int | None = None, command: str | None = None, report_only: bool = False,
                   commit: bool = False) -> Path:
    """Run (or complete) every run of experiment ``name`` whose learning rate is known, then write its
    report. Returns the report path. ``report_only``: write the report from the ledger, running nothing."""
    ledger_dir = Path(results_dir) / "ledger"
    if not report_only:
        # first the learning-rate grid of the methods whose rate is not chosen yet, then the experiment's runs
        waiting = {(r.method, r.size) for r in module(name).plan(resolve_lrs(scale, ledger_dir)) if r.lr is None}
        grid = [r for r in module("lr-grid").plan(scale) if (r.method, r.size) in waiting]
        run_all(grid, runs_dir, ledger_dir, data, threads, commit=commit)
        run_all(module(name).plan(resolve_lrs(scale, ledger_dir)), runs_dir, ledger_dir, data, threads, commit=commit)
    return write_report(name, scale, results_dir, command)


def write_report(name: str, scale: Scale, results_dir: str | Path = "results", command: str | None = None) -> Path:
    """results/NAME.md (+ .json, plots) from the ledger alone (no model, no data)."""
    from ..files import write_atomic

    ledger_dir = Path(results_dir) / "ledger"
    scale = resolve_lrs(scale, ledger_dir)
    mod = module(name)
    runs = mod.plan(scale)
    results = run_all(runs, "runs/experiments", ledger_dir, cached_only=True)
    ctx = Context(name, Path(results_dir), command or f"prefixtune experiment {name}", scale)
    unique = {Run(**r["run"]).key(): r for r in results}
    missing = {k: r for k, r in unique.items() if "error" in r}
    body = mod.report(results, scale, ctx)
    header = [
        f"# {mod.TITLE}", "",
        f"**Protocol.** {PROTOCOL.format(s=scale, arithmetic=scale.describe_arithmetic(), dev_decoding=scale.describe_dev_decoding())} "
        f"{mod.SCALE_TEXT.format(s=scale, **scale.test_sets())}", "",
        DIFFERENCES.format(arithmetic=scale.describe_arithmetic()), "",
        "Produced by (every run is recorded in `results/ledger/` as it finishes; rerunning does only what the ledger "
        "lacks; `--report-only` rewrites this page from the ledger alone):", "", "```bash", ctx.command, "```", "",
        f"Runs in the ledger: {len(unique) - len(missing)} of {len(unique)}."
        + (" The grid is incomplete: the numbers below use the runs there are, and verdicts without runs say so."
           if missing else ""), "",
    ]
    if missing:
        waiting = [r for r in missing.values() if "waiting" in r["error"]]
        header += [f"<details><summary>Missing runs ({len(missing)}; {len(waiting)} of them wait for the learning-rate "
                   "grid)</summary>", ""]
        header += [f"- `{Run(**r['run']).label()}` (`{k}`): {r['error']}" for k, r in missing.items()]
        header += ["", "</details>", ""]
    capped = cap_section(results, runs)
    md = "\n".join(header) + "\n" + body.rstrip("\n") + "\n" + (f"\n{capped}" if capped else "")
    path = Path(results_dir) / f"{name}.md"
    write_atomic(path, md)
    write_atomic(Path(results_dir) / f"{name}.json", json.dumps(
        {"experiment": name, "command": ctx.command, "scale": asdict(scale), "findings": ctx.findings,
         "runs": [{"key": k, "run": r["run"], "error": r.get("error")} for k, r in unique.items()]},
        indent=1, sort_keys=True) + "\n")
    return path


PROTOCOL = ("Every run is trained to its best dev score: it evaluates every half epoch (at most every "
            "{{s.min_eval_steps}} steps), stops after {{s.patience}} evaluations without improvement or at the cap "
            "(the larger of {{s.max_epochs:g}} epochs and {{s.min_steps}} steps; linear learning-rate decay to 0 over "
            "the cap), and keeps its best evaluation; runs the cap ended are listed at the end of the report. Table-to-text runs are selected on dev BLEU ({{dev_decoding}}, "
            "{{s.dev_score_examples}} dev inputs, a fixed random sample), summarization runs on dev loss. Each method uses its own learning "
            "rate, chosen on dev BLEU by the learning-rate grid (`results/lr-grid.md`). Arithmetic: {arithmetic}. "
            "Comparisons are paired (same training subsample and seed for both methods, same test items); intervals "
            "are 95% bootstrap intervals over test items and run pairs; a finding *holds* when its interval, as "
            "reported, excludes 0 on the paper's side, is *reversed* when it excludes 0 on the other side, else it is *not separable at "
            "this scale*.").replace("{{", "{").replace("}}", "}")

