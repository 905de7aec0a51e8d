"""The scheduler: one worker thread owns the model and runs every generation.

Requests are split into rows (one per input and choice), queued in arrival order. Batching:

- ``continuous`` (the default): iteration-level batching by the engine (engine.py). Rows join
  the running batch as soon as there is room (after their prompt pass) and leave as soon as they
  finish, at every decoding step, whatever their prefixes and settings; their tokens stream out
  as they are made. Beam search rows, and rows whose settings the engine cannot apply exactly,
  run through the batch path below (``mixed``), between decoding steps; a model the engine
  cannot serve (encoder-decoder, sliding-window attention, or failing its start-up self-check)
  is served with ``mixed`` batching throughout.
- ``mixed``: dynamic batching. The worker takes the oldest waiting row, waits up to
  ``batch_wait_ms`` for company, and runs up to ``max_batch_rows`` queued rows whose generation
  settings agree (``max_new_tokens`` may differ, except for beam search), of any prefixes, in one
  ``prefixtune.generate`` call, to the end of the longest row; then the next batch.
- ``single-prefix``: as ``mixed``, but a batch holds rows of one prefix only (the oldest waiting
  row's), as single-active-adapter serving does.

Greedy rows give the same tokens as generating each row alone, in every mode. Sampling rows
with a seed are reproducible: in ``continuous`` each row draws from its own generator (seed + the
row's index in the request), so its tokens do not depend on what runs beside it; in the batch
modes the request runs in a batch of its own after ``torch.manual_seed(seed)``. A row that fails
fails only its own request (the engine and the batch path both retry or isolate failing rows).
Each row's tokens go through its TextStream (output.py): stop sequences, finish reason, text.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import generate
from ..prefix import Prefix
from ..template import special_ids
from .engine import Engine, Seq
from .output import Delta, TextStream

log = logging.getLogger("prefixtune.serve")


# One process-wide lock for torch's global random generator: seeded sampling under mixed batching
# seeds it and draws from it, and so does a Trainer of the training worker (prefixtune/serve/training.py).
GLOBAL_RNG = threading.Lock()


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One accepted request: its rows (encoded prompts) and a shared prefix object (held, so deleting
    the prefix later is harmless). Each row's output grows in ``streams[i]`` (a TextStream); every
    change is also passed to ``on_delta(i, delta)`` (for streaming), from the worker thread."""

    tenant: str
    prefix_name: str | None
    prefix: Prefix | None
    prompts: list[list[int]]
    settings: dict  # max_new_tokens, num_beams, do_sample[, temperature, top_p]
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's logprob and the top k
    ignore_eos: bool = False  # EOS does not end a row (it is counted, and generation goes on)
    on_delta: Callable[[int, Delta], None] | None = None
    deadline: float = 0.0  # when the request must be answered (the app's event-loop clock)
    id: int = 0
    streams: list[TextStream] = field(default_factory=list)
    remaining: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: list = field(default_factory=list)

    def deliver(self, index: int, delta: Delta) -> None:
        if self.on_delta is not None and (delta.text or delta.logprobs or delta.finish_reason):
            self.on_delta(index, delta)
        if delta.finish_reason is not None:
            self.remaining -= 1
            if self.remaining == 0 and self.error is None:
                self.finish()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.done.is_set():
            self.error = error
            self.finish()

    def finish(self) -> None:
        self.done.set()
        for cb in self.callbacks:
            try:
                cb(self)
            except Exception:
                log.debug("completion callback failed", exc_info=True)


@dataclass(eq=False)
class Row:
    job: Job
    index: int
    prompt: list[int]
    key: tuple
    enqueued: float
    path: str | None = None  # "engine" or "batch", once decided (continuous batching)
    seq: Seq | None = None  # its engine row

    @property
    def stream(self) -> TextStream:
        return self.job.streams[self.index]


BATCHING = ("continuous", "mixed", "single-prefix")


