"""The batching scheduler: one worker thread owns the model and runs every generation.

Requests are split into rows (one per input), queued in arrival order. The worker takes the
oldest waiting row, waits up to ``batch_wait_ms`` for company, and forms a batch of up to
``max_batch_rows`` queued rows whose generation settings are identical:

- ``mixed`` batching: rows of any prefixes (and the base model) share a batch; one
  ``prefixtune.generate(..., prefixes=[per-row prefix], batch_size=len(rows))`` call serves them.
- ``single-prefix`` batching: a batch holds rows of one prefix only (the oldest waiting row's),
  as single-active-adapter serving does.

Sampling requests with a ``seed`` run in a batch of their own (the request's rows only), after
``torch.manual_seed(seed)``, so the same request gives the same outputs. Greedy and beam search
rows give the same results as serving each row alone (``prefixtune.generate``'s guarantee).
Rows asking for logprobs batch only with rows that ask for the same number of alternatives.
Each row's generated tokens go through its TextStream (output.py): stop sequences, finish
reason, text; a streaming request gets each row's text when its batch ends.
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
from .output import Delta, TextStream

log = logging.getLogger("prefixtune.serve")


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


@dataclass
class Row:
    job: Job
    index: int
    prompt: list[int]
    key: tuple
    enqueued: float

    @property
    def stream(self) -> TextStream:
        return self.job.streams[self.index]


class Scheduler:
    def __init__(self, model, tokenizer, metrics, batching: str = "mixed", max_batch_rows: int = 32,
                 batch_wait_ms: float = 50.0, max_queue: int = 256):
        if batching not in ("mixed", "single-prefix"):
            raise ValueError(f"batching must be 'mixed' or 'single-prefix', got {batching!r}")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.eos = special_ids(tokenizer)[1]
        self.batching = batching
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.batch_wait = max(0.0, batch_wait_ms / 1000.0)
        self.max_queue = int(max_queue)
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="prefixtune-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Job:
        """Queue the job's rows; raises QueueFull (nothing queued) or ShuttingDown."""
        job.id = next(self._ids)
        job.streams = [TextStream(self.tokenizer, self.eos, job.settings["max_new_tokens"], job.stop,
                                  job.logprobs is not None) for _ in job.prompts]
        job.remaining = len(job.prompts)
        key = tuple(sorted(job.settings.items())) + (("logprobs", job.logprobs),)
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
        if job0.seed is not None:
            torch.manual_seed(job0.seed)
        return generate(self.model, self.tokenizer, [r.prompt for r in batch], prefixes=[r.job.prefix for r in batch],
                        batch_size=len(batch), return_tokens=True, logprobs=job0.logprobs, **job0.settings)

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

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [r for r in batch if not r.job.cancelled and r.job.error is None]
            if not batch:
                continue
            t0 = time.perf_counter()
            outcomes = self._run_isolated(batch)
            seconds = time.perf_counter() - t0
            tokens = failed = 0
            for r, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    failed += 1
                    r.job.fail(outcome)
                elif r.job.error is None:
                    tokens += len(outcome.tokens)
                    r.job.deliver(r.index, r.stream.add_all(outcome.tokens, outcome.logprobs))
            self.metrics.record_batch(len(batch), len({id(r.job.prefix) for r in batch}), tokens, seconds, failed=failed)
