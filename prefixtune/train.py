"""Training loop: AdamW with linear warmup and decay, dev loss, best-prefix keeping, exact resume.

A run directory holds:
  run.json              the run's configuration (a resumed run must match it)
  checkpoint/           the training state at the end of a step: state.safetensors (P', MLP,
                        AdamW moments, RNG state) + state.json (step, scheduler, best dev loss,
                        the train losses since the last evaluation); no pickle
  prefix.safetensors    the exported prefix with the best dev loss so far (other methods: what
                        they keep, see prefixtune/methods.py)
  log.jsonl             one line per evaluation (step, train loss, dev loss, seconds per step)

Scale-out (processes and FSDP: prefixtune/processes.py): the same code runs as N processes under
``accelerate launch`` (or ``torchrun``), one per device, on one or many machines. ``batch_size`` stays the global micro-batch: every process builds
the same micro-batch and takes its own contiguous share of the rows; each share's loss is normalised
by the global number of target tokens (rows for ``sequence_sum``), and the prefix gradients are
summed over processes (one all-reduce per optimizer step, before clipping), so every process takes
the single-process step up to float summation order. Only the prefix is synchronised: the frozen
base is not a parameter of the tuner. Process 0 alone reads and writes the run directory; the
others receive the checkpoint by broadcast, so no shared file system is needed.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast, broadcast_object_list, gather_object, reduce
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from . import cpu_bf16
from .attach import is_seq2seq
from .config import PrefixConfig
from .data import Example
from .files import write_atomic
from .loss import lm_head_split, normaliser
from .methods import MethodConfig, build
from .modes import eval_mode
from .options import check_bounds, option
from .processes import process_state, share
from .tuner import PrefixTuner
from .template import Encoded, collate_train, encode, length_batches, special_ids


@dataclass
class TrainConfig:
    """How training runs (each field's help says what it does; ``prefixtune train --help`` shows the
    same). max_grad_norm: gradient-norm clipping. dev_batch_size: rows per dev-loss batch.
    autocast: run forwards in bfloat16 autocast (torch.autocast), with the trained weights, their
    gradients and AdamW state in float32 (the usual mixed-precision recipe; for methods that train
    the base model's own weights). Under N processes ``batch_size`` is still the global micro-batch."""

    epochs: float = option(5.0, "passes over the training data (unless --max-steps)")
    max_steps: int | None = option(None, "optimizer steps in total")
    batch_size: int = option(5, "rows per micro-batch (over all processes together)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-5, "AdamW peak learning rate (linear warmup, then linear decay to 0)")
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = 1.0
    eval_every: int = option(0, "optimizer steps between dev evaluations and checkpoints (0: once per epoch)")
    dev_batch_size: int = 16
    seed: int = option(42, "seed of the initialisation, data order and dropout")
    bucket: int = option(
        0, "length bucketing, to cut padding: each epoch's shuffled rows are cut into windows of this many batches, "
        "each window is sorted by length and cut into batches, and the order of the epoch's batches is shuffled "
        "(deterministic in seed and epoch); e.g. 50 cuts E2E's padding from 28% to 1.3% of the token slots at "
        "batch 8. 0: off, batches are consecutive rows of the shuffled order")
    patience: int = option(
        0, "early stopping: stop after this many evaluations in a row without a better selection score (dev loss, or "
        "the Trainer's dev_score hook); --epochs/--max-steps is then a cap (the learning rate still decays over the "
        "cap) and the best evaluation's result is kept. 0: off")
    autocast: bool = False
    compile: bool = option(
        False, "the training forward under torch.compile(dynamic=True): fuses the elementwise work of forward and "
        "backward (a bfloat16 step on CPU goes from ~3x to ~2x a no-grad forward, ~1.4x faster, see results/perf.md); "
        "compiling takes minutes once per process, so it pays off on runs of a few hundred steps and more")

    def __post_init__(self):
        """Refuse settings that would crash later (a division by a zero batch) or train nothing while
        looking like a run (no steps, a learning rate of 0)."""
        check_bounds(self, {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "dev_batch_size": 1, "warmup_steps": 0,
                            "eval_every": 0, "bucket": 0, "patience": 0, "weight_decay": 0},
                     positive=("epochs", "lr", "max_grad_norm"))


# run.json files written before a TrainConfig field existed ran with these values
_LEGACY_TRAIN = {"bucket": 0, "patience": 0, "autocast": False, "compile": False}


def training_forward(tuner, compile: bool = False):
    """``tuner(**batch, return_logits=False)``: the training forward, whose LM head runs on the target
    positions only (same loss, see :func:`prefixtune.loss.lm_forward`). With ``compile``, it runs under
    ``torch.compile(dynamic=True)`` as one graph for every batch shape (forward and backward compiled
    once): the selection of target positions is a data-dependent shape, which dynamo traces only when
    told to, and would otherwise split the forward into several graphs around a graph break."""
    def forward(**batch):
        return tuner(**batch, return_logits=False)

    if not compile:
        return forward
    if not is_seq2seq(tuner.model):
        lm_head_split(tuner.model)  # its one-off check of the model runs here, eagerly, not traced into the graph
    compiled = torch.compile(forward, dynamic=True)

    def compiled_forward(**batch):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(**batch)

    return compiled_forward


class StopAtStepEnd:
    """Ctrl-C (SIGINT) during training: the first one lets the current optimizer step finish, so the
    checkpoint then saved is exact (parameters, optimizer, RNG and data position all at a step's
    end); a second one interrupts at once (the last checkpoint stays). Only in the main thread of a
    single process (processes of a distributed run would stop at different steps); elsewhere
    KeyboardInterrupt stops at once and the run resumes from its last periodic checkpoint."""

    def __init__(self, active: bool = True):
        self.active = active
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", flush=True)

    def __enter__(self):
        if self.active and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def selection(history: list[dict], key: str, patience: int) -> dict:
    """The best evaluation of a training's ``history`` by ``key`` ("dev_score": higher is better;
    "dev_loss": lower; step 0, before training, excluded), and whether early stopping (``patience``
    evaluations in a row without a better one; 0: never) has ended the training."""
    evals = [h for h in history if h["step"] > 0 and h.get(key) is not None]
    sign = 1 if key == "dev_score" else -1
    best = max(evals, key=lambda h: sign * h[key], default=None)  # first of equals: the earliest
    since = 0 if best is None else sum(h["step"] > best["step"] for h in evals)
    return {"selected_by": key, "best_step": None if best is None else best["step"],
            "best_dev_score": None if best is None else best.get("dev_score"), "evaluations_since_best": since,
            "stopped_early": bool(patience and since >= patience)}


def checkpoint_progress(run_dir: str | Path) -> dict | None:
    """How far the training in ``run_dir`` got, from its checkpoint: ``step`` and ``max_steps`` (its cap:
    None for a checkpoint from before it was recorded, of a run capped by epochs), from run.json
    ``eval_every`` and ``patience``; its :func:`selection`; ``finished``: at the cap or stopped early. None
    without a checkpoint (none yet, or removed once the training was done)."""
    try:
        state = json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())
        train = json.loads((Path(run_dir) / "run.json").read_text())["train"]
    except (OSError, ValueError, KeyError):
        return None
    key = "dev_score" if any(h.get("dev_score") is not None for h in state["history"]) else "dev_loss"
    chosen = selection(state["history"], key, train["patience"])
    cap = state.get("total_steps", train["max_steps"])
    return {"step": state["step"], "max_steps": cap, "eval_every": train["eval_every"], "patience": train["patience"],
            **chosen, "finished": (cap is not None and state["step"] >= cap) or chosen["stopped_early"]}


def _differences(was: dict, now: dict, path: str = "") -> list[str]:
    """The settings that differ between two run.json contents, as 'section.name: was -> now'."""
    out = []
    for k in dict.fromkeys([*was, *now]):
        a, b = was.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{path}{k}.")
        elif a != b:
            out.append(f"{path}{k}: {a!r} -> {b!r}")
    return out


class Trainer:
    def __init__(self, model, tokenizer, train: list[Example], dev: list[Example] | None,
                 prefix_config: PrefixConfig, config: TrainConfig, out_dir: str | Path, progress: bool = True,
                 method: MethodConfig | None = None, dev_score=None):
        """``method``: what to train (default: a prefix, the paper's method); the baselines of
        prefixtune/methods.py train through the same loop, data and loss. ``prefix_config`` gives the
        loss reduction for all of them, and the length/MLP of the prefix-like ones. ``dev_score``:
        ``f(trainer) -> float``, higher is better (e.g. dev BLEU of greedy outputs), computed at every
        evaluation; when given, the best evaluation and early stopping follow it instead of dev loss."""
        if not train:
            raise ValueError("no training examples")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out = Path(out_dir)
        self.device = next(model.parameters()).device
        self.state = process_state(cpu=self.device.type == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.progress = progress and self.is_main
        self.pad = special_ids(tokenizer)[2]
        self.train_set = [encode(model, tokenizer, e.source, e.target) for e in train]
        self.dev_set = [encode(model, tokenizer, e.source, e.target) for e in (dev or [])]
        self.lengths = [len(e.prompt) + len(e.target) for e in self.train_set]
        # target tokens of each row as the loss counts them (decoder-only: labels shifted by one)
        seq2seq = is_seq2seq(model)
        self.targets = [len(e.target) - (0 if seq2seq or e.prompt else 1) for e in self.train_set]
        self._plan: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.batches_per_epoch / config.grad_accum)
        self.eval_every = config.eval_every or max(1, self.batches_per_epoch // config.grad_accum)
        self.method = method or MethodConfig()
        self.reduction = prefix_config.loss
        torch.manual_seed(config.seed)
        self.tuner = build(self.method, model, prefix_config, tokenizer)
        self.run_info = {"prefix": prefix_config.to_json(), "train": asdict(config), "n_train": len(train),
                         "n_dev": len(self.dev_set)}
        if self.method.method != "prefix":  # (run.json of prefix runs stays as it was)
            self.run_info["method"] = self.method.to_json()
        if self.world > 1:  # identical start everywhere, whatever the device's initialisation did
            with torch.no_grad():
                for p in self.tuner.parameters():
                    p.copy_(broadcast(p.detach().clone()))
        self.optimizer = torch.optim.AdamW(self.tuner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warm, total = config.warmup_steps, self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
        )
        self.step = 0
        self.best_dev = math.inf
        self.history: list[dict] = []
        # train losses (and wall / CPU seconds) of the steps since the last evaluation: a checkpoint taken
        # between evaluations keeps them, so a resumed run logs the same interval means as a straight one
        self.pending: dict = {"losses": [], "seconds": 0.0, "cpu_seconds": 0.0}
        self._training_forward = None  # made on first use (see _forward): compiled with config.compile
        # see frozen_casts; not under torch.compile, which traces the forward itself; kept copies only in
        # one process (a sharded base swaps its weights' storage between forwards)
        self.casts = None if config.compile else frozen_casts(self.device.type, cache=self.world == 1)
        self.dev_score = dev_score
        if dev_score is not None and self.world > 1:
            raise ValueError("a dev_score hook runs in one process only (it decodes with the whole model)")

    # --- data ----------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of every micro-batch of ``epoch``: a permutation seeded by (seed, epoch), cut into
        batches (with ``bucket``: sorted by length within windows, then the batch order shuffled)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        n, size = len(self.train_set), self.config.batch_size
        g = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if self.config.bucket:
            window = self.config.bucket * size
            order = [i for w in range(0, n, window) for i in sorted(order[w : w + window], key=self.lengths.__getitem__)]
        batches = [order[i : i + size] for i in range(0, n, size)]
        if self.config.bucket:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        self._plan = (epoch, batches)
        return batches

    def micro_batch_rows(self, index: int) -> list[int]:
        """Row indices of the run's ``index``-th (global) micro-batch."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        return self.epoch_batches(epoch)[pos]

    # --- loop ------------------------------------------------------------------------------------

    def fit(self) -> dict:
        self.start()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        with StopAtStepEnd(active=self.world == 1) as stop:
            try:
                while not self.finished():
                    start, cpu = time.perf_counter(), time.process_time()
                    step_loss = self._train_step()
                    saved = self.record_step(step_loss, time.perf_counter() - start, bar, time.process_time() - cpu)
                    if stop.requested:
                        if not saved:
                            self.save_checkpoint(gather=False)
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                bar.close()
                if self.is_main:
                    if stop.requested:  # the state at the end of a whole step: resuming is exact
                        print(f"\ninterrupted after step {self.step}; checkpoint saved in {self.out / 'checkpoint'}; "
                              "run the same command again to resume")
                    else:
                        print(f"\ninterrupted; run the same command again to resume from the last checkpoint "
                              f"({self.out / 'checkpoint'})")
                raise
        bar.close()
        if self.world > 1:
            self.state.wait_for_everyone()  # the run directory is complete when fit() returns anywhere
        return self.result()

    # The loop in pieces, so that one loop can also drive several trainers that share a model and
    # batches (prefixtune/train_many.py): start, then per step the rows, the gradient, the update
    # (apply_step) and the bookkeeping (record_step), until finished.

    def start(self) -> None:
        """Check or write run.json, resume from the checkpoint, take the dev loss before training."""
        self._check_run_config()
        self.load_checkpoint()
        if self.step == 0 and self.dev_set and not self.history:  # dev loss before training, for comparison
            cpu = time.process_time()
            dev = self.dev_loss()
            self.history.append({"step": 0, "train_loss": None, "dev_loss": dev, "seconds_per_step": None,
                                 "cpu_seconds_per_step": None, "eval_cpu_seconds": time.process_time() - cpu})

    def finished(self) -> bool:
        return self.step >= self.total_steps or self.stopped()

    def result(self) -> dict:
        return {"steps": self.step, "best_dev_loss": self.best_dev, "history": self.history, **self.selection()}

    def step_rows(self) -> list[list[int]]:
        """Row indices of the next step's micro-batches (all processes)."""
        ga = self.config.grad_accum
        return [self.micro_batch_rows(self.step * ga + k) for k in range(ga)]

    def _train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns its loss.

        The loss is normalised by the whole step's target tokens (rows for ``sequence_sum``), over all
        its micro-batches and processes, so batch 8 and 2 x 4 accumulated (or 2 processes x 4) give
        the same gradient: ``grad_accum`` and the number of processes only change memory and speed."""
        self.tuner.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_rows = self.step_rows()
        total = self.loss_normaliser(sum(step_rows, []))
        step_loss = 0.0
        for rows in step_rows:
            mine = rows[share(len(rows), self.rank, self.world)]
            # an empty share (a last batch with fewer rows than processes) runs one row with
            # weight 0: every process then makes the same collective calls (FSDP's gathers)
            batch = collate_train(self.model, [self.train_set[i] for i in mine or rows[-1:]], self.pad)
            with autocast_context(self.config.autocast, self.device.type, self.casts):
                nll_sum = self._forward(**{n: t.to(self.device) for n, t in batch.items()})
            loss = nll_sum / total if mine else nll_sum * 0.0
            loss.backward()
            step_loss += float(loss.detach())
        if self.world > 1:
            step_loss = self._sync_gradients(step_loss)
        self.apply_step()
        return step_loss

    def _forward(self, **batch) -> torch.Tensor:
        """Summed NLL of a batch's target tokens (:func:`training_forward`)."""
        if self._training_forward is None:
            self._training_forward = training_forward(self.tuner, self.config.compile)
        return self._training_forward(**batch).nll_sum

    def loss_normaliser(self, rows: list[int]) -> int:
        """What a step's summed NLL is divided by (:func:`prefixtune.loss.normaliser` of its rows)."""
        return max(1, normaliser(self.reduction, sum(self.targets[i] for i in rows), len(rows)))

    def apply_step(self) -> None:
        """Clip the gradients, then the optimizer's and the scheduler's step."""
        torch.nn.utils.clip_grad_norm_(self.tuner.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

    def record_step(self, step_loss: float, seconds: float, bar=None, cpu_seconds: float | None = None) -> bool:
        """Count a finished step (its wall and, where known, CPU seconds); evaluate and checkpoint when
        it is time. Returns whether it saved."""
        self.step += 1
        self.pending["losses"].append(step_loss)
        self.pending["seconds"] += seconds
        cpu = self.pending["cpu_seconds"]
        self.pending["cpu_seconds"] = None if cpu is None or cpu_seconds is None else cpu + cpu_seconds
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if self.step % self.eval_every == 0 or self.step == self.total_steps:
            losses, spent, cpu = self.pending["losses"], self.pending["seconds"], self.pending["cpu_seconds"]
            self.pending = {"losses": [], "seconds": 0.0, "cpu_seconds": 0.0}
            self._evaluate_and_save(sum(losses) / len(losses), spent / len(losses), bar,
                                    None if cpu is None else cpu / len(losses))
            return True
        return False

    def _sync_gradients(self, step_loss: float) -> float:
        """Sum the prefix gradients (and the step's loss) over processes: one all-reduce."""
        params = [p for p in self.tuner.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor([step_loss], dtype=params[0].dtype, device=params[0].device)])
        flat = reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return float(flat[-1])

    def _evaluate_and_save(self, train_loss: float, seconds_per_step: float, bar,
                           cpu_seconds_per_step: float | None = None) -> None:
        # CPU seconds (this process, all its threads) count what the run used whatever else ran or
        # paused the machine: wall seconds do not
        cpu = time.process_time()
        dev = self.dev_loss() if self.dev_set else None  # the same value in every process
        entry = {"step": self.step, "train_loss": train_loss, "dev_loss": dev, "seconds_per_step": seconds_per_step,
                 "cpu_seconds_per_step": cpu_seconds_per_step}
        if self.dev_score is not None:
            start = time.perf_counter()
            entry["dev_score"] = float(self.dev_score(self))
            entry["dev_score_seconds"] = time.perf_counter() - start
        entry["eval_cpu_seconds"] = time.process_time() - cpu  # the dev loss and dev score
        self.history.append(entry)
        if self.is_main:
            self._append_log(entry)
        # best by the selection score (dev loss by default); without a dev set, the latest prefix is kept
        if dev is None or self.selection()["best_step"] == self.step:
            self.best_dev = dev if dev is not None else self.best_dev
            if self.is_main:
                self._save_prefix()
        self.save_checkpoint()
        if self.is_main and bar is not None:
            bar.write(f"step {self.step}: train loss {train_loss:.4f}" + (f", dev loss {dev:.4f}" if dev is not None else "")
                      + (f", dev score {entry['dev_score']:.2f}" if "dev_score" in entry else ""))

    # --- selection and early stopping ----------------------------------------------------------
    # Both are functions of self.history, which the checkpoint holds: a resumed run selects and
    # stops exactly as an uninterrupted one.

    def _selection_key(self) -> str:
        return "dev_score" if self.dev_score is not None else "dev_loss"

    def selection(self) -> dict:
        return selection(self.history, self._selection_key(), self.config.patience if self.dev_set else 0)

    def stopped(self) -> bool:
        """Early stopping: ``patience`` evaluations in a row without a better selection score."""
        return self.selection()["stopped_early"]

    @torch.no_grad()
    def dev_loss(self) -> float:
        """Mean negative log-likelihood per target token over the dev set (no dropout). Under N
        processes each takes every N-th length-sorted batch; the sums are gathered and added in rank
        order, so every process gets the same value (and the same "best")."""
        with autocast_context(self.config.autocast, self.device.type, self.casts):
            if self.world == 1:
                return mean_target_nll(self.tuner, self.dev_set, self.pad, self.config.dev_batch_size, self.progress)
            sums = target_nll_sums(self.tuner, self.dev_set, self.pad, self.config.dev_batch_size, self.progress,
                                   shard=(self.rank, self.world))
        parts = gather_object([sums])
        return sum(t for t, _ in parts) / max(1, sum(c for _, c in parts))

    # --- checkpoints -----------------------------------------------------------------------------

    # Every write to the run directory goes through the methods below, which refuse to run anywhere
    # but in process 0 (the callers only call them there; the check makes a slip fail loudly).

    def _main_only(self, what: str) -> None:
        if not self.is_main:
            raise RuntimeError(f"process {self.rank} tried to write {what} in {self.out}; only process 0 writes the run directory")

    def _append_log(self, entry: dict) -> None:
        self._main_only("log.jsonl")
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def _save_prefix(self) -> None:
        self._main_only("the trained result")
        self.tuner.save_trained(self.out)

    def _write_run_config(self) -> None:
        self._main_only("run.json")
        write_atomic(self.out / "run.json", json.dumps(self.run_info, indent=2))

    def _check_run_config(self) -> None:
        """Process 0 compares run.json with this run's configuration (or writes it); all processes
        raise the same error on a mismatch."""
        error = None
        if self.is_main:
            path = self.out / "run.json"
            if path.is_file():
                before = json.loads(path.read_text())
                for k, v in _LEGACY_TRAIN.items():
                    before.get("train", {}).setdefault(k, v)
                if before != self.run_info:
                    error = (f"{self.out} holds a run with other settings ({', '.join(_differences(before, self.run_info))}). "
                             "Use another output directory, or delete this one to start over.")
            else:
                self._write_run_config()
        if self.world > 1:
            error = broadcast_object_list([error])[0]
        if error:
            raise ValueError(error)

    def save_checkpoint(self, gather: bool = True) -> None:
        """Write checkpoint/ atomically (temp dir + rename), tensors as safetensors, the rest as JSON.
        Called between steps only, so parameters, optimizer, scheduler, step and RNG state agree.

        Collective under N processes (each process's RNG state is gathered, for exact resume);
        process 0 writes. ``gather=False``: process 0 alone, with its own RNG state only."""
        rngs = [torch.get_rng_state()]
        if self.world > 1 and gather:
            rngs = gather_object(rngs)
        if self.is_main:
            self._write_checkpoint(rngs)

    def _write_checkpoint(self, rngs: list[torch.Tensor]) -> None:
        self._main_only("checkpoint/")
        tensors = {f"param.{n}": p.detach().contiguous() for n, p in self.tuner.named_parameters()}
        opt = self.optimizer.state_dict()
        for i, state in opt["state"].items():
            for k, v in state.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).contiguous()
        tensors["rng.torch"] = rngs[0]
        for r, rng in enumerate(rngs[1:], 1):
            tensors[f"rng.torch.{r}"] = rng
        info = {"step": self.step, "total_steps": self.total_steps, "best_dev": None if math.isinf(self.best_dev) else self.best_dev,
                "param_groups": opt["param_groups"], "scheduler": self.scheduler.state_dict(),
                "history": self.history, "pending": self.pending}
        tmp, final = self.out / "checkpoint.tmp", self.out / "checkpoint"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(info))
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        """Resume from checkpoint/ if there is one (or checkpoint.old, if a save was cut short).
        Under N processes process 0 reads it and broadcasts it to the others."""
        loaded = self._read_checkpoint() if self.is_main else None
        if self.world > 1:
            loaded = broadcast_object_list([loaded])[0]
        if loaded is None:
            return
        tensors, info = loaded
        with torch.no_grad():
            for n, p in self.tuner.named_parameters():
                p.copy_(tensors[f"param.{n}"])
        state: dict = {}
        for key, t in tensors.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = t
        self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        self.scheduler.load_state_dict(info["scheduler"])
        torch.set_rng_state(tensors.get(f"rng.torch.{self.rank}" if self.rank else "rng.torch", tensors["rng.torch"]))
        self.step = info["step"]
        self.best_dev = math.inf if info["best_dev"] is None else info["best_dev"]
        self.history = info["history"]
        self.pending = info.get("pending", {"losses": [], "seconds": 0.0})
        # checkpoints from before CPU time was counted: the steps already pending have none
        self.pending.setdefault("cpu_seconds", None if self.pending["losses"] else 0.0)

    def _read_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        ckpt = next((self.out / n for n in ("checkpoint", "checkpoint.old") if (self.out / n / "state.json").is_file()), None)
        if ckpt is None:
            return None
        return load_file(str(ckpt / "state.safetensors")), json.loads((ckpt / "state.json").read_text())


