"""Runs of the experiments: one training run (any method), trained to its best dev score, and its evaluations.

A :class:`Run` says what to train (method, data, seed, learning rate, stopping rule...) and which test
sets to decode and score (:class:`Eval`). It is identified by a hash of its training settings, so two
experiments that need the same run share it (e.g. the E2E-500 prefix of the learning-rate grid, the
low-data, the main-table and the prefix-length experiments). Its result goes to the ledger
(results/ledger/<key>/, see ledger.py) as soon as it is known; its training scratch (checkpoint,
trained weights) lives in ``runs_dir/<key>/``. A run in the ledger is not redone, an interrupted
training resumes from its checkpoint, an interrupted test decoding from its last batch
(:func:`decode_batches`), a missing evaluation is added. A failed run is recorded and
the others go on.

**Protocol** (issue 11): every run evaluates every ``eval_epochs`` epochs (at least every
``min_eval_steps`` steps), stops when ``patience`` evaluations in a row brought no better selection
score, within a cap of ``max(max_epochs epochs, min_steps steps)`` (the learning rate decays linearly
to 0 over the cap), and keeps its best evaluation's weights. Selection: ``select="dev_bleu"`` decodes
``dev_score_examples`` dev inputs at each evaluation and scores them with the task's BLEU, decoded as
the test set is (``dev_score_decoding="test"``: the task's beam search, in ``dev_score_dtype``) or,
in runs from before that setting, greedily in float32 (``"greedy"``); ``"dev_loss"``: dev NLL per
target token. ``autocast``: bfloat16 autocast with float32 master weights.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import resource
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import cpu_bf16
from ..data import Example, group_references
from ..data import read_task as _read_task
from . import ledger

# where the extrapolation experiment's XSUM topics come from: see xsum_topic()
SPORT_WORDS = ("football", "rugby", "cricket", "tennis", "golf", "olympic", "premier league", "championship",
               "tournament", "striker", "midfielder", "goalkeeper", "manager", "coach", "league", "cup", "match",
               "season", "scored", "goal", "wicket", "innings", "grand slam", "semi-final", "quarter-final",
               "boxing", "athletics", "cyclist", "formula one", "squad", "fixture", "defender", "batsman")


def xsum_topic(document: str) -> str:
    """"sport" when the article uses at least 4 distinct sport words of SPORT_WORDS, else "news".

    XSUM's rows here carry no URL or section field (only id, document, summary), so the topic is
    derived from the article text; BBC sport articles use this vocabulary densely, news rarely."""
    text = document.lower()
    return "sport" if sum(w in text for w in SPORT_WORDS) >= 4 else "news"


@functools.lru_cache(maxsize=None)
def read_task(task: str, split: str, data=None) -> list[Example]:
    """The reader's examples, read once per process (callers never modify the list)."""
    return _read_task(task, split, data)


@functools.lru_cache(maxsize=None)
def seen_categories(data=None) -> frozenset[str]:
    from ..data import data_dir
    from ..data.webnlg import seen_categories as read_seen

    return frozenset(read_seen(data_dir(data)))


@dataclass(frozen=True)
class Eval:
    """A test set to decode and score. ``n``: a fixed random sample of that many test inputs (the whole
    set when larger). ``subset``: "S"/"U" (WebNLG seen/unseen categories, half of ``n`` each when "SU"),
    or an XSUM topic. ``num_beams`` 0: the paper's decoding of the task (prefixtune.data.DECODING).
    ``decoder``: "ours" (prefixtune.generate) or "peft" (PEFT's own generate, peft-prefix only)."""

    task: str
    n: int = 10**9
    split: str = "test"
    subset: str = ""
    num_beams: int = 0
    max_new_tokens: int | None = None
    max_source_tokens: int | None = None
    decoder: str = "ours"
    dtype: str = "float32"  # of the model that decodes (the trained weights cast to it)

    @property
    def name(self) -> str:
        tag = f"{self.task}-{self.split}" + (f"-{self.subset}" if self.subset else "")
        return tag + ("-peft-generate" if self.decoder == "peft" else "")

    def key(self) -> str:
        d = asdict(self)
        if d["dtype"] == "float32":  # (evaluations from before the field existed keep their keys)
            del d["dtype"]
        return _hash(d)

    def decoding(self) -> dict:
        from ..data import DECODING

        d = dict(DECODING[self.task])
        if self.num_beams:
            d["num_beams"] = self.num_beams
        if self.max_new_tokens:
            d["max_new_tokens"] = self.max_new_tokens
        return d


