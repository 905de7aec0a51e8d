"""Runs of the experiments: one training run (any method) and its evaluations, cached on disk.

A :class:`Run` says what to train (method, data, seed, steps...) and which test sets to decode and
score (:class:`Eval`). Its directory under ``runs_dir`` is named by a hash of the training settings,
so two experiments that need the same run share it (e.g. the length-10 E2E prefix of the
table-to-text and prefix-length experiments). ``result.json`` in it holds the training summary and
each evaluation; a run whose result is complete is not redone, an interrupted one resumes from its
checkpoint, an evaluation that is missing is added. A failed run is recorded and the others go on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import resource
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import Example, group_references
from ..data import read_task as _read_task

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
    """A test set to decode and score. ``subset``: "S"/"U" (WebNLG seen/unseen categories, half of ``n``
    each when "SU"), or an XSUM topic. ``decoder``: "ours" (prefixtune.generate) or "peft" (PEFT's
    own generate, for the peft-prefix method only)."""

    task: str
    n: int
    split: str = "test"
    subset: str = ""
    num_beams: int = 1
    max_new_tokens: int | None = None
    max_source_tokens: int | None = None
    decoder: str = "ours"

    @property
    def name(self) -> str:
        tag = f"{self.task}-{self.split}" + (f"-{self.subset}" if self.subset else "")
        return tag + ("-peft-generate" if self.decoder == "peft" else "")

    def key(self) -> str:
        return _hash(asdict(self))


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
    steps: int = 50
    batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 5
    max_source_tokens: int | None = None
    dev_examples: int = 50
    evals: tuple[Eval, ...] = field(default=(), compare=False)
    model: str = "smollm2-135m"
    dtype: str = "float32"

    def training(self) -> dict:
        d = asdict(self)
        d.pop("evals")
        return d

    def key(self) -> str:
        return _hash(self.training())

    def label(self) -> str:
        extra = {"adapter": f"-{100 * self.size:g}%", "lora": f"-{100 * self.size:g}%"}.get(self.method, "")
        return f"{self.task}/{self.method}{extra}"


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
    dev = read_task(run.task, "dev", data)[: run.dev_examples]
    return train, dev


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


def score_outputs(ev: Eval, groups: list[Example], outputs: list[str], data) -> dict:
    from ..metrics import e2e, rouge, webnlg

    refs = [g.references for g in groups]
    if ev.task == "e2e":  # the paper's scorer variant (tokenised references of the prefix-tuning files)
        return {"A": e2e.score(outputs, refs, variant="prefix-tuning")}
    if ev.task in ("webnlg", "dart"):
        cols = {"A": list(range(len(groups)))}
        if ev.task == "webnlg":
            seen = seen_categories(data)
            cols["S"] = [i for i, g in enumerate(groups) if g.category in seen]
            cols["U"] = [i for i, g in enumerate(groups) if g.category not in seen]
        dataset = "dart" if ev.task == "dart" else "webnlg2017"
        return {c: webnlg.score([outputs[i] for i in idx], [refs[i] for i in idx], max_refs=3, dataset=dataset)
                for c, idx in cols.items() if idx}
    return {"A": rouge.score(outputs, refs)}


# --- one run -------------------------------------------------------------------------------------


def _load(run: Run, threads: int | None):
    from .. import load_base_model

    if threads:
        torch.set_num_threads(threads)
    return load_base_model(run.model, dtype=getattr(torch, run.dtype))


def train(run: Run, out: Path, data, threads: int | None) -> dict:
    from ..methods import MethodConfig
    from ..prefix import PrefixConfig
    from ..train import TrainConfig, Trainer

    start = time.perf_counter()
    model, tokenizer = _load(run, threads)
    train_set, dev = training_pairs(run, data)
    train_set = truncate_sources(train_set, tokenizer, run.max_source_tokens)
    dev = truncate_sources(dev, tokenizer, run.max_source_tokens)
    prefix_config = PrefixConfig(length=run.length, mlp_hidden=run.mlp_hidden, init=run.init, init_text=run.init_text)
    train_config = TrainConfig(max_steps=run.steps, batch_size=run.batch_size, lr=run.lr, warmup_steps=run.warmup_steps,
                               eval_every=run.steps, seed=run.seed)
    method = MethodConfig(run.method, size=run.size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak_rss()
    trainer = Trainer(model, tokenizer, train_set, dev, prefix_config, train_config, out, method=method)
    result = trainer.fit()
    n_model = sum(p.numel() for p in model.parameters())
    n_train, n_stored = trainer.tuner.num_trainable_parameters(), trainer.tuner.num_stored_parameters()
    summary = {
        "method": method.to_json(), "model_parameters": n_model, "trainable_parameters": n_train,
        "trainable_percent": 100 * n_train / n_model, "stored_parameters": n_stored,
        "stored_percent": 100 * n_stored / n_model, "n_train": len(train_set),
        "dev_loss_start": result["history"][0]["dev_loss"], "dev_loss": result["best_dev_loss"],
        "seconds_per_step": result["history"][-1]["seconds_per_step"], "wall_seconds": time.perf_counter() - start,
        # this run's peak resident memory (base model included) where Linux lets us reset the peak;
        # otherwise the process's peak so far (exact only when it exceeds peak_memory_mb_before)
        "peak_memory_mb": _peak_rss_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_mb_before": None if reset else rss_before / 1024,
    }
    del trainer, model
    return summary


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


def evaluate(run: Run, evals: list[Eval], out: Path, data, threads: int | None) -> dict[str, dict]:
    """Decode and score ``evals`` with what run ``out`` trained, on one freshly loaded base model
    (PEFT's own generate, ``decoder="peft"``, gets its own). Returns {eval key: result}."""
    from .. import generate
    from ..data import DECODING
    from ..methods import load_trained, read_run

    method, prefix_config = read_run(out)
    results = {}
    for decoder in ("ours", "peft"):
        todo = [ev for ev in evals if ev.decoder == decoder]
        if not todo:
            continue
        model, tokenizer = _load(run, threads)
        kwargs = load_trained(method, model, out, prefix_config) if decoder == "ours" else None
        for ev in todo:
            groups = truncate_sources(test_groups(ev, data), tokenizer, ev.max_source_tokens)
            decoding = dict(DECODING[ev.task], num_beams=ev.num_beams)
            if ev.max_new_tokens:
                decoding["max_new_tokens"] = ev.max_new_tokens
            sources = [g.source for g in groups]
            start = time.perf_counter()
            if decoder == "peft":
                outputs = peft_generate(model, tokenizer, out, prefix_config, sources, decoding)
            else:
                outputs = generate(model, tokenizer, sources, batch_size=16, progress=True, **kwargs, **decoding)
            seconds = time.perf_counter() - start
            new_tokens = sum(len(tokenizer(o, add_special_tokens=False).input_ids) for o in outputs)
            (out / f"outputs-{ev.name}.txt").write_text("".join(o.replace("\n", " ") + "\n" for o in outputs), encoding="utf-8")
            seen = seen_categories(data) if ev.task == "webnlg" else set()
            results[ev.key()] = {
                "eval": asdict(ev), "n": len(groups), "scores": score_outputs(ev, groups, outputs, data),
                "decode_seconds": seconds, "output_tokens": new_tokens, "decoding": decoding,
                "counts": {"S": sum(g.category in seen for g in groups), "U": sum(g.category not in seen for g in groups)}
                if ev.task == "webnlg" else {}}
        del model
    return results


@torch.no_grad()
def peft_generate(model, tokenizer, run_dir: Path, prefix_config, sources: list[str], decoding: dict) -> list[str]:
    """Decode with PEFT's own ``PeftModel.generate`` and its trained prefix (the peer's decoding path)."""
    from ..baselines.peft_prefix import PeftPrefixModel
    from ..template import collate_prompts, encode, special_ids

    tuner = PeftPrefixModel(model, prefix_config)
    tuner.load_trained(run_dir)
    tuner.eval()
    _, eos, pad = special_ids(tokenizer)
    prompts = [encode(model, tokenizer, s).prompt for s in sources]
    outputs = [""] * len(sources)
    order = sorted(range(len(sources)), key=lambda i: len(prompts[i]))
    for k in range(0, len(order), 16):
        rows = order[k : k + 16]
        batch = collate_prompts(model, [prompts[i] for i in rows], pad)
        out = tuner.peft_model.generate(**batch, do_sample=False, eos_token_id=eos, pad_token_id=pad, **decoding)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(rows, texts):
            outputs[i] = t.strip()
    return outputs


# --- many runs, cached ---------------------------------------------------------------------------


def _locked(lock: Path) -> bool:
    """Another live process holds this run (two experiments may share runs)."""
    try:
        pid = int(lock.read_text())
    except (FileNotFoundError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def run_one(run: Run, runs_dir: Path, data, threads: int | None) -> dict:
    """Train (unless done) and evaluate (each missing evaluation) one run; returns its result."""
    out = runs_dir / run.key()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "lock"
    lock.write_text(str(os.getpid()))
    try:
        path = out / "result.json"
        result = json.loads(path.read_text()) if path.is_file() else {"run": run.training(), "evals": {}}
        if "train" not in result:
            result["train"] = train(run, out, data, threads)
            _write(path, result)
        missing = [ev for ev in run.evals if ev.key() not in result["evals"]]
        if missing:
            result["evals"].update(evaluate(run, missing, out, data, threads))
            _write(path, result)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # only for resuming an unfinished training
        return result
    finally:
        lock.unlink(missing_ok=True)


def _cached(run: Run, runs_dir: Path) -> dict:
    path = runs_dir / run.key() / "result.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if "train" in result and all(ev.key() in result["evals"] for ev in run.evals):
        return result
    return {"run": run.training(), "error": "not run yet (report written from cached runs only)"}


def _write(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def run_all(runs: list[Run], runs_dir: str | Path, data=None, threads: int | None = None,
            cached_only: bool = False) -> list[dict]:
    """Every run (deduplicated), in order; failures recorded as ``{"run", "error"}`` without stopping.
    Runs held by another process are done last (after waiting for it). ``cached_only``: train and
    evaluate nothing; runs without a complete cached result come back as not run."""
    runs_dir = Path(runs_dir)
    unique = list({r.key(): r for r in runs}.values())
    merged = {}
    for r in unique:  # a run asked for by several plans gets the union of their evaluations
        merged.setdefault(r.key(), []).extend(e for e in r.evals if e not in merged.get(r.key(), []))
    todo = [Run(**{**r.training(), "evals": tuple(merged[r.key()])}) for r in unique]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(todo), desc="runs", position=0, dynamic_ncols=True)
    queue = list(todo)
    while queue:
        run = queue.pop(0)
        if cached_only:
            results[run.key()] = _cached(run, runs_dir)
            continue
        if _locked(runs_dir / run.key() / "lock"):
            if all(_locked(runs_dir / r.key() / "lock") for r in queue + [run]):
                time.sleep(30)
            queue.append(run)
            continue
        bar.set_postfix_str(run.label())
        try:
            results[run.key()] = run_one(run, runs_dir, data, threads)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failed run is reported; the others go on
            (runs_dir / run.key()).mkdir(parents=True, exist_ok=True)
            (runs_dir / run.key() / "error.txt").write_text(traceback.format_exc())
            results[run.key()] = {"run": run.training(), "error": f"{type(e).__name__}: {e}"}
            tqdm.write(f"run {run.label()} ({run.key()}) failed: {e}; see {runs_dir / run.key() / 'error.txt'}")
        bar.update(1)
    bar.close()
    return [results[r.key()] for r in runs]