def train_method(model, tokenizer, train: list[Example], dev: list[Example] | None, prefix_config: PrefixConfig,
                 config: TrainConfig, out_dir: str | Path, method: MethodConfig | None = None, dev_score=None,
                 n_model: int | None = None, announce=None) -> tuple[Trainer, dict, dict]:
    """Train ``method`` (default: a prefix) on ``model`` into ``out_dir``: what ``prefixtune train`` and
    every experiment run do. Returns the trainer, its sizes (the method; the parameters of the base
    model, the trainable ones and those stored after training, with their percentages of the base
    model: the summary's format) and :meth:`Trainer.fit`'s result. ``n_model``: the base model's
    parameter count where ``model`` no longer shows all of it (an FSDP-sharded base); by default it
    is counted here, before a method adds weights to the model (LoRA). ``announce(trainer, sizes)``
    is called before training starts."""
    n_model = n_model or sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, tokenizer, train, dev, prefix_config, config, out_dir, method=method, dev_score=dev_score)
    n_train, n_stored = trainer.tuner.num_trainable_parameters(), trainer.tuner.num_stored_parameters()
    sizes = {"method": trainer.method.to_json(), "model_parameters": n_model, "trainable_parameters": n_train,
             "trainable_percent": 100 * n_train / n_model, "stored_parameters": n_stored,
             "stored_percent": 100 * n_stored / n_model}
    if announce is not None:
        announce(trainer, sizes)
    return trainer, sizes, trainer.fit()