@dataclass(frozen=True)
class Run:
    task: str
    method: str = "prefix"
    size: float = 0.001  # adapter / lora, fraction of the model's parameters
    length: int = 10
    mlp_hidden: int = 512
    init: str = "random"
    init_text: str | None = None
    train_examples: int | None = None  # a random sample of this many training pairs (None: all)
    sampling: int = 0  # which random sample
    train_topic: str | None = None  # XSUM: train on this topic only (extrapolation)
    seed: int = 0
    batch_size: int = 8
    lr: float | None = None  # None: not known yet (waiting for the learning-rate grid)
    warmup_steps: int = 10
    max_source_tokens: int | None = None
    dev_examples: int = 200  # dev pairs of the dev loss
    max_epochs: float = 10.0  # the cap: max(max_epochs epochs, min_steps steps)
    min_steps: int = 600
    eval_epochs: float = 0.5  # evaluate every half epoch...
    min_eval_steps: int = 10  # ...but not more often than every 10 steps
    patience: int = 3  # evaluations without a better selection score before stopping
    select: str = "dev_bleu"  # or "dev_loss"
    dev_score_examples: int = 100  # dev inputs decoded for "dev_bleu"...
    # ...as the test set is ("test": the task's decoding, beam 5, in dev_score_dtype), or greedily in float32
    # ("greedy", the default only so that ledger entries from before these fields read back as they ran:
    # Scale.run sets "test"). Why: greedy dev BLEU chose a 50-example prefix whose beam-5 test outputs ran on.
    dev_score_decoding: str = "greedy"
    dev_score_dtype: str = "float32"
    autocast: bool = True  # bfloat16 autocast, float32 master weights (False: float32 throughout)
    evals: tuple[Eval, ...] = field(default=(), compare=False)
    model: str = "smollm2-135m"
    dtype: str = "float32"  # the base model's stored weights

    def __post_init__(self):
        if self.select not in ("dev_bleu", "dev_loss"):
            raise ValueError(f"select must be dev_bleu or dev_loss, got {self.select!r}")
        if self.select == "dev_bleu" and self.task not in DEV_BLEU_TASKS:
            raise ValueError(f"select='dev_bleu' is for {DEV_BLEU_TASKS}; use dev_loss for {self.task}")
        if self.dev_score_decoding not in ("test", "greedy"):
            raise ValueError(f"dev_score_decoding must be test or greedy, got {self.dev_score_decoding!r}")

    def training(self) -> dict:
        d = asdict(self)
        d.pop("evals")
        if (d["dev_score_decoding"], d["dev_score_dtype"]) == ("greedy", "float32"):  # runs from before the fields
            del d["dev_score_decoding"], d["dev_score_dtype"]  # keep their keys
        return d

    def key(self) -> str:
        return _hash(self.training())

    def label(self) -> str:
        """A readable name (the key is what identifies the run)."""
        from ..methods import METHODS

        method = METHODS[self.method]
        extra = f"-{100 * self.size:g}%" if "size" in method.options else ""
        if method.has_length and self.length != 10:
            extra += f"-L{self.length}"
        if self.init == "words":
            extra += f"-init:{self.init_text}"
        n = f"/{self.train_examples}" if self.train_examples else ""
        topic = f"/{self.train_topic}" if self.train_topic else ""
        fp32 = "" if self.autocast else "/float32"
        lr = "" if self.lr is None else f"/lr{self.lr:g}"
        return f"{self.task}{n}{topic}/{self.method}{extra}/s{self.sampling}.{self.seed}{lr}{fp32}"

    def schedule(self, n_train: int) -> dict:
        """Batches per epoch, the step cap and the evaluation interval for ``n_train`` training pairs."""
        per_epoch = math.ceil(n_train / self.batch_size)
        return {"batches_per_epoch": per_epoch, "max_steps": max(math.ceil(self.max_epochs * per_epoch), self.min_steps),
                "eval_every": max(math.ceil(self.eval_epochs * per_epoch), self.min_eval_steps)}


