"""Command line: ``prefixtune train``, ``generate``, ``evaluate``, ``experiment``, ``serve``,
``import-peft`` and ``export-peft`` (see ``--help`` of each).

``train`` and ``generate`` also run unchanged as N processes under ``accelerate launch`` (or
``torchrun``), e.g. ``accelerate launch --num_processes 8 -m prefixtune.cli train ...``: training is
data-parallel over the processes (see prefixtune/train.py), decoding splits the sources over them;
process 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .data import DECODING, TASKS
from .methods import METHODS
from .models import DEFAULT_MODEL
from .options import add_options, from_options


def _read_task(args, split: str, need_target: bool = True):
    """Examples of --task for a split: a named task from --data, or (jsonl) the file given for it."""
    from .data import jsonl, read_task

    path = {"train": getattr(args, "train", None), "dev": getattr(args, "dev", None)}.get(split, getattr(args, "input", None))
    if args.task != "jsonl":
        if path is not None:  # silently training on the task's data instead would be worse
            raise ValueError(f"--{split} FILE is for --task jsonl; --task {args.task} reads its {split} split from the "
                             "data directory (--data)")
        return read_task(args.task, split, args.data)
    return None if path is None else jsonl.read(path, need_target=need_target)


def _subset(examples, n):
    return examples if examples is None or n is None else examples[:n]


def _count(text: str) -> int:
    """argparse type of counts that must be >= 1: --threads (torch refuses fewer), the --max-*-examples
    options (0 would silently mean all)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows an option's default only where it tells something: not for required
    options, off-by-default switches, unset (None) or empty defaults, or a help text that already
    says what its default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], "")
        if action.required or unset or "(default" in text:
            return text
        return super()._get_help_string(action)


def _processes(args):
    """(accelerate's process state, the device for this process's model). One process: --device as
    given (default CPU). N processes (accelerate launch / torchrun): one device per process (CPU
    processes with --device cpu, or on a machine without accelerators)."""
    from .processes import process_state

    state = process_state(cpu=True if args.device == "cpu" else None)
    return state, (args.device if state.num_processes == 1 else state.device)


def _load_model(args, state, device):
    import torch

    from . import load_base_model

    with state.local_main_process_first():  # the embedded model is converted (a hub model downloaded) once per machine
        return load_base_model(args.model, dtype=getattr(torch, args.dtype), device=device)


def _fsdp(state) -> bool:
    """Shard the base with FSDP: asked for through accelerate, and more than one process."""
    from .processes import fsdp_requested

    return state.num_processes > 1 and fsdp_requested()


def train_configs(args):
    """(PrefixConfig, TrainConfig) of parsed ``prefixtune train`` arguments."""
    from .config import PrefixConfig
    from .train import TrainConfig

    return from_options(PrefixConfig, args), from_options(TrainConfig, args)


def method_config(args):
    from .methods import MethodConfig

    return MethodConfig(method=args.method, size=args.size, top_layers=args.top_layers)


def refuse_unused(config, prefix_config) -> None:
    """Refuse the options set on the command line that the run would not use (``--method finetune
    --length 20``, ``--init-text`` without ``--init words``; see methods.unused_settings), by flag."""
    from .config import PrefixConfig
    from .methods import unused_settings
    from .options import flag_of

    flags = {f.name: flag_of(f) for f in dataclasses.fields(PrefixConfig)}
    unused = [flags.get(name, "--" + name.replace("_", "-")) for name in unused_settings(config, prefix_config)]
    if unused:
        text = f"--method {config.method}"
        if "init" in METHODS[config.method].prefix_options:
            text += f" --init {prefix_config.init}"
        if METHODS[config.method].has_length and not prefix_config.reparameterize:
            text += " --flat"
        raise ValueError(f"{', '.join(unused)}: not used by {text} (it would change nothing)")


