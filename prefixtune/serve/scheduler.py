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
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..generate import generate
from ..prefix import Prefix

log = logging.getLogger("prefixtune.serve")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One accepted request: its rows, a shared prefix object (held, so deleting it later is harmless)."""

    tenant: str
    prefix_name: str | None
    prefix: Prefix | None
    sources: list[str]
    settings: dict
    seed: int | None = None
    id: int = 0
    results: list = field(default_factory=list)
    remaining: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: list = field(default_factory=list)

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
    source: str
    key: tuple
    enqueued: float


class Scheduler:
    def __init__(self, model, tokenizer, metrics, batching: str = "mixed", max_batch_rows: int = 32,
                 batch_wait_ms: float = 50.0, max_queue: int = 256):
        if batching not in ("mixed", "single-prefix"):
            raise ValueError(f"batching must be 'mixed' or 'single-prefix', got {batching!r}")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
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
        job.results = [None] * len(job.sources)
        job.remaining = len(job.sources)
        key = tuple(sorted(job.settings.items()))
        if job.seed is not None:  # reproducible sampling: a batch of its own
            key = key + (("job", job.id),)
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._queue) + len(job.sources) > self.max_queue:
                raise QueueFull()
            for i, s in enumerate(job.sources):
                self._queue.append(Row(job, i, s, key, now))
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

    def _generate(self, batch: list[Row]) -> list[tuple[str, int]]:
        job0 = batch[0].job
        if job0.seed is not None:
            torch.manual_seed(job0.seed)
        texts = generate(self.model, self.tokenizer, [r.source for r in batch],
                         prefixes=[r.job.prefix for r in batch], batch_size=len(batch), **job0.settings)
        return [(t, len(self.tokenizer(t, add_special_tokens=False).input_ids)) for t in texts]

    def _run_isolated(self, batch: list[Row]) -> list:
        """Results of the batch, one per row: (text, tokens), or the exception of a row that fails.

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
            done = [(r, o) for r, o in zip(batch, outcomes) if not isinstance(o, BaseException)]
            self.metrics.record_batch(len(batch), len({id(r.job.prefix) for r in batch}), sum(o[1] for _, o in done),
                                      seconds, failed=len(batch) - len(done))
            for r, outcome in zip(batch, outcomes):
                job = r.job
                if job.error is not None:
                    continue
                if isinstance(outcome, BaseException):
                    job.error = outcome
                    job.finish()
                    continue
                job.results[r.index] = outcome
                job.remaining -= 1
                if job.remaining == 0:
                    job.finish()