DEV_BLEU_TASKS = ("e2e", "webnlg")
# Test decoding batch: 48 inputs (x beam) per generate call. On 48 E2E test tables with a trained prefix, beam
# 5, batch 48 gave the same 48 outputs as batch 16 in 0.90-0.98x the CPU time (two measurements):
# benchmarks/decode_options.py, results/perf/decode_options.json. The decoding dtype: Scale.decode_dtype.
DECODE_BATCH = 48


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# --- data ----------------------------------------------------------------------------------------


def truncate_sources(examples: list[Example], tokenizer, max_tokens: int | None) -> list[Example]:
    """Sources cut to their first ``max_tokens`` tokens (long articles, to fit the compute)."""
    if not max_tokens:
        return examples
    out = []
    for e in examples:
        ids = tokenizer(e.source, add_special_tokens=False).input_ids
        src = e.source if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])
        out.append(Example(src, e.target, e.references, e.key, e.category))
    return out


def training_pairs(run: Run, data) -> tuple[list[Example], list[Example]]:
    train = read_task(run.task, "train", data)
    if run.train_topic:
        train = [e for e in train if xsum_topic(e.source) == run.train_topic]
    if run.train_examples:
        if run.train_examples > len(train):
            raise ValueError(f"{run.task}: asked for {run.train_examples} training pairs, there are {len(train)}")
        train = random.Random(1000 + run.sampling).sample(train, run.train_examples)
    return train, fixed_sample(read_task(run.task, "dev", data), run.dev_examples)


def fixed_sample(items: list, n: int, seed: int = 1) -> list:
    """A fixed random sample of ``n`` items (all of them, in order, when there are no more than ``n``):
    dev files are ordered by category or input, so their first rows are not representative."""
    return items if n >= len(items) else random.Random(seed).sample(items, n)


def test_groups(ev: Eval, data) -> list[Example]:
    """The test sources (with all their references) of an evaluation: a fixed random sample of ``n``."""
    groups = group_references(read_task(ev.task, ev.split, data))
    rng = random.Random(0)
    if ev.task == "webnlg" and ev.subset:
        seen = seen_categories(data)
        pools = {"S": [g for g in groups if g.category in seen], "U": [g for g in groups if g.category not in seen]}
        parts = list(ev.subset)  # "S", "U" or "SU" (half each)
        per = ev.n // len(parts)
        return [g for p in parts for g in rng.sample(pools[p], min(per, len(pools[p])))]
    if ev.task == "xsum" and ev.subset:
        groups = [g for g in groups if xsum_topic(g.source) == ev.subset]
    return rng.sample(groups, min(ev.n, len(groups))) if ev.n < len(groups) else groups