def cmd_train(args) -> int:
    import resource
    import time

    import torch

    from .methods import describe
    from .train import train_method

    if args.task == "jsonl" and not args.train:
        raise ValueError("--task jsonl needs --train FILE.jsonl (rows of {\"source\", \"target\"})")
    train = _subset(_read_task(args, "train"), args.max_train_examples)
    dev = _subset(_read_task(args, "dev"), args.max_dev_examples)
    prefix_config, train_config = train_configs(args)
    method = method_config(args)
    refuse_unused(method, prefix_config)
    for flag, given in (("--patience", train_config.patience), ("--max-dev-examples", args.max_dev_examples)):
        if given and not dev:  # it would silently do nothing
            raise ValueError(f"{flag} is about the dev set: give --dev FILE.jsonl (a named --task has its dev split)")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    state, device = _processes(args)
    say = print if state.is_main_process else (lambda *a, **k: None)
    fsdp = _fsdp(state)
    model, tokenizer = _load_model(args, state, None if fsdp else device)  # FSDP moves only a shard to the device
    n_model = sum(p.numel() for p in model.parameters())
    if fsdp:
        from .processes import shard_base

        model = shard_base(model, device)

    def announce(trainer, sizes):
        say(f"model {args.model}: {n_model:,} parameters")
        say(f"{describe(method)}: {sizes['trainable_parameters']:,} trainable ({sizes['trainable_percent']:.3f}% of the "
            f"model), {sizes['stored_parameters']:,} stored after training ({sizes['stored_percent']:.3f}%)")
        say(f"data: {len(train):,} training pairs, {len(dev or []):,} dev pairs; {trainer.total_steps:,} steps"
            + (f"; {state.num_processes} processes{' (FSDP-sharded base)' if fsdp else ''}, "
               f"{train_config.batch_size} rows per micro-batch in all" if state.num_processes > 1 else ""))

    _, sizes, result = train_method(model, tokenizer, train, dev, prefix_config, train_config, args.out, method=method,
                                    n_model=n_model, announce=announce)
    if not state.is_main_process:
        return 0
    # peak resident memory of this process so far (model loading included); Linux reports KiB
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"model": args.model, **sizes, "wall_seconds": time.perf_counter() - start, "peak_memory_mb": peak_mb,
               **result}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    first, last = result["history"][0], result["history"][-1]
    if first.get("dev_loss") is not None:
        print(f"dev loss {first['dev_loss']:.4f} (step {first['step']}) -> best {result['best_dev_loss']:.4f}")
    print(f"{last['seconds_per_step']:.3f} s/step; {summary['wall_seconds']:.0f} s in all; peak memory {peak_mb:,.0f} MB; "
          f"result in {args.out} (summary.json)")
    return 0