def autocast_context(enabled: bool, device_type: str = "cpu", casts: TorchFunctionMode | None = None):
    """bfloat16 autocast on ``device_type`` when ``enabled`` (float32 weights stay the master copy),
    else a no-op context. ``casts``: the mode that runs autocast's products (see frozen_casts)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
    if casts is not None:
        stack.enter_context(casts)
    return stack


def frozen_casts(device_type: str, cache: bool = True) -> TorchFunctionMode | None:
    """The mode a trainer runs bfloat16 autocast under (its copies of frozen weights live as long as it):
    on a CPU without bfloat16 kernels, the products in float32 (cpu_bf16.Float32Products, ~16x faster
    there); else autocast's own, with the frozen weights' bfloat16 copies kept (FrozenCasts).
    ``cache=False``: no kept copies."""
    cache = cache and CACHE_FROZEN_CASTS
    if device_type == "cpu" and cpu_bf16.FLOAT32_PRODUCTS:
        return cpu_bf16.Float32Products(cache=cache)
    return FrozenCasts() if cache else None


class FrozenCasts(TorchFunctionMode):
    """Under bfloat16 autocast, ``F.linear`` on a frozen float32 weight gets a bfloat16 copy of it made
    once (remade if the weight changes in place) instead of autocast's own cast at every call.

    Why: autocast keeps its casts only for trainable weights, and only within one autocast region, so
    a frozen base was cast again at every forward: with the copies kept, a SmolLM2 prefix step takes
    0.89x the time on one CPU thread (benchmarks/arithmetic.py, results/perf/frozen_casts.json). The
    copy is the cast autocast makes, so the results are the same bits (tests/test_early_stopping.py).
    Only parameters are cached, and only where autocast is on at the call; a trainer owns one of
    these, so the copies live as long as it does. Single process only: a sharded base (FSDP) swaps
    its weights' storage between forwards."""

    def __init__(self):
        super().__init__()
        self.copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) > 1:
            weight = args[1]
            if (type(weight) is torch.nn.Parameter and not weight.requires_grad and weight.dtype == torch.float32
                    and torch.is_autocast_enabled(weight.device.type)
                    and torch.get_autocast_dtype(weight.device.type) == torch.bfloat16):
                entry = self.copies.get(id(weight))
                if entry is None or entry[0] is not weight or entry[1] != weight._version:
                    entry = self.copies[id(weight)] = (weight, weight._version, weight.detach().to(torch.bfloat16))
                args = (args[0], entry[2], *args[2:])
        return func(*args, **kwargs)