def score_outputs(ev: Eval, groups: list[Example], outputs: list[str], data) -> tuple[dict, dict]:
    """(scores per column, per-item statistics). Columns: "A" (all), WebNLG also "S"/"U" (seen/unseen
    categories). Per-item statistics (see stats.py): "BLEU" (the scorer's n-gram counts), E2E "SER"
    ([slot errors, table values]), summarization "ROUGE-1/2/L" ([F, 1]), WebNLG "category" ("S"/"U")."""
    from ..metrics import e2e, rouge, slot_error, webnlg

    refs = [g.references for g in groups]
    if ev.task == "e2e":  # the paper's scorer variant (tokenised references of the prefix-tuning files)
        per = slot_error.item_errors(outputs, [g.source for g in groups])
        ser = slot_error.score(outputs, [g.source for g in groups])
        items = {"BLEU": e2e.pymteval_bleu_item_stats(outputs, refs),
                 "SER": [[p["added"] + p["missing"] + p["wrong"] + p["repeated"], p["slots"]] for p in per]}
        return {"A": {**e2e.score(outputs, refs, variant="prefix-tuning"), **ser}}, items
    if ev.task in ("webnlg", "dart"):
        cols = {"A": list(range(len(groups)))}
        dataset = "dart" if ev.task == "dart" else "webnlg2017"
        items = {"BLEU": webnlg.bleu_item_stats(outputs, refs, max_refs=3, dataset=dataset)}
        if ev.task == "webnlg":
            seen = seen_categories(data)
            items["category"] = ["S" if g.category in seen else "U" for g in groups]
            cols = webnlg.columns([g.category for g in groups], seen)
        return webnlg.score_columns(outputs, refs, cols, max_refs=3, dataset=dataset), items
    per = rouge.item_scores(outputs, refs)
    return {"A": rouge.score(outputs, refs)}, {k: [[row[k], 1] for row in per] for k in ("ROUGE-1", "ROUGE-2", "ROUGE-L")}


# --- one run -------------------------------------------------------------------------------------


# Threads handed to this process by a grid process that stopped (grid.take_a_core), on top of --threads.
extra_threads = 0


def _load(run: Run, threads: int | None):
    from .. import load_base_model

    if threads:
        torch.set_num_threads(threads + extra_threads)
    return load_base_model(run.model, dtype=getattr(torch, run.dtype))


def dev_bleu(run: Run, model, tokenizer, data):
    """The Trainer's ``dev_score`` hook for ``select="dev_bleu"``: BLEU (the task's test scorer) of the
    outputs for a fixed sample of ``dev_score_examples`` dev inputs, decoded with the weights being
    trained. ``dev_score_decoding="test"``: decoded as the test set is (the task's beam search, by a
    copy of the model in ``dev_score_dtype``), so a run is selected on what is reported: greedy outputs
    can end where beam-5 outputs of the same weights repeat themselves to the length limit.
    ``"greedy"``: greedy, float32, batch 32 (runs from before)."""
    from .. import generate
    from ..data import DECODING
    from ..modes import eval_mode

    groups = fixed_sample(group_references(read_task(run.task, "dev", data)), run.dev_score_examples)
    sources, refs = [g.source for g in groups], [g.references for g in groups]

    def score(trainer) -> float:
        tuner = trainer.tuner
        with eval_mode(tuner):
            if run.dev_score_decoding == "greedy":
                outputs = generate(model, tokenizer, sources, batch_size=32, max_new_tokens=80, **tuner.decode_inputs())
            else:  # a copy: the trained weights themselves stay float32
                decoder = copy.deepcopy(model).to(getattr(torch, run.dev_score_dtype))
                outputs = generate(decoder, tokenizer, sources, batch_size=DECODE_BATCH, **DECODING[run.task],
                                   **tuner.decode_inputs())
                del decoder
        return corpus_bleu(run.task, outputs, refs)

    return score


def corpus_bleu(task: str, outputs: list[str], refs: list[list[str]]) -> float:
    """BLEU (0-100) as the task's test scorer computes it (E2E: the paper's variant)."""
    from ..metrics import e2e, webnlg

    if task == "e2e":
        return 100 * e2e.pymteval_bleu_nist(outputs, refs)[0]
    return webnlg.score(outputs, refs, max_refs=3, meteor=False, ter=False)["BLEU"]