class Scheduler:
    def __init__(self, model, tokenizer, metrics, batching: str = "continuous", max_batch_rows: int = 32,
                 batch_wait_ms: float = 50.0, max_queue: int = 256, prefill_chunk: int = 256):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.eos = special_ids(tokenizer)[1]
        self.batching = batching
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.batch_wait = max(0.0, batch_wait_ms / 1000.0)
        self.max_queue = int(max_queue)
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._serving = False  # a batch of mixed/single-prefix batching is running
        self._ids = itertools.count(1)
        self.engine = None
        if batching == "continuous":
            try:
                self.engine = Engine(model, self.eos, self.max_batch_rows, prefill_chunk)
                self._check_engine()
            except ValueError as e:
                log.warning("continuous batching is not available for this model (%s); using mixed batching", e)
                self.engine, self.batching = None, "mixed"
        run = self._run_continuous if self.engine is not None else self._run
        self._thread = threading.Thread(target=run, name="prefixtune-scheduler", daemon=True)

    def _check_engine(self) -> None:
        """Before serving: the engine must give exactly what ``generate`` gives alone (two rows of
        different lengths, one with a random prefix). Guards architectures nobody tested."""
        from ..config import PrefixConfig
        from ..tuner import PrefixTuner

        torch.manual_seed(0)
        prefix = PrefixTuner(self.model, PrefixConfig(length=3, reparameterize=False)).export()
        for t in prefix.kv.values():
            t.mul_(3.0)  # strong enough to change what is generated
        ids = self.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).input_ids
        rows = [(ids[:7], prefix), (ids[:3], None)]
        want = [generate(self.model, self.tokenizer, [p], prefixes=[pre], max_new_tokens=5, return_tokens=True)[0].tokens
                for p, pre in rows]
        seqs = [Seq(p, pre, 5) for p, pre in rows]
        got = {id(s): [] for s in seqs}
        for s in seqs:
            self.engine.add(s)
        while self.engine.busy():
            for seq, token, _ in self.engine.step():
                if isinstance(token, BaseException):
                    raise ValueError(f"self-check failed: {type(token).__name__}: {token}")
                got[id(seq)].append(token)
                if token == self.eos or len(got[id(seq)]) == seq.max_new_tokens:
                    self.engine.finish(seq)
        if [got[id(s)] for s in seqs] != [w for w in want]:
            raise ValueError(f"self-check: continuous batching gave {[got[id(s)] for s in seqs]} where generate "
                             f"gives {want}")

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Job:
        """Queue the job's rows; raises QueueFull (nothing queued) or ShuttingDown."""
        job.id = next(self._ids)
        job.streams = [TextStream(self.tokenizer, None if job.ignore_eos else self.eos, job.settings["max_new_tokens"],
                                  job.stop, job.logprobs is not None) for _ in job.prompts]
        job.remaining = len(job.prompts)
        # the batch path batches rows whose settings agree; a row's length does not change its tokens
        # (it stops at its own max_new_tokens), except in beam search
        settings = dict(job.settings)
        if settings.get("num_beams", 1) == 1:
            settings.pop("max_new_tokens")
        key = tuple(sorted(settings.items())) + (("logprobs", job.logprobs), ("ignore_eos", job.ignore_eos))
        if job.seed is not None:  # reproducible sampling: a batch of its own
            key = key + (("job", job.id),)
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._queue) + len(job.prompts) > self.max_queue:
                raise QueueFull()
            for i, prompt in enumerate(job.prompts):
                self._queue.append(Row(job, i, prompt, key, now))
            self.metrics.queue_depth = len(self._queue)
            self._cond.notify()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; the worker drains every queued row, then exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker ----------------------------------------------------------------------------------
    def _take_batch(self) -> list[Row] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            if len(self._queue) < self.max_batch_rows and self.batch_wait > 0 and not self._stopping:
                deadline = time.monotonic() + self.batch_wait
                while len(self._queue) < self.max_batch_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            first = self._queue[0]
            single = self.batching == "single-prefix"
            batch, keep = [], deque()
            for row in self._queue:
                if (len(batch) < self.max_batch_rows and row.key == first.key
                        and (not single or row.job.prefix is first.job.prefix)):
                    batch.append(row)
                else:
                    keep.append(row)
            self._queue = keep
            self.metrics.queue_depth = len(self._queue)
            return batch

    def _generate(self, batch: list[Row]) -> list:
        job0 = batch[0].job
        settings = dict(job0.settings, max_new_tokens=max(r.job.settings["max_new_tokens"] for r in batch))
        if job0.ignore_eos:
            settings["eos_token_id"] = -1  # no token stops generate
        run = lambda: generate(self.model, self.tokenizer, [r.prompt for r in batch],  # noqa: E731
                               prefixes=[r.job.prefix for r in batch], batch_size=len(batch), return_tokens=True,
                               logprobs=job0.logprobs, **settings)
        if job0.seed is None:
            return run()
        with GLOBAL_RNG:  # the training worker must not draw from the generator between seeding and sampling
            torch.manual_seed(job0.seed)
            return run()

    def busy(self) -> bool:
        """Whether requests are waiting or being decoded (the training worker then yields its share)."""
        return bool(self._queue) or self._serving or (self.engine is not None and self.engine.busy())

    def _run_isolated(self, batch: list[Row]) -> list:
        """One result per row: its Generation, or the exception of a row that fails.

        One bad row must not fail the others (they may be other tenants'): a batch that raises is
        run again row by row, and only the rows that still raise alone fail."""
        try:
            return self._generate(batch)
        except Exception as e:
            if len(batch) == 1:
                log.error("row of request %d failed", batch[0].job.id, exc_info=e)
                return [e]
            log.warning("batch of %d rows failed (%s: %s); running its rows one by one", len(batch),
                        type(e).__name__, e)
        return [self._run_isolated([r])[0] for r in batch]

    def _serve_batch(self, batch: list[Row]) -> None:
        batch = [r for r in batch if not r.job.cancelled and r.job.error is None]
        if not batch:
            return
        t0 = time.perf_counter()
        self._serving = True
        try:
            outcomes = self._run_isolated(batch)
        finally:
            self._serving = False
        seconds = time.perf_counter() - t0
        tokens = failed = 0
        for r, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                failed += 1
                r.job.fail(outcome)
            elif r.job.error is None:
                r.job.deliver(r.index, r.stream.add_all(outcome.tokens, outcome.logprobs))
                tokens += len(r.stream.tokens)  # the row's own: the batch may have run longer
        self.metrics.record_batch(len(batch), len({id(r.job.prefix) for r in batch}), tokens, seconds)
        self.metrics.record_failed(failed)

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._serve_batch(batch)

    # -- continuous batching ---------------------------------------------------------------------
    def _engine_seq(self, row: Row) -> Seq | None:
        """The row as an engine row, or None if the engine cannot serve it exactly (beam search,
        or processors of the model's generation config it does not apply)."""
        if row.path is None:
            s, job = row.job.settings, row.job
            seed = None if job.seed is None else (job.seed + row.index) % 2**63
            row.seq = Seq(row.prompt, job.prefix, s["max_new_tokens"], s["do_sample"], s.get("temperature", 1.0),
                          s.get("top_p", 1.0), seed, job.logprobs, s.get("min_new_tokens", 0), tag=row)
            row.path = "engine" if s.get("num_beams", 1) == 1 and self.engine.supports(row.seq) else "batch"
        return row.seq if row.path == "engine" else None

    def _take_continuous(self) -> tuple[list[Row], list[Row]] | None:
        """Rows to add to the engine (as many as it has room for, in order), and a batch for the
        batch path (rows it cannot serve, of the oldest such row's settings); None when stopped."""
        engine = self.engine
        with self._cond:
            while not self._queue and not engine.busy():
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            admit, batch, keep = [], [], deque()
            room = engine.free()
            for row in self._queue:
                if row.job.cancelled or row.job.error is not None:
                    continue
                seq = self._engine_seq(row)
                if seq is not None and len(admit) < room:
                    admit.append(row)
                elif seq is None and len(batch) < self.max_batch_rows and (not batch or row.key == batch[0].key):
                    batch.append(row)
                else:
                    keep.append(row)
            self._queue = keep
            self.metrics.queue_depth = len(keep)
            return admit, batch

    def _run_continuous(self) -> None:
        engine = self.engine
        while True:
            taken = self._take_continuous()
            if taken is None:
                return
            admit, batch = taken
            for row in admit:
                engine.add(row.seq)
            if batch:  # beam search and the like: the running rows wait for this batch
                self._serve_batch(batch)
            if not engine.busy():
                continue
            running = list(engine.rows)
            t0 = time.perf_counter()
            events = engine.step()
            seconds = time.perf_counter() - t0
            tokens = failed = 0
            for seq, token, logprob in events:
                row = seq.tag
                if isinstance(token, BaseException):
                    failed += 1
                    row.job.fail(token)
                    engine.finish(seq)
                    continue
                tokens += 1
                if row.job.error is None and not row.job.cancelled:
                    delta = row.stream.add(token, logprob)
                    row.job.deliver(row.index, delta)
                    if delta.finish_reason is None:
                        continue
                engine.finish(seq)
            for seq in engine.rows + list(engine.waiting):  # rows of failed or abandoned requests leave
                if seq.tag.job.cancelled or seq.tag.job.error is not None:
                    engine.finish(seq)
            if running:
                self.metrics.record_batch(len(running), len({id(s.prefix) for s in running}), tokens, seconds)
            self.metrics.record_failed(failed)
