"""The paper's experiments, one command each: ``prefixtune experiment NAME`` (see ``--help``).

Each experiment module has ``plan(scale) -> list[Run]`` (what to train and score) and
``report(results, scale, ctx) -> str`` (the markdown of results/NAME.md, next to the paper's
numbers, with plots written through ``ctx``). Runs are cached and shared across experiments
(prefixtune/experiments/runs.py), so rerunning a command only redoes what is missing and then
rewrites the report.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .runs import Eval, Run, run_all

NAMES = ("table-to-text", "low-data", "extrapolation", "prefix-length", "initialisation", "summarization")

# Peak learning rates per method (linear warmup 5 steps, then decay to 0). Chosen once, not per
# experiment, from 40-step E2E probes (dev NLL on 100 dev pairs): prefix 5e-4 -> 2.13, 2e-3 -> 2.33;
# fine-tuning 5e-5 -> 1.56; adapters 1e-3 -> 2.11 (README, "Experiments"). Override: --lr METHOD=VALUE.
LEARNING_RATES = {"prefix": 5e-4, "infix": 5e-4, "prompt": 5e-4, "peft-prefix": 5e-4,
                  "adapter": 1e-3, "lora": 1e-3, "finetune": 5e-5, "ft-top2": 1e-4}


@dataclass
class Scale:
    """How big every experiment is. Defaults: the reduced scale that fits 2 CPU cores (see README);
    paper scale is e.g. ``--steps 20000 --test-examples 0 --num-beams 5 --samplings 5 --seeds 2``."""

    steps: int = 40  # optimizer steps per table-to-text run
    batch_size: int = 8
    summary_steps: int = 20
    summary_batch_size: int = 4
    max_source_tokens: int = 192  # summarization articles/dialogues are cut to this many tokens
    test_examples: int = 80  # per test set (0 = all); WebNLG: half seen, half unseen categories
    summary_test_examples: int = 30
    num_beams: int = 1
    train_sizes: tuple[int, ...] = (50, 100, 200, 500)
    summary_train_sizes: tuple[int, ...] = (50, 200)
    init_sizes: tuple[int, ...] = (50, 100)
    init_texts: tuple[str, ...] = ("table-to-text:", "elephant")  # also: "summarize", "divide"
    samplings: int = 1
    seeds: int = 2
    lengths: tuple[int, ...] = (1, 10, 200)
    summary_lengths: tuple[int, ...] = (1, 10, 200)
    summary_prefix_lengths: tuple[int, ...] = (10, 200)  # the two prefix sizes (~0.1% and ~2% of the model)
    methods: tuple[str, ...] = ("prefix", "finetune", "ft-top2", "adapter-0.1", "adapter-3", "lora", "peft-prefix",
                                "prompt", "infix")
    lr: dict = field(default_factory=dict)
    model: str = "smollm2-135m"
    dtype: str = "float32"

    def __post_init__(self):
        from ..methods import METHODS

        for name in self.methods:
            method, _, size = name.partition("-") if name.startswith(("adapter-", "lora-")) else (name, "", "")
            if method not in METHODS:
                raise ValueError(f"unknown method {name!r} in --methods; use {', '.join(METHODS)} (adapter-3 = 3%)")
            if size:
                float(size)

    def lr_for(self, method: str) -> float:
        return self.lr.get(method, LEARNING_RATES[method])

    def n(self, n: int) -> int:
        return n or 10**9

    def run(self, task: str, method: str = "prefix", summary: bool = False, **kw) -> Run:
        """A run at this scale (steps, batch, learning rate of the method, model, dtype)."""
        base = dict(task=task, method=method, lr=self.lr_for(method), model=self.model, dtype=self.dtype,
                    steps=self.summary_steps if summary else self.steps,
                    batch_size=self.summary_batch_size if summary else self.batch_size,
                    max_source_tokens=self.max_source_tokens if summary else None)
        return Run(**{**base, **kw})

    def eval(self, task: str, summary: bool = False, **kw) -> Eval:
        base = dict(task=task, n=self.n(self.summary_test_examples if summary else self.test_examples),
                    num_beams=self.num_beams, max_source_tokens=self.max_source_tokens if summary else None)
        return Eval(**{**base, **kw})


def method_run(scale: Scale, task: str, name: str, **kw) -> Run:
    """``name`` of Scale.methods ("adapter-3" = adapters of 3% of the model) as a run."""
    method, _, size = name.partition("-") if name.startswith(("adapter-", "lora-")) else (name, "", "")
    if size:
        kw["size"] = float(size) / 100
    return scale.run(task, method, **kw)


class Context:
    """Where a report writes: results/NAME.md, results/NAME.json, results/NAME-*.png."""

    def __init__(self, name: str, results_dir: Path, command: str, scale: Scale):
        self.name, self.dir, self.command, self.scale = name, Path(results_dir), command, scale
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plots: list[str] = []

    def plot_path(self, tag: str) -> Path:
        name = f"{self.name}-{tag}.png"
        self.plots.append(name)
        return self.dir / name


def run_experiment(name: str, scale: Scale, runs_dir: str | Path = "runs/experiments", results_dir: str | Path = "results",
                   data=None, threads: int | None = None, command: str | None = None, report_only: bool = False) -> Path:
    """Run (or complete) every run of experiment ``name``, then write its report. Returns the report path.
    ``report_only``: write the report from the runs already cached, running nothing."""
    from importlib import import_module

    module = import_module(f".{name.replace('-', '_')}", __name__)
    runs = module.plan(scale)
    start = time.perf_counter()
    results = run_all(runs, runs_dir, data=data, threads=threads, cached_only=report_only)
    ctx = Context(name, Path(results_dir), command or " ".join(["prefixtune"] + sys.argv[1:]), scale)
    failed = [r for r in results if "error" in r]
    body = module.report(results, scale, ctx)
    header = [
        f"# {module.TITLE}", "",
        "Produced by (rerun it to reproduce; finished runs are cached under `runs/experiments/`, so a rerun only "
        "redoes what is missing):", "", "```bash", ctx.command, "```", "",
        f"Scale: {describe_scale(scale, module)}", "",
        f"Machine: {platform.machine()}, {_cpus()} CPU threads, torch {_version('torch')}, transformers "
        f"{_version('transformers')}, peft {_version('peft')}; base model {scale.model} ({scale.dtype}).", "",
    ]
    if failed:
        header += ["**Failed or missing runs** (the report below is without them):", ""]
        header += [f"- `{r['run']['task']}/{r['run']['method']}` seed {r['run']['seed']}: {r['error']}" for r in failed] + [""]
    md = "\n".join(header) + body + "\n"
    path = ctx.dir / f"{name}.md"
    path.write_text(md)
    (ctx.dir / f"{name}.json").write_text(json.dumps({"experiment": name, "command": ctx.command, "scale": asdict(scale),
                                                      "wall_seconds_this_invocation": time.perf_counter() - start,
                                                      "runs": results}, indent=1))
    return path


def describe_scale(scale: Scale, module) -> str:
    return module.SCALE_TEXT.format(s=scale, beams="greedy" if scale.num_beams == 1 else f"beam {scale.num_beams}")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"