def train(run: Run, out: Path, data, threads: int | None) -> dict:
    from ..methods import MethodConfig
    from ..config import PrefixConfig
    from ..train import TrainConfig, train_method

    start, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = _load(run, threads)
    train_set, dev = training_pairs(run, data)
    train_set = truncate_sources(train_set, tokenizer, run.max_source_tokens)
    dev = truncate_sources(dev, tokenizer, run.max_source_tokens)
    plan = run.schedule(len(train_set))
    prefix_config = PrefixConfig(length=run.length, mlp_hidden=run.mlp_hidden, init=run.init, init_text=run.init_text)
    train_config = TrainConfig(max_steps=plan["max_steps"], batch_size=run.batch_size, lr=run.lr,
                               warmup_steps=run.warmup_steps, eval_every=plan["eval_every"], seed=run.seed,
                               patience=run.patience, autocast=run.autocast)
    method = MethodConfig(run.method, size=run.size)
    hook = dev_bleu(run, model, tokenizer, data) if run.select == "dev_bleu" else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak_rss()
    trainer, sizes, result = train_method(model, tokenizer, train_set, dev, prefix_config, train_config, out,
                                          method=method, dev_score=hook)
    curve = result["history"]
    best = next((h for h in curve if h["step"] == result["best_step"]), curve[-1])
    train_seconds = sum((h["seconds_per_step"] or 0) * (h["step"] - p["step"]) for p, h in zip(curve, curve[1:]))
    counted = counted_cpu(curve)
    summary = {
        **sizes, "n_train": len(train_set), "n_dev": len(dev), **plan,
        "steps": result["steps"], "best_step": result["best_step"], "best_epoch": (result["best_step"] or 0) / plan["batches_per_epoch"],
        "stopped_early": result["stopped_early"], "selected_by": result["selected_by"],
        "dev_loss_start": curve[0]["dev_loss"], "dev_loss": best["dev_loss"],  # at the selected evaluation
        "min_dev_loss": min((h["dev_loss"] for h in curve[1:] if h["dev_loss"] is not None), default=None),
        "dev_score": best.get("dev_score"), "dev_curve": curve,
        "seconds_per_step": train_seconds / max(1, result["steps"]), "train_seconds": train_seconds,
        "cpu_seconds_per_step": None if counted is None else counted[0] / max(1, result["steps"]),
        "train_cpu_seconds": None if counted is None else sum(counted),
        "dev_score_seconds": sum(h.get("dev_score_seconds", 0) for h in curve),
        "wall_seconds": time.perf_counter() - start,  # of the last (or only) session of this training
        "cpu_seconds": time.process_time() - cpu,  # the same in CPU time (what the process used, whatever the load)
        # this run's peak resident memory (base model included) where Linux lets us reset the peak;
        # otherwise the process's peak so far (exact only when it exceeds peak_memory_mb_before)
        "peak_memory_mb": _peak_rss_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_mb_before": None if reset else rss_before / 1024,
        "threads": torch.get_num_threads(),
        # how this machine ran the bfloat16 products (of the last session, for a resumed run): its own
        # bfloat16 kernels, or float32 on bfloat16-rounded operands (see prefixtune/cpu_bf16.py)
        "bf16_products": cpu_bf16.products_kind(),
    }
    del trainer, model
    return summary


def counted_cpu(curve: list[dict]) -> tuple[float, float] | None:
    """(CPU seconds of the training steps, of the evaluations) over a run's history (all its sessions),
    or None where an evaluation did not count them (runs, or checkpoints resumed, from before)."""
    if not (all(h.get("eval_cpu_seconds") is not None for h in curve)
            and all(h.get("cpu_seconds_per_step") is not None for h in curve[1:])):
        return None
    steps = sum(h["cpu_seconds_per_step"] * (h["step"] - p["step"]) for p, h in zip(curve, curve[1:]))
    return steps, sum(h["eval_cpu_seconds"] for h in curve)


