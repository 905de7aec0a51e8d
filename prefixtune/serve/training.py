"""Training prefixes through the server: tenants' jobs, kept next to their prefixes, trained
together in shared mixed-prefix batches (prefixtune/train_many.py) by one worker thread.

Layout, per job: ``<registry>/<tenant-dir>/jobs/<job id>/``
  job.json                 the job's record (state, settings, progress), rewritten atomically
  train.jsonl, dev.jsonl   the tenant's examples; deleted when the job ends, unless keep_data
  run/                     the job's Trainer run directory (checkpoint, log, best prefix); removed
                           when the job ends
  lock                     flock-ed by the process training the job; the OS releases it when that
                           process dies (kill -9 included)
  cancel                   written by DELETE; whoever trains the job stops it at its next round

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``. A job directory is
written in full under a temporary name, then renamed, so a crash never leaves half a job.

Like the registry, the directory is the only source of truth, so replicas share it: any replica
answers for any job (it reads job.json), and every replica's worker claims queued jobs, and
running jobs whose trainer died, by taking their lock. A claimed job resumes from its
checkpoint (exactly: see Trainer), so a restart or a dead replica costs at most the steps since
the job's last evaluation. (flock works on local disks and on NFSv4; on other shared file
systems run the training worker on one replica only: ``--no-train`` on the others.)

Sharing the model with serving: the worker trains on its own module tree that shares the frozen
weights with the served model (no second copy of the weights; its own train/eval switches,
gradient-checkpointing flags and hooks), in its own thread. While the scheduler has work, the
worker sleeps after each round long enough to take at most ``share`` of the time
(``--train-share``); when nothing is served it trains flat out.
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..data import Example
from ..data.jsonl import read as read_pairs
from ..files import write_atomic
from ..config import PrefixConfig
from ..train import TrainConfig
from ..train_many import Job, ManyTrainer
from .registry import InvalidPrefix, tenant_dir_name
from .scheduler import GLOBAL_RNG  # a Trainer seeds and draws from torch's global generator

log = logging.getLogger("prefixtune.serve")

ACTIVE, DONE = ("queued", "running"), ("succeeded", "failed", "cancelled")


class JobNotFound(KeyError):
    pass


class TooManyJobs(Exception):
    pass


@dataclass
class TrainLimits:
    """What one tenant may ask of the training worker (``prefixtune serve --max-train-*``)."""

    jobs_per_tenant: int = 2  # queued + running at once
    examples: int = 5000  # train + dev examples of one job
    steps: int = 2000  # optimizer steps of one job
    prefix_length: int = 64
    share: float = 0.5  # of the worker's time while requests are being served
    rows_per_round: int = 32  # rows of all jobs in one training forward

    def __post_init__(self):
        if not 0 < self.share <= 1:
            raise ValueError(f"the training share must be in (0, 1], got {self.share} (--train-share)")


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"source": e.source, "target": e.target}, ensure_ascii=False) + "\n")


def shares_weights_copy(model):
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Jobs:
    """The jobs of every tenant under a registry root, and the worker thread that trains them."""

    def __init__(self, root: str | Path, registry, model, tokenizer, limits: TrainLimits, busy=lambda: False,
                 poll_s: float = 2.0):
        self.root, self.registry, self.limits, self.busy = Path(root), registry, limits, busy
        self.model, self.tokenizer, self.poll_s = model, tokenizer, poll_s
        self._create_lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefixtune-training", daemon=True)
        self._many: ManyTrainer | None = None
        self._mine: dict[str, dict] = {}  # job id -> {"dir", "lock" (open file), "rate", ...} of jobs trained here
        self._ended: set[str] = set()  # jobs seen ended: an ended job never runs again, so _claim skips its record
        self.error: BaseException | None = None  # a worker fault (logged); jobs stay on disk for a restart

    # -- records ---------------------------------------------------------------------------------
    def _tenant_jobs(self, tenant: str) -> Path:
        return self.root / tenant_dir_name(tenant) / "jobs"

    def _dir(self, tenant: str, job_id: str) -> Path:
        d = self._tenant_jobs(tenant) / job_id
        if not job_id.startswith("job-") or not (d / "job.json").is_file():
            raise JobNotFound(job_id)
        return d

    @staticmethod
    def _read(d: Path) -> dict:
        return json.loads((d / "job.json").read_text())

    def get(self, tenant: str, job_id: str) -> dict:
        try:
            return self._read(self._dir(tenant, job_id))
        except FileNotFoundError:  # removed meanwhile
            raise JobNotFound(job_id) from None

    def list(self, tenant: str) -> list[dict]:
        out = []
        for d in sorted(self._tenant_jobs(tenant).glob("job-*")):
            try:
                out.append(self._read(d))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return sorted(out, key=lambda r: r["created"])

    def create(self, tenant: str, name: str, train: list[Example], dev: list[Example], prefix: PrefixConfig,
               config: TrainConfig, keep_data: bool, total_steps: int) -> dict:
        """Write a queued job (all of it, then renamed into place) and wake the worker."""
        jobs = self._tenant_jobs(tenant)
        with self._create_lock:  # (replicas may race past this count by one job each: a soft limit)
            active = [r for r in self.list(tenant) if r["state"] in ACTIVE]
            if len(active) >= self.limits.jobs_per_tenant:
                raise TooManyJobs(f"{len(active)} training job(s) queued or running; the limit is "
                                  f"{self.limits.jobs_per_tenant} per tenant (--max-train-jobs)")
            job_id = "job-" + uuid.uuid4().hex[:20]
            tmp = jobs / f".{job_id}.tmp"
            tmp.mkdir(parents=True)
            _write_jsonl(tmp / "train.jsonl", train)
            if dev:
                _write_jsonl(tmp / "dev.jsonl", dev)
            record = {"id": job_id, "object": "training_job", "tenant": tenant, "prefix": name, "state": "queued", "created": time.time(),
                      "started": None, "finished": None, "step": 0, "total_steps": total_steps, "train_loss": None,
                      "dev_loss": None, "best_dev_loss": None, "best_step": None, "eta_s": None, "error": None,
                      "n_train": len(train), "n_dev": len(dev), "keep_data": keep_data,
                      "settings": {"prefix": prefix.to_json(), "train": asdict(config)}}
            _write_json(tmp / "job.json", record)
            os.replace(tmp, jobs / job_id)
        self._wake.set()
        return record

    def cancel(self, tenant: str, job_id: str) -> dict:
        """Cancel a queued or running job (it ends as ``cancelled``), or delete an ended job's record."""
        d = self._dir(tenant, job_id)
        record = self._read(d)
        if record["state"] in DONE:
            shutil.rmtree(d, ignore_errors=True)
            return {**record, "deleted": True}
        (d / "cancel").touch()
        lock = _try_lock(d)
        if lock is not None:  # nobody trains it: cancel it here
            try:
                record = self._end(d, self._read(d), "cancelled")
            finally:
                lock.close()
        self._wake.set()
        return record

    def _update(self, d: Path, **changes) -> dict:
        record = {**self._read(d), **changes}
        _write_json(d / "job.json", record)
        return record

    def _end(self, d: Path, record: dict, state: str, error: str | None = None, **changes) -> dict:
        """Record the job's end; its data goes (unless keep_data), and so does its run directory."""
        if not record["keep_data"]:
            for f in ("train.jsonl", "dev.jsonl"):
                (d / f).unlink(missing_ok=True)
        shutil.rmtree(d / "run", ignore_errors=True)
        return self._update(d, state=state, error=error, finished=time.time(), eta_s=None, **changes)

    # -- the worker ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current round; jobs with steps since their last checkpoint save one."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def running_here(self) -> int:
        return len(self._mine)

    def _run(self) -> None:
        last_scan = -math.inf
        try:
            while not self._stop.is_set():
                if self._wake.is_set() or time.monotonic() - last_scan > self.poll_s:
                    self._wake.clear()
                    last_scan = time.monotonic()
                    self._claim()
                    self._check_cancelled()
                if not self._mine:
                    self._wake.wait(self.poll_s)
                    continue
                start = time.perf_counter()
                stepped = self._round()
                if self.busy() and self.limits.share < 1:  # leave serving its share of the time
                    self._stop.wait((time.perf_counter() - start) * (1 - self.limits.share) / self.limits.share)
                self._progress(stepped, time.perf_counter() - start)
        except BaseException as e:  # a fault of the worker itself: log it; the jobs resume at the next start
            self.error = e
            log.error("training worker stopped", exc_info=e)
        finally:
            for job_id in list(self._mine):
                self._release(job_id, save=True)

    def _claim(self) -> None:
        """Take queued jobs, and running jobs whose trainer died, oldest first, whose lock is free."""
        candidates = []
        for f in self.root.glob("t-*/jobs/job-*/job.json"):
            if f.parent.name in self._mine or f.parent.name in self._ended:
                continue
            try:
                record = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record.get("state") in ACTIVE:
                candidates.append((record["created"], f.parent))
            elif record.get("state") in DONE:
                self._ended.add(f.parent.name)
        for _, d in sorted(candidates):
            lock = _try_lock(d)
            if lock is None:
                continue
            try:
                record = self._read(d)  # again, under the lock
            except FileNotFoundError:
                lock.close()
                continue
            if record["state"] not in ACTIVE:
                lock.close()
                continue
            if (d / "cancel").exists():
                self._end(d, record, "cancelled")
                lock.close()
                continue
            self._mine[d.name] = {"dir": d, "lock": lock, "steps": 0, "seconds": 0.0}
            try:
                self._start(d, record)
            except Exception as e:  # settings or data this model cannot train on
                log.warning("training job %s failed to start: %s", d.name, e)
                self._release(d.name, state="failed", error=f"{type(e).__name__}: {e}")

    def _start(self, d: Path, record: dict) -> None:
        if self._many is None:
            self._many = ManyTrainer(shares_weights_copy(self.model), copy.deepcopy(self.tokenizer), [], self.root,
                                     rows_per_round=self.limits.rows_per_round, progress=False)
        s = record["settings"]
        prefix = PrefixConfig(**s["prefix"])
        config = replace(TrainConfig(), **s["train"])
        dev = read_pairs(d / "dev.jsonl") if (d / "dev.jsonl").exists() else None
        job = Job(record["prefix"], read_pairs(d / "train.jsonl"), dev, prefix, config)
        with GLOBAL_RNG:
            trainer = self._many.trainer(job, d / "run")
            self._many.add(d.name, trainer)  # resumes from run/checkpoint if there is one
        resumed = trainer.step
        self._update(d, state="running", started=record["started"] or time.time(), step=resumed,
                     total_steps=trainer.total_steps)
        log.info("training job %s (%s) %s at step %d of %d", d.name, record["prefix"],
                 "resumed" if resumed else "started", resumed, trainer.total_steps)

    def _check_cancelled(self) -> None:
        for job_id, mine in list(self._mine.items()):
            if (mine["dir"] / "cancel").exists():
                self._release(job_id, state="cancelled")

    def _round(self) -> list[str]:
        """One training round of the jobs trained here; returns the jobs that took a step."""
        many = self._many
        active = [j for j in self._mine if j in many.trainers]
        try:
            with GLOBAL_RNG:
                stepped = many.round(active)
        except Exception as e:  # find the job(s) that fail alone; the others keep their step
            log.warning("a training round of %d jobs failed (%s: %s); stepping them one by one", len(active),
                        type(e).__name__, e)
            stepped = []
            for job_id in active:
                try:
                    with GLOBAL_RNG:
                        stepped += many.round([job_id])
                except Exception as e1:
                    log.error("training job %s failed", job_id, exc_info=e1)
                    self._release(job_id, state="failed", error=f"{type(e1).__name__}: {e1}")
        return stepped

    def _progress(self, stepped: list[str], seconds: float) -> None:
        """Record the round's steps (``seconds``: the round's wall time, pause included) in job.json."""
        for job_id in stepped:
            mine, t = self._mine[job_id], self._many.trainers[job_id]
            mine["steps"] += 1
            mine["seconds"] += seconds  # its wall time per step, with the other jobs and serving beside it
            last = t.history[-1] if t.history else {}
            eta = (t.total_steps - t.step) * mine["seconds"] / mine["steps"]
            self._update(mine["dir"], step=t.step, train_loss=last.get("train_loss"), dev_loss=last.get("dev_loss"),
                         best_dev_loss=None if math.isinf(t.best_dev) else t.best_dev,
                         best_step=t.selection()["best_step"], eta_s=round(eta, 1))
            if t.finished():
                self._finish(job_id)

    def _finish(self, job_id: str) -> None:
        """Register the job's prefix under its tenant's name, exactly as an upload would be."""
        mine = self._mine[job_id]
        d, record = mine["dir"], self._read(mine["dir"])
        if (d / "cancel").exists():  # cancelled during its last round: a cancelled job registers nothing
            self._release(job_id, state="cancelled")
            return
        try:
            data = (d / "run" / "prefix.safetensors").read_bytes()
            entry, _ = self.registry.put(record["tenant"], record["prefix"], data)
        except (OSError, InvalidPrefix) as e:
            self._release(job_id, state="failed", error=f"the trained prefix could not be registered: {e}")
            return
        self._release(job_id, state="succeeded", prefix_bytes=entry.bytes)
        log.info("training job %s done: prefix %r registered", job_id, record["prefix"])

    def _release(self, job_id: str, state: str | None = None, error: str | None = None, save: bool = False,
                 **changes) -> None:
        """Stop training ``job_id`` here: end it as ``state``, or (``save``) checkpoint it to resume later."""
        mine = self._mine.pop(job_id)
        t = self._many.trainers.pop(job_id, None) if self._many is not None else None
        try:
            if save and t is not None and t.pending["losses"]:
                t.save_checkpoint(gather=False)
            if state is not None:
                self._end(mine["dir"], self._read(mine["dir"]), state, error, **changes)
        except FileNotFoundError:  # the job's directory went away (deleted by hand)
            pass
        finally:
            mine["lock"].close()


def _try_lock(d: Path):
    """The job's lock file, opened and exclusively locked, or None if another holder has it."""
    f = open(d / "lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f