def decode_share(model, tokenizer, sources: list[str], batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of the sources process ``rank`` of ``world`` decodes: whole batches of the single-process
    run (sources sorted by prompt length, cut into ``batch_size`` rows), every world-th from the
    rank-th, in that order; ``generate`` then forms exactly those batches again (the same
    :func:`~prefixtune.template.prompt_batches`), so every row is decoded in the batch (same rows,
    same padding) it would have been in alone."""
    from .template import prompt_batches

    _, batches = prompt_batches(model, tokenizer, sources, batch_size)
    return [i for b in batches[rank::world] for i in b]


def _decoding(args) -> dict:
    """generate()'s settings from the options: the paper's decoding for the task, with what was given
    instead. Refuses, before any model loads, settings generate() would silently ignore."""
    kwargs = dict(DECODING[args.task], do_sample=args.do_sample)
    for name, low in (("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0), ("no_repeat_ngram_size", 0)):
        value = getattr(args, name)
        if value is None:
            continue
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        kwargs[name] = value
    if kwargs.get("min_new_tokens", 0) > kwargs["max_new_tokens"]:
        given = {n: "" if getattr(args, n) is not None else f" (the {args.task} default)" for n in ("min_new_tokens", "max_new_tokens")}
        raise ValueError(f"--min-new-tokens {kwargs['min_new_tokens']}{given['min_new_tokens']} is more than --max-new-tokens "
                         f"{kwargs['max_new_tokens']}{given['max_new_tokens']}")
    sampling = {"temperature": (args.temperature, 1.0), "top_p": (args.top_p, 1.0), "top_k": (args.top_k, 0)}
    if args.do_sample:
        kwargs.update({name: value for name, (value, _) in sampling.items()})
    elif any(value != default for value, default in sampling.values()):
        raise ValueError("--temperature, --top-p and --top-k set how to sample: add --do-sample (without it, decoding "
                         "is greedy or beam search and they would be ignored)")
    return kwargs


def cmd_generate(args) -> int:
    import torch
    from accelerate.utils import gather_object

    from . import Prefix
    from .data import group_references, jsonl
    from .files import write_atomic
    from .generate import PartialOutputs, generate_batches

    if args.task == "jsonl" and not args.input:
        raise ValueError("give --input FILE (.txt: one source per line; .jsonl: {\"source\": ...})")
    if args.input and args.split != "test":
        raise ValueError(f"--split {args.split} picks a named task's split to decode; with --input the sources come "
                         "from the file")
    if args.input and args.input.endswith(".txt"):
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        sources = [s for s in lines if s.strip()]
    elif args.input:  # a named --task then sets the decoding defaults only
        sources = [e.source for e in group_references(jsonl.read(args.input, need_target=False))]
    else:
        sources = [e.source for e in group_references(_read_task(args, args.split, need_target=False))]
    sources = _subset(sources, args.max_examples)
    kwargs = _decoding(args)
    prefixes = [Prefix.load(p) for p in args.prefix]
    if args.threads:
        torch.set_num_threads(args.threads)
    state, device = _processes(args)
    model, tokenizer = _load_model(args, state, device)
    soft_prompt = None
    if args.run:  # any method's training run: its result goes on the model, or becomes a prefix / soft prompt
        from .methods import load_trained, read_run
        from .train import checkpoint_progress

        method, prefix_config = read_run(args.run)
        progress = checkpoint_progress(args.run)
        if progress and not progress["finished"]:  # decodable (what it kept so far), but the user should know
            kept = f" (its best dev evaluation, step {progress['best_step']})" if progress["best_step"] else ""
            cap = "" if progress["max_steps"] is None else f" of at most {progress['max_steps']}"
            print(f"prefixtune generate: note: {args.run}: its training is unfinished (step {progress['step']}{cap}); "
                  f"decoding what it has kept so far{kept}; the same train command resumes it", file=sys.stderr)
        loaded = load_trained(method, model, args.run, prefix_config)
        if args.prefix and "prefixes" not in loaded:
            raise ValueError(f"--run of method {method.method} cannot be combined with --prefix")
        prefixes += [loaded["prefixes"]] if "prefixes" in loaded else []
        soft_prompt = loaded.get("soft_prompt")
    # every (source, prefix) pair in one mixed-prefix stream of batches
    rows = [(s, p) for s in sources for p in (prefixes or [None])]
    mine = list(range(len(rows)))
    if state.num_processes > 1:  # split over processes; process 0 gathers and writes in the original order
        mine = decode_share(model, tokenizer, [s for s, _ in rows], args.batch_size, state.process_index,
                            state.num_processes)
    # finished batches go to a partial file as they come: the same command resumes after an interruption
    seed = args.seed if args.do_sample else None
    partial = PartialOutputs(f"{args.out}.partial" + (f"{state.process_index}" if state.num_processes > 1 else ""),
                             [model, soft_prompt, [rows[i] for i in mine], kwargs, args.batch_size, seed])
    if partial.done and state.is_main_process:
        print(f"resuming: {len(partial.done)} finished batches in {partial.path}")
    for b, batch_rows, texts in generate_batches(model, tokenizer, [rows[i][0] for i in mine],
                                                 [rows[i][1] for i in mine], args.batch_size, state.is_main_process,
                                                 soft_prompt, skip=partial.done, seed=seed, **kwargs):
        partial.add(b, batch_rows, texts)
    outputs = partial.outputs(len(mine))
    if state.num_processes > 1:
        gathered, outputs = gather_object(list(zip(mine, outputs))), [None] * len(rows)
        for i, text in gathered:
            outputs[i] = text
        if not state.is_main_process:
            state.wait_for_everyone()  # process 0 has written the output
            partial.remove()
            return 0
    if len(prefixes) <= 1 and not args.out.endswith(".jsonl"):
        lines = [text.replace("\n", " ") for text in outputs]
    else:
        names = (args.prefix + ([args.run] if args.run and len(prefixes) > len(args.prefix) else [])) or ["none"]
        lines = [json.dumps({"source": source, "outputs": [{"prefix": n, "output": o} for n, o in
                                                          zip(names, outputs[i * len(names) : (i + 1) * len(names)])]},
                            ensure_ascii=False) for i, source in enumerate(sources)]
    out = write_atomic(args.out, "".join(line + "\n" for line in lines))  # the partial file goes only after
    partial.remove()
    print(f"wrote {len(sources)} outputs x {max(1, len(prefixes))} prefix(es) to {out}")
    for source, text in list(zip(sources, outputs[:: max(1, len(prefixes))]))[:3]:
        print(f"  {source[:70]}\n    -> {text}")
    if state.num_processes > 1:
        state.wait_for_everyone()  # the output file is complete when any process exits
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import MODEL_BASED, evaluate, format_table

    scores = evaluate(args.task, args.predictions, split=args.split, references=args.references,
                      variant=args.variant, data=args.data, ter=not args.skip_ter)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        print(format_table(scores))
        if args.task == "dart":
            print(f"(not computed: {', '.join(MODEL_BASED)} need model weights that are not available here)")
    return 0


def cmd_experiment(args) -> int:
    import shlex

    import torch

    from .experiments import LR_GRID, NAMES, Scale, run_experiment, write_report
    from .experiments import grid, ledger

    lrs = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if method not in LR_GRID or not lr > 0:
            raise ValueError(f"--lr wants METHOD=VALUE with METHOD in {sorted(LR_GRID)} and VALUE > 0, got {item!r}")
        lrs[method] = lr
    scale = from_options(Scale, args, lr=lrs)
    deadline = None
    if args.deadline:
        if args.name != "grid" or args.report_only or args.status:
            raise ValueError("--deadline is for running the grid (prefixtune experiment grid)")
        try:
            deadline = grid.parse_deadline(args.deadline)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    if args.carry_over and not deadline:
        raise ValueError("--carry-over goes with --deadline (prefixtune experiment grid --deadline HH:MM --carry-over)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the command that trains the runs (a --report-only rewrite reports the same runs)
    command = "prefixtune " + " ".join(shlex.quote(a) for a in args.argv if a not in ("--report-only", "--status", "--commit"))
    ledger_dir = f"{args.results_dir}/ledger"
    if args.status:
        state = grid.status(scale, args.runs_dir, ledger_dir)
        for name in ("done", "running", "todo", "waiting"):
            print(f"{name}: {len(state[name])}")
        cost = grid.estimate(state, ledger_dir, scale, args.runs_dir)
        print(f"CPU hours (one thread per run): {cost['done_hours']:.1f} done; about {cost['left_hours']:.0f} left for the "
              f"runs like finished ones" + (f", plus {cost['left_unknown_runs']} runs of kinds not run yet" if cost["left_unknown_runs"] else ""))
        print("by experiment, in the grid's order (a shared run counts under the first that plans it):")
        for name, c in cost["experiments"].items():
            unknown = f" + {c['left_unknown_runs']} runs of kinds not run yet" if c["left_unknown_runs"] else ""
            print(f"  {name:15} {c['done']:3} done ({c['done_hours']:5.1f} h)  {c['left']:3} left (~{c['left_hours']:.1f} h{unknown})")
        expected = cost["expected"]
        for run in state["running"] + state["todo"] + state["waiting"]:
            kind = "running" if run in state["running"] else "waiting" if run.lr is None else "todo"
            hours = "     ?" if expected[run.key()] is None else f"~{expected[run.key()]:.2f}h"
            stopped = ledger.unfinished_hours(ledger_dir, run.key())
            note = "" if stopped is None else f"  (stopped unfinished: its training needs at least {stopped:.2f} CPU-h)"
            begun = grid.training_progress(Path(args.runs_dir) / run.key())
            note += "" if begun is None or kind == "running" else f"  (checkpoint here: step {begun[0]}, ends at step {begun[1]} or later)"
            print(f"  {kind:8} {run.key()}  {hours}  {run.label()}{note}")
        return 0
    if args.name == "grid":
        if args.report_only:
            grid.write_reports(scale, args.results_dir, command=command)
        else:
            n = grid.run_grid(scale, args.runs_dir, args.results_dir, args.data, args.threads, commit=args.commit,
                              deadline=deadline, carry_over=args.carry_over)
            print(f"grid: this process finished {n} runs")
            grid.write_reports(scale, args.results_dir, commit=args.commit, command=command)
        return 0
    for name in (NAMES if args.name == "all" else [args.name]):
        if args.report_only:
            path = write_report(name, scale, args.results_dir, command)
        else:
            path = run_experiment(name, scale, runs_dir=args.runs_dir, results_dir=args.results_dir, data=args.data,
                                  threads=args.threads, command=command, commit=args.commit)
        print(f"{name}: report written to {path}")
    if args.name == "all" or args.report_only:
        grid.update_readme(args.results_dir)
    return 0


def cmd_serve(args) -> int:
    import os

    from .serve import ServeConfig, load_keys, serve

    keys = load_keys(args.keys, os.environ.get("PREFIXTUNE_API_KEYS"))
    config = from_options(ServeConfig, args, keys=keys)
    return serve(config)


def cmd_train_many(args) -> int:
    import resource
    import time

    import torch

    from .methods import MethodConfig
    from .train_many import ManyTrainer, read_jobs

    prefix_config, train_config = train_configs(args)
    refuse_unused(MethodConfig(), prefix_config)  # the command line's defaults; read_jobs checks each job's
    jobs = read_jobs(args.jobs, prefix_config, train_config)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    state, device = _processes(args)
    if state.num_processes > 1:
        raise ValueError("train-many runs in one process (jobs share batches, not processes)")
    model, tokenizer = _load_model(args, state, device)
    trainer = ManyTrainer(model, tokenizer, jobs, args.out, rows_per_round=args.rows_per_round,
                          autocast=args.autocast)
    n_rows = sum(len(t.train_set) for t in trainer.trainers.values())
    print(f"{len(jobs)} jobs, {n_rows:,} training pairs in all, up to {args.rows_per_round} rows per round; "
          f"model {args.model}")
    no_dev = [job.name for job in jobs if job.dev is None]
    if train_config.patience and no_dev:
        print(f"--patience {train_config.patience}: {', '.join(no_dev)} {'has' if len(no_dev) == 1 else 'have'} no dev "
              "file, so no early stopping: trained to the step cap")
    results = trainer.fit()
    for name, r in results.items():
        t = trainer.trainers[name]
        print(f"  {name}: {r['steps']} steps" + (f", best dev loss {r['best_dev_loss']:.4f}" if t.dev_set else "")
              + (" (stopped early)" if r.get("stopped_early") else "") + f" -> {t.out / 'prefix.safetensors'}")
    print(f"{time.perf_counter() - start:.0f} s in all; peak memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB; {args.out}/train-many.json")
    return 0


def cmd_import_peft(args) -> int:
    from . import Prefix, load_base_model

    model, _ = load_base_model(args.model)
    prefix = Prefix.from_peft(args.directory, model, allow_position_shift=args.allow_position_shift)
    print(f"wrote {prefix.save(args.out)}: {prefix.length} positions x {prefix.num_parameters // prefix.length} "
          f"values from PEFT's {args.directory}")
    return 0


def cmd_export_peft(args) -> int:
    from . import Prefix, load_base_model
    from .peft_io import has_rotary

    prefix = Prefix.load(args.prefix)
    name = args.model or prefix.meta.get("base_model", {}).get("name")
    if not name:
        raise ValueError(f"{args.prefix} does not name its base model: pass --model")
    model, _ = load_base_model(name)
    out = prefix.to_peft(model, args.out)
    if not has_rotary(model):
        print(f"note: {type(model).__name__} has absolute positions: PEFT runs the input at positions "
              f"{prefix.length}.., so its outputs differ from prefixtune's (see prefixtune/peft_io.py)")
    print(f"wrote {out} (adapter_config.json, adapter_model.safetensors): load it with "
          f"PeftModel.from_pretrained(model, {str(out)!r}); decode with prefixtune.generate, since PEFT 0.21's "
          "generate drops the prefix on transformers 5.x")
    return 0


def _common(p: argparse.ArgumentParser, task: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model: {DEFAULT_MODEL!r} (embedded, default) or any Hugging Face id or local directory")
    if task:
        p.add_argument("--task", default="jsonl", choices=TASKS,
                       help="jsonl: your own {\"source\", \"target\"} files; others: the named dataset under --data "
                       "(dart has no train split)")
        p.add_argument("--data", default=None,
                       help="data directory for named tasks (default: $PREFIXTUNE_DATA, else ../shared/data)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda (default: cpu); under accelerate launch each process gets its own "
                   "(--device cpu: CPU processes)")
    p.add_argument("--threads", type=_count, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the frozen base model; prefixes stay float32 (bfloat16: about 1.7x faster on CPUs "
                   "with avx512_bf16/AMX and on GPUs; see results/perf.md)")


def _training_options(t: argparse.ArgumentParser) -> None:
    """The prefix and optimisation options of `train` and `train-many` (train_configs reads them):
    PrefixConfig's and TrainConfig's fields, with their defaults and help."""
    from .config import PrefixConfig
    from .train import TrainConfig

    add_options(t.add_argument_group("prefix"), PrefixConfig)
    add_options(t.add_argument_group("optimisation"), TrainConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", formatter_class=_Help, description="Prefix-Tuning (Li & Liang, 2021) for frozen Hugging Face LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a prefix (or a baseline: --method)", formatter_class=_Help,
                       description="Train a prefix on (source, target) pairs with the base model frozen. The run "
                       "directory gets the best prefix by dev loss (prefix.safetensors), the last checkpoint, a "
                       "log and summary.json (parameter counts, wall time, peak memory); running the same command "
                       "again resumes an interrupted run exactly. --method trains one of the paper's baselines "
                       "instead, with the same data, loop and loss (see prefixtune/methods.py).")
    _common(t)
    t.add_argument("--method", default="prefix", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    t.add_argument("--size", type=float, default=0.001,
                   help="adapter / lora: target fraction of the model's parameters (0.001 = 0.1%%; 0.03 = 3%%)")
    t.add_argument("--top-layers", type=int, default=2, help="ft-top2: how many top transformer blocks train")
    t.add_argument("--train", help="training JSONL (with --task jsonl)")
    t.add_argument("--dev", help="dev JSONL for dev loss and best-prefix selection (with --task jsonl)")
    t.add_argument("--out", required=True, help="run directory (created; resumed if it holds a checkpoint)")
    t.add_argument("--max-train-examples", type=_count, default=None, help="use only the first N training pairs")
    t.add_argument("--max-dev-examples", type=_count, default=None, help="use only the first N dev pairs")
    _training_options(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("generate", help="decode with one or more prefixes", formatter_class=_Help,
                       description="Generate an output for each source. With several --prefix, every source is "
                       "decoded with every prefix, all in the same mixed-prefix batches, and the output is JSONL. Finished "
                       "batches are kept in OUT.partial as they come: rerun the same command after an interruption to "
                       "decode only the rest.")
    _common(d)
    d.add_argument("--prefix", action="append", default=[], help="exported prefix (.safetensors); repeat for several; none = base model")
    d.add_argument("--run", default=None,
                   help="a `prefixtune train` run directory of any --method: decode with what it trained")
    d.add_argument("--input", help="sources: .txt (one per line) or .jsonl ({\"source\": ...}); with a named --task, its "
                   "decoding defaults apply to them")
    d.add_argument("--split", default="test", help="split of a named task to decode (unique sources in file order) when no --input is given")
    d.add_argument("--out", required=True, help="output file: one line per source (.txt) or JSONL")
    d.add_argument("--max-examples", type=_count, default=None, help="only the first N sources")
    d.add_argument("--batch-size", type=int, default=16, help="rows per generate call (per process)")
    d.add_argument("--num-beams", type=int, default=None,
                   help="beam size, 1 = greedy (default per task: 5 for table-to-text, 6 for summarization)")
    d.add_argument("--max-new-tokens", type=int, default=None, help="maximum generated tokens (default per task: 80 / 60)")
    d.add_argument("--min-new-tokens", type=int, default=None, help="minimum generated tokens (default per task: 0 / 10)")
    d.add_argument("--no-repeat-ngram-size", type=int, default=None, help="forbid repeated n-grams (default: 0 / 3)")
    d.add_argument("--do-sample", action="store_true", help="sample instead of beam/greedy search")
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    d.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (batch b samples with seed + b, so that a "
                   "resumed run samples as an uninterrupted one)")
    d.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="score predictions with the task's official metrics",
                       formatter_class=_Help,
                       description="E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr as the official E2E scorer; WebNLG (S/U/A) "
                       "and DART: BLEU, METEOR, TER (+chrF++) as their official scripts; summarization: ROUGE-1/2/L/Lsum.")
    e.add_argument("--task", required=True, choices=TASKS, help="which task's references and metrics")
    e.add_argument("--predictions", required=True,
                   help="one line per unique source in reader order (as `generate` writes); E2E also: TSV MR<TAB>output")
    e.add_argument("--references", default=None,
                   help="reference file (E2E: official CSV, default <data>/e2e/original/testset_w_refs.csv; jsonl: required)")
    e.add_argument("--split", default="test", help="split whose references are used")
    e.add_argument("--variant", choices=["official", "prefix-tuning"], default="official",
                   help="E2E only: the challenge scorer, or the Prefix-Tuning paper's (tokenised refs, Python NIST)")
    e.add_argument("--data", default=None, help="data directory (default: $PREFIXTUNE_DATA, else ../shared/data)")
    e.add_argument("--skip-ter", action="store_true", help="skip TER (slow: about 5 CPU minutes on DART test)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)

    from .experiments import NAMES, Scale

    x = sub.add_parser("experiment", help="run the paper's experiments (to convergence) and write their reports",
                       formatter_class=_Help,
                       description="Train and score every run of one of the paper's experiments (or all, or the whole "
                       "grid in priority order), then write results/NAME.md (protocol, the paper's numbers beside ours "
                       "with 95% bootstrap intervals, verdicts, plots). Every run is trained to its best dev score "
                       "(early stopping) and recorded in the ledger results/ledger/<run hash>/ as soon as it finishes; "
                       "rerunning does only what the ledger lacks (an interrupted training resumes from runs/). "
                       "Several processes (one per core) can work on the same grid: a run is held by an flock that dies "
                       "with its process. Learning rates come from the lr-grid experiment (read from the ledger). "
                       "See README, 'Experiments'.")
    x.add_argument("name", choices=list(NAMES) + ["all", "grid"],
                   help="which experiment; 'grid': every experiment's runs in priority order (LR grid first), for "
                   "long background runs; 'all': each experiment in turn")
    x.add_argument("--report-only", action="store_true",
                   help="write the report(s) (and the README's verdict table) from the ledger alone, training nothing; "
                   "the reports list the runs that are missing")
    x.add_argument("--status", action="store_true", help="list the grid's runs that are done / running / to do / waiting, and exit")
    x.add_argument("--commit", action="store_true", help="git-commit each run's ledger entry (and the reports) as it finishes")
    x.add_argument("--deadline", default=None, metavar="HH:MM|+MINUTES",
                   help="grid only: start only runs expected to end before this time (the next HH:MM, or MINUTES from "
                   "now), from the CPU time of finished runs like them, then stop; for a session whose machine, and "
                   "with it the training scratch of an unfinished run, is not kept")
    x.add_argument("--carry-over", action="store_true",
                   help="with --deadline, on a machine whose runs directory is kept: once no run to do fits before the "
                   "deadline, train one anyway and stop it there with an exact checkpoint, for a later session to "
                   "resume (one already begun here, else the longest), so that runs longer than a session finish "
                   "over several")
    x.add_argument("--data", default=None, help="data directory (default: $PREFIXTUNE_DATA, else ../shared/data)")
    x.add_argument("--threads", type=_count, default=None, help="torch CPU threads per process (1 per process on a shared machine)")
    x.add_argument("--runs-dir", default="runs/experiments", help="training scratch (checkpoints, weights; git-ignored)")
    x.add_argument("--results-dir", default="results", help="reports and plots; the ledger is RESULTS_DIR/ledger")
    add_options(x, Scale)
    x.add_argument("--lr", action="append", default=[],
                   help="METHOD=VALUE: fix a method's peak learning rate instead of the grid's choice (repeatable)")
    x.set_defaults(func=cmd_experiment)

    s = sub.add_parser("serve", help="serve many tenants' prefixes over HTTP with continuous batching across prefixes",
                       formatter_class=_Help,
                       description="One process, one frozen base model, an HTTP API (FastAPI; docs at /docs): tenants "
                       "upload exported prefixes and generate with them; concurrent requests for different prefixes "
                       "decode together in one running batch that rows join and leave at every step. See README, 'Serving'.")
    from .serve.app import TRAINING_OPTIONS, ServeConfig

    s.add_argument("--keys", default=None,
                   help="JSON file {\"api-key\": \"tenant\", ...}; or set PREFIXTUNE_API_KEYS='key1:tenantA,key2:tenantB'")
    add_options(s, ServeConfig, [f.name for f in dataclasses.fields(ServeConfig) if f.name not in TRAINING_OPTIONS])
    add_options(s.add_argument_group("training API", "POST /v1/prefixes/NAME/train, /v1/jobs (README, 'Training "
                                     "through the server')"), ServeConfig, TRAINING_OPTIONS)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("train-many", help="train many prefixes (one per user) together on one frozen model",
                       formatter_class=_Help,
                       description="Train the jobs of --jobs (a JSONL file, one job per line: {\"name\", \"train\": "
                       "FILE.jsonl, \"dev\": FILE.jsonl?, any setting of the options below by its field name, e.g. "
                       "\"length\": 20, \"lr\": 0.001, \"max_steps\": 300, \"patience\": 3}) on one copy of the "
                       "model: every step batches rows of several jobs, each row with its own job's prefix. Each job "
                       "gets its own run directory OUT/jobs/NAME (prefix.safetensors, checkpoint, log), ends as if "
                       "trained alone (see prefixtune/train_many.py), and the same command resumes all of them.")
    _common(m, task=False)
    m.add_argument("--jobs", required=True, help="the jobs file (JSONL; train/dev paths relative to it)")
    m.add_argument("--out", required=True, help="output directory (jobs/NAME per job, train-many.json)")
    m.add_argument("--rows-per-round", type=int, default=32, help="rows of all jobs together per forward/backward")
    m.add_argument("--autocast", action="store_true", help="bfloat16 autocast (float32 prefixes and AdamW state)")
    _training_options(m)
    m.set_defaults(func=cmd_train_many)

    peft_doc = ("Rotary models convert exactly both ways (keys rotated by the prefix length, since PEFT shifts the "
                "input positions); models with absolute positions cannot be made equal (see prefixtune/peft_io.py).")
    i = sub.add_parser("import-peft", help="convert a PEFT prefix-tuning checkpoint to a prefixtune prefix file",
                       description="Read a PEFT prefix-tuning directory (adapter_config.json + adapter_model."
                       "safetensors, with or without prefix_projection) and write a prefixtune .safetensors prefix "
                       "for --model. " + peft_doc, formatter_class=_Help)
    i.add_argument("directory", help="the PEFT adapter directory (as save_pretrained writes it)")
    i.add_argument("--model", default=DEFAULT_MODEL, help="the base model the PEFT prefix was trained on")
    i.add_argument("--out", required=True, help="prefix file to write (.safetensors)")
    i.add_argument("--allow-position-shift", action="store_true",
                   help="convert a prefix of a model with absolute positions anyway (it then runs with unshifted "
                   "positions, unlike under PEFT)")
    i.set_defaults(func=cmd_import_peft)
    x = sub.add_parser("export-peft", help="write a prefixtune prefix as a PEFT prefix-tuning checkpoint",
                       description="Write a directory that PeftModel.from_pretrained(model, DIR) loads, whose "
                       "forward gives prefixtune's logits. " + peft_doc,
                       formatter_class=_Help)
    x.add_argument("prefix", help="prefix file (.safetensors) written by prefixtune")
    x.add_argument("--out", required=True, help="directory to write")
    x.add_argument("--model", default=None, help="the prefix's base model (default: the one its metadata names)")
    x.set_defaults(func=cmd_export_peft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"prefixtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