def step_seconds(train: dict) -> float | None:
    """Seconds per training step over a run: CPU seconds where counted (see training_seconds), else wall."""
    cpu = train.get("cpu_seconds_per_step")
    return train.get("seconds_per_step") if cpu is None else cpu


def training_seconds(train: dict) -> float:
    """Seconds a run's training took, its evaluations included, over all its sessions: its CPU seconds
    (``train_cpu_seconds``: training steps, dev loss and dev score of every evaluation, which the
    Trainer's history keeps across sessions; unaffected by pauses and other load). Runs from before
    that was counted: the larger of its last session's wall time (``wall_seconds``: a resumed run's
    earlier sessions are not in it) and the sum of its evaluation intervals (training steps and
    dev-BLEU decoding; model loading and the dev-loss passes are not in it)."""
    if train.get("train_cpu_seconds") is not None:
        return train["train_cpu_seconds"]
    return max(train["wall_seconds"], train.get("train_seconds", 0) + (train.get("dev_score_seconds") or 0))


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: /proc/self/clear_refs, "5")."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_mb() is not None
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def evaluate(run: Run, evals: list[Eval], out: Path, ledger_dir: Path, data, threads: int | None) -> dict[str, dict]:
    """Decode and score ``evals`` with what run ``out`` trained, on one freshly loaded base model
    (PEFT's own generate, ``decoder="peft"``, gets its own); outputs and per-item statistics go to
    the ledger. Returns {eval key: result}."""
    from ..methods import load_trained, read_run
    from ..template import special_ids

    method, prefix_config = read_run(out)
    results = {}
    for decoder, dtype in sorted({(ev.decoder, ev.dtype) for ev in evals}):
        todo = [ev for ev in evals if (ev.decoder, ev.dtype) == (decoder, dtype)]
        model, tokenizer = _load(run, threads)
        kwargs = load_trained(method, model, out, prefix_config) if decoder == "ours" else None
        model.to(getattr(torch, dtype))
        for ev in todo:
            groups = truncate_sources(test_groups(ev, data), tokenizer, ev.max_source_tokens)
            decoding = ev.decoding()
            sources = [g.source for g in groups]
            if decoder == "peft":
                start, cpu = time.perf_counter(), time.process_time()
                with cpu_bf16.products(model):  # PEFT's generate, not ours (which enters it itself)
                    tokens = peft_generate(model, tokenizer, out, prefix_config, sources, decoding)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            else:
                tokens, seconds, cpu_seconds = decode_batches(model, tokenizer, sources, out / f"decoding-{ev.key()}.jsonl",
                                                              **kwargs, **decoding)
            outputs = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
            eos = special_ids(tokenizer)[1]
            new_tokens = sum(len(t) - (t[-1:] == [eos]) for t in tokens)  # the outputs' tokens (EOS not counted)
            scores, items = score_outputs(ev, groups, outputs, data)
            files = ledger.write_eval_files(ledger_dir.parent, ledger_dir.name, ev, outputs, items)
            seen = seen_categories(data) if ev.task == "webnlg" else set()
            results[ev.key()] = {
                "eval": asdict(ev), "n": len(groups), "scores": scores, "decode_seconds": seconds, "decode_cpu_seconds": cpu_seconds,
                "output_tokens": new_tokens, "decoding": decoding, "threads": torch.get_num_threads(),
                "bf16_products": cpu_bf16.products_kind(), **files,
                "counts": {"S": sum(g.category in seen for g in groups), "U": sum(g.category not in seen for g in groups)}
                if ev.task == "webnlg" else {}, "items": items}
        del model
    return results