# False: no kept copies of the frozen weights, as before FrozenCasts (for tests).
CACHE_FROZEN_CASTS = True


@torch.no_grad()
def mean_target_nll(tuner: PrefixTuner, examples: list[Encoded], pad: int, batch_size: int = 16,
                    progress: bool = False) -> float:
    """Mean negative log-likelihood per target token of ``examples`` under the tuner's prefix."""
    total, count = target_nll_sums(tuner, examples, pad, batch_size, progress)
    return total / max(1, count)


@torch.no_grad()
def target_nll_sums(tuner: PrefixTuner, examples: list[Encoded], pad: int, batch_size: int = 16,
                    progress: bool = False, shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed negative log-likelihood, target tokens) of ``examples`` in length-sorted batches;
    ``shard=(rank, world)`` takes every world-th batch from the rank-th."""
    device = next(tuner.model.parameters()).device
    total, count = 0.0, 0
    chunks = length_batches([len(e.prompt) + len(e.target) for e in examples], batch_size)
    mine = chunks[shard[0] :: shard[1]]
    # every shard runs the same number of batches (a spare one is run and ignored), so that all
    # processes make the same collective calls (an FSDP-sharded base gathers weights in forward)
    rounds = math.ceil(len(chunks) / shard[1]) if shard[1] > 1 else len(mine)
    with eval_mode(tuner):
        for k in tqdm(range(rounds), desc="dev", leave=False, disable=not progress):
            rows = mine[k] if k < len(mine) else chunks[0]
            batch = {n: t.to(device) for n, t in collate_train(tuner.model, [examples[i] for i in rows], pad).items()}
            out = tuner(**batch, return_logits=False)
            if k < len(mine):
                total += float(out.nll_sum)
                count += int(out.n_targets)
    return total, count
