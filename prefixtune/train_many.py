"""Training many users' prefixes together: one frozen model, batches mixing rows of several prefixes.

A *job* is one user's prefix: its own data, settings (length, learning rate, steps or epochs,
early stopping...), P'/MLP, AdamW state, schedule, checkpoint, log and exported prefix. Each job
is a :class:`prefixtune.train.Trainer` whose run directory is ``OUT/jobs/NAME``; this module only
replaces ``Trainer.fit``'s loop. Every *round* takes the next optimizer step of as many jobs as
fit in ``rows_per_round`` rows (jobs take turns), runs all their rows as one forward with each
row's own prefix (:func:`prefixtune.batch.stack_prefixes`), and gives each job the loss of its
own rows over its own step's normaliser (target tokens, or rows for ``sequence_sum``). One
backward, then each job's clipping, AdamW step, schedule, evaluation, checkpoint and early stopping,
exactly as ``Trainer.fit`` does them.

Isolation: a job's loss depends on its own rows only (a row attends to its own prefix; padding and
other rows' prefix slots are masked), so its gradient is the one it would get trained alone, and
it ends with the prefix it would get alone with the same seed and row order, up to the float
rounding of differently shaped batches (tested); other jobs' data, or their presence, change
nothing. Random draws are the exception: with dropout in the base model (GPT-2, BART, T5 default
to 0.1) or on the prefix, the draws depend on the batch, so a job is equivalent in distribution
only. The Llama family (SmolLM2 included) has no dropout.

Resume: every job resumes from its own checkpoint (rerun the same command); Ctrl-C finishes the
round, then saves every job that has steps since its last checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from tqdm.auto import tqdm

from . import attach
from .data import Example
from .data.jsonl import read as read_pairs
from .batch import stack_prefixes
from .config import PrefixConfig
from .loss import lm_forward
from .methods import MethodConfig, check_used
from .template import collate_train, special_ids
from .train import TrainConfig, Trainer, StopAtStepEnd, autocast_context, frozen_casts

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
PREFIX_FIELDS = {f.name for f in fields(PrefixConfig)} - {"placements", "gradient_checkpointing"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"grad_accum", "dev_batch_size", "autocast", "compile"}


@dataclass
class Job:
    name: str
    train: list[Example]
    dev: list[Example] | None
    prefix: PrefixConfig
    train_config: TrainConfig


def read_jobs(path: str | Path, prefix: PrefixConfig, train: TrainConfig) -> list[Job]:
    """Jobs from a JSONL file, one per line: ``{"name", "train", "dev"?, ...settings}``. ``train``/``dev``
    are JSONL files of ``{"source", "target"}`` rows (relative to the jobs file); any other key sets
    one of the job's PrefixConfig / TrainConfig fields over the defaults ``prefix`` and ``train``
    (e.g. ``"length": 20, "lr": 1e-3, "max_steps": 300, "seed": 1``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file not found: {path}")
    jobs, names = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(spec).__name__}")
        name = spec.pop("name", None)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"{where}: expected \"name\" of 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"{where}: job name {name!r} is used twice")
        names.add(name)
        train_file = spec.pop("train", None)
        if not isinstance(train_file, str):
            raise ValueError(f"{where}: expected \"train\": the path of the job's training JSONL")
        dev_file = spec.pop("dev", None)
        unknown = set(spec) - PREFIX_FIELDS - TRAIN_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; a job may set name, train, dev and "
                             f"{sorted(PREFIX_FIELDS | TRAIN_FIELDS)}")
        for key, value in spec.items():
            default = getattr(prefix if key in PREFIX_FIELDS else train, key)
            kinds = (bool,) if isinstance(default, bool) else (int, float) if isinstance(default, float) else \
                (int,) if isinstance(default, int) else (str,) if isinstance(default, str) else (int, float, str)
            if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                raise ValueError(f"{where}: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        try:
            job_prefix = replace(prefix, **{k: v for k, v in spec.items() if k in PREFIX_FIELDS})
            job_train = replace(train, **{k: v for k, v in spec.items() if k in TRAIN_FIELDS})
            check_used(MethodConfig(), job_prefix)
            if spec.get("patience") and not dev_file:  # (the command line's --patience is for the jobs with one)
                raise ValueError("'patience' stops on the dev loss: give the job a \"dev\" file")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
        base = path.parent
        try:
            pairs = read_pairs(base / train_file), read_pairs(base / dev_file) if dev_file else None
        except (ValueError, FileNotFoundError) as e:  # name the job's line too: its files are relative to it
            raise ValueError(f"{where} (job {name!r}): {e}") from None
        jobs.append(Job(name, *pairs, job_prefix, job_train))
    if not jobs:
        raise ValueError(f"{path}: no jobs")
    return jobs


class ManyTrainer:
    """Trains ``jobs`` together on one frozen ``model`` (see the module doc). ``fit`` runs them all
    to their end; the server's training worker instead calls :meth:`add`, :meth:`round` and
    :meth:`remove` as jobs come and go (prefixtune/serve/training.py)."""

    def __init__(self, model, tokenizer, jobs: list[Job], out_dir: str | Path, rows_per_round: int = 32,
                 autocast: bool = False, progress: bool = True):
        if attach.is_seq2seq(model):
            raise ValueError("train-many trains decoder-only models (the per-row loss split is decoder-only)")
        if rows_per_round < 1:
            raise ValueError(f"rows_per_round must be >= 1, got {rows_per_round}")
        self.model, self.tokenizer, self.out = model, tokenizer, Path(out_dir)
        self.rows_per_round, self.progress, self.autocast = rows_per_round, progress, autocast
        self.trainers: dict[str, Trainer] = {}
        self.head_dims = attach.prefix_shapes(model).head_dims
        self.pad, self.device = special_ids(tokenizer)[2], next(model.parameters()).device
        self._turn = 0
        # the frozen base's kept copies, one set for all jobs (each Trainer would make its own)
        self.casts = frozen_casts(self.device.type)
        for job in jobs:
            self.trainers[job.name] = self.trainer(job, self.out / "jobs" / job.name)

    def trainer(self, job: Job, run_dir: str | Path) -> Trainer:
        """The job's Trainer on this model (not started, not added)."""
        try:
            t = Trainer(self.model, self.tokenizer, job.train, job.dev, job.prefix,
                        replace(job.train_config, autocast=self.autocast), run_dir, progress=False)
        except ValueError as e:
            raise ValueError(f"job {job.name!r}: {e}") from e
        if t.world > 1:
            raise ValueError("train-many runs in one process (each job's gradient is its own: nothing to all-reduce)")
        t.casts = self.casts
        return t

    def add(self, name: str, trainer: Trainer) -> None:
        """Start ``trainer`` (resuming from its checkpoint) and train it from the next round on."""
        trainer.start()
        self.trainers[name] = trainer

    def remove(self, name: str) -> Trainer:
        return self.trainers.pop(name)

    def active(self) -> list[str]:
        return [name for name, t in self.trainers.items() if not t.finished()]

    def round(self, active: list[str] | None = None) -> list[str]:
        """The next optimizer step of as many ``active`` jobs (default: all unfinished) as fit in
        ``rows_per_round`` rows, as one forward and backward; returns the jobs that stepped."""
        active = self.active() if active is None else active
        if not active:
            return []
        chosen = self._choose(active)
        start, cpu = time.perf_counter(), time.process_time()
        losses, rows = self._round(chosen)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        for name, loss in zip(chosen, losses):
            t = self.trainers[name]
            t.apply_step()
            t.optimizer.zero_grad(set_to_none=True)  # K jobs' gradients need not outlive their step
            share = rows[name] / sum(rows.values())  # a job's share of the round's time: its rows'
            t.record_step(loss, seconds * share, cpu_seconds=cpu * share)
        return chosen

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        for t in self.trainers.values():
            t.start()
        active = self.active()
        total = sum(t.total_steps for t in self.trainers.values())
        bar = tqdm(total=total, initial=sum(t.step for t in self.trainers.values()), desc="train-many",
                   disable=not self.progress, dynamic_ncols=True)
        with StopAtStepEnd() as stop:
            while active:
                chosen = self.round(active)
                bar.update(len(chosen))
                bar.set_postfix(jobs=len(active))
                active = self.active()
                if stop.requested:
                    for t in self.trainers.values():
                        if t.pending["losses"]:  # steps since its last checkpoint
                            t.save_checkpoint(gather=False)
                    bar.close()
                    print(f"\ninterrupted; every job saved; run the same command again to resume ({self.out})")
                    raise KeyboardInterrupt
        bar.close()
        results = {name: {k: v for k, v in t.result().items() if k != "history"} for name, t in self.trainers.items()}
        (self.out / "train-many.json").write_text(json.dumps(
            {"jobs": {name: {"run_dir": str(t.out), "n_train": len(t.train_set), "n_dev": len(t.dev_set),
                             "prefix": asdict(t.tuner.config), **results[name]} for name, t in self.trainers.items()},
             "rows_per_round": self.rows_per_round, "autocast": self.autocast}, indent=1))
        return results

    def _choose(self, active: list[str]) -> list[str]:
        """The next jobs in turn, as many as fit in rows_per_round (at least one)."""
        order = sorted(active, key=lambda n: (list(self.trainers).index(n) - self._turn) % len(self.trainers))
        chosen, rows = [], 0
        for name in order:
            n = sum(len(r) for r in self.trainers[name].step_rows())
            if chosen and rows + n > self.rows_per_round:
                break
            chosen.append(name)
            rows += n
        self._turn = (list(self.trainers).index(chosen[-1]) + 1) % len(self.trainers)
        return chosen

    def _round(self, chosen: list[str]) -> tuple[list[float], dict[str, int]]:
        """One forward and backward for the next step of every chosen job; their gradients are set."""
        parts = []
        for name in chosen:
            t = self.trainers[name]
            t.tuner.train()
            t.optimizer.zero_grad(set_to_none=True)
            parts.append((t, sum(t.step_rows(), [])))
        examples = [t.train_set[i] for t, rows in parts for i in rows]
        batch = {k: v.to(self.device) for k, v in collate_train(self.model, examples, self.pad).items()}
        with autocast_context(self.autocast, self.device.type, self.casts):
            prefix_batch = stack_prefixes([(t.tuner.prefix_kv(), len(rows)) for t, rows in parts], self.head_dims)
            out = lm_forward(self.model, "token_mean", return_logits=False, prefix_batch=prefix_batch, **batch)
        losses, total, offset = [], 0.0, 0
        for t, rows in parts:
            loss = out.nll_rows[offset : offset + len(rows)].sum() / t.loss_normaliser(rows)
            offset += len(rows)
            total = total + loss
            losses.append(float(loss.detach()))
        total.backward()
        return losses, {name: len(rows) for name, (_, rows) in zip(chosen, parts)}