def decode_batches(model, tokenizer, sources: list[str], done_file: Path, **generate_kwargs
                   ) -> tuple[list[list[int]], float, float]:
    """``generate(..., batch_size=DECODE_BATCH, return_tokens=True)``'s tokens per source, batch by batch,
    each batch's kept in ``done_file`` as it ends (:class:`prefixtune.generate.PartialOutputs`, as
    ``prefixtune generate`` keeps them), so that a decoding interrupted (Ctrl-C, the end of a session)
    goes on where it stopped: the same batches, so the same outputs. Also returns the wall and CPU
    seconds of all of it, its earlier attempts' included."""
    from ..generate import PartialOutputs, generate_batches

    done = PartialOutputs(done_file, [model, sources, generate_kwargs, DECODE_BATCH])
    start, cpu = time.perf_counter(), time.process_time()
    for b, rows, gens in generate_batches(model, tokenizer, sources, batch_size=DECODE_BATCH, progress=True,
                                          return_tokens=True, skip=done.done, **generate_kwargs):
        seconds, cpu_seconds = (time.perf_counter() - start) / len(rows), (time.process_time() - cpu) / len(rows)
        done.add(b, rows, [{"tokens": g.tokens, "seconds": seconds, "cpu_seconds": cpu_seconds} for g in gens])
        start, cpu = time.perf_counter(), time.process_time()
    rows = done.outputs(len(sources))
    return [r["tokens"] for r in rows], sum(r["seconds"] for r in rows), sum(r["cpu_seconds"] for r in rows)


@torch.no_grad()
def peft_generate(model, tokenizer, run_dir: Path, prefix_config, sources: list[str], decoding: dict) -> list[list[int]]:
    """Decode with PEFT's own ``PeftModel.generate`` and its trained prefix (the peer's decoding path);
    the generated tokens of each source, up to its EOS, as :func:`prefixtune.generate` returns them."""
    from ..baselines.peft_prefix import PeftPrefixModel
    from ..generate import until_eos
    from ..template import collate_prompts, prompt_batches, special_ids

    tuner = PeftPrefixModel(model, prefix_config)
    tuner.load_weights(run_dir)
    tuner.eval()
    _, eos, pad = special_ids(tokenizer)
    prompts, batches = prompt_batches(model, tokenizer, sources, 16)
    outputs: list[list[int]] = [[] for _ in sources]
    for rows in batches:
        batch = collate_prompts(model, [prompts[i] for i in rows], pad)
        out = tuner.peft_model.generate(**batch, do_sample=False, eos_token_id=eos, pad_token_id=pad, **decoding)
        for i, row in zip(rows, out[:, batch["input_ids"].shape[1]:]):
            outputs[i] = until_eos(row, eos)
    return outputs


# --- many runs, through the ledger ----------------------------------------------------------------


def has_weights(out: Path) -> bool:
    """Whether ``out`` holds a finished training's weights (absent on a fresh clone: the ledger has
    no weights)."""
    from ..methods import METHODS, read_run

    return (out / "run.json").is_file() and (out / METHODS[read_run(out)[0].method].tuner.trained_file).is_file()


def complete(run: Run, result: dict | None) -> bool:
    return bool(result) and "train" in result and all(ev.key() in result.get("evals", {}) for ev in run.evals)


def run_one(run: Run, runs_dir: Path, ledger_dir: Path, data, threads: int | None, commit: bool = False) -> dict | None:
    """Train (unless the ledger has it) and evaluate (each evaluation it lacks) one run, holding its
    lock; returns its result, or None if another process holds the run."""
    key = run.key()
    out = runs_dir / key
    with ledger.lock(runs_dir, key) as mine:
        if not mine:
            return None
        result = ledger.read(ledger_dir, key) or {"run": run.training(), "evals": {}}
        if complete(run, result):  # done by another process meanwhile
            return result
        missing = [ev for ev in run.evals if ev.key() not in result["evals"]]
        if "train" in result and missing and not has_weights(out):
            # a new evaluation for a run trained elsewhere: retrain it (the ledger keeps no weights)
            tqdm.write(f"{run.label()} ({key}): retraining for a new evaluation (no trained weights in {out})")
            shutil.rmtree(out, ignore_errors=True)
            result = {"run": run.training(), "evals": {}, "retrained": True}
            missing = list(run.evals)
        if "train" not in result:
            result["train"] = train(run, out, data, threads)
            ledger.write(ledger_dir, key, result)
        if missing:
            result["evals"].update(evaluate(run, missing, out, ledger_dir / key, data, threads))
            ledger.write(ledger_dir, key, result)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # only for resuming an unfinished training...
        for path in out.glob("decoding-*.jsonl"):  # ...or decoding (decode_batches)
            path.unlink()
        (ledger_dir / key / ledger.UNFINISHED).unlink(missing_ok=True)  # (for estimating a run not done yet)
        if commit:
            ledger.commit([ledger_dir / key], f"ledger: {run.label()} ({key})")
        return result


def waiting(run: Run) -> dict:
    return {"run": run.training(), "error": f"waiting for the learning-rate grid of {run.method}"}


def run_all(runs: list[Run], runs_dir: str | Path, ledger_dir: str | Path, data=None, threads: int | None = None,
            cached_only: bool = False, commit: bool = False, wait: bool = True) -> list[dict]:
    """Every run (deduplicated), in order; failures recorded as ``{"run", "error"}`` without stopping.
    Runs held by another process are done last, after waiting for it (``wait=False``: reported as
    missing). Runs without a learning rate (``lr=None``: the grid has not chosen it yet) are reported
    as waiting. ``cached_only``: train and evaluate nothing, read the ledger."""
    runs_dir, ledger_dir = Path(runs_dir), Path(ledger_dir)
    todo = merge(runs)
    results: dict[str, dict] = {}
    queue = list(todo)
    bar = tqdm(total=len(todo), desc="runs", position=0, dynamic_ncols=True, disable=cached_only)
    while queue:
        run = queue.pop(0)
        cached = ledger.read(ledger_dir, run.key())
        if run.lr is None:
            results[run.key()] = waiting(run)
        elif complete(run, cached):
            results[run.key()] = cached
        elif cached_only:
            begun = ledger.describe_unfinished(ledger_dir, run.key())
            results[run.key()] = {"run": run.training(), "error": "not in the ledger yet" + (f"; {begun}" if begun else "")}
        else:
            bar.set_postfix_str(run.label())
            try:
                result = run_one(run, runs_dir, ledger_dir, data, threads, commit)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failed run is reported; the others go on
                result = failed(run, runs_dir, e)
            if result is None:  # another process has it
                if wait:
                    if all(ledger.is_locked(runs_dir, r.key()) for r in queue + [run]):
                        time.sleep(30)
                    queue.append(run)
                    continue
                result = {"run": run.training(), "error": "being run by another process"}
            results[run.key()] = result
        bar.update(1)
    bar.close()
    return [results[r.key()] for r in runs]


def merge(runs: list[Run]) -> list[Run]:
    """The runs deduplicated by key, in first-appearance order, each with the union of its evaluations."""
    unique = list({r.key(): r for r in runs}.values())
    merged: dict[str, list[Eval]] = {}
    for r in runs:
        merged.setdefault(r.key(), []).extend(e for e in r.evals if e not in merged.get(r.key(), []))
    return [Run(**{**r.training(), "evals": tuple(merged[r.key()])}) for r in unique]


def failed(run: Run, runs_dir: Path, e: Exception) -> dict:
    (runs_dir / run.key()).mkdir(parents=True, exist_ok=True)
    (runs_dir / run.key() / "error.txt").write_text(traceback.format_exc())
    tqdm.write(f"run {run.label()} ({run.key()}) failed: {e}; see {runs_dir / run.key() / 'error.txt'}")
    return {"run": run.training(), "error": f"{type(e).__name__}: {e}"}
