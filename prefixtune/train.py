"""Training loop: AdamW with linear warmup and decay, dev loss, best-prefix keeping, exact resume.

A run directory holds:
  run.json              the run's configuration (a resumed run must match it)
  checkpoint/           the last training state: state.safetensors (P', MLP, AdamW moments,
                        RNG state) + state.json (step, scheduler, best dev loss); no pickle
  prefix.safetensors    the exported prefix with the best dev loss so far
  log.jsonl             one line per evaluation (step, train loss, dev loss, seconds per step)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import Example
from .attach import is_seq2seq
from .prefix import PrefixConfig, PrefixTuner, token_logprobs
from .template import Encoded, collate_train, encode, special_ids


@dataclass
class TrainConfig:
    """epochs: passes over the training data (ignored when max_steps is set).
    max_steps: optimizer steps in total. batch_size: rows per micro-batch; grad_accum
    micro-batches make one optimizer step. lr, warmup_steps, weight_decay, max_grad_norm: AdamW
    with linear warmup then linear decay to 0, gradient-norm clipping. eval_every: optimizer
    steps between dev evaluations and checkpoints (0 = once per epoch). seed: data order, dropout
    and initialisation."""

    epochs: float = 5.0
    max_steps: int | None = None
    batch_size: int = 5
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    dev_batch_size: int = 16
    seed: int = 42


class Trainer:
    def __init__(self, model, tokenizer, train: list[Example], dev: list[Example] | None,
                 prefix_config: PrefixConfig, config: TrainConfig, out_dir: str | Path, progress: bool = True):
        if not train:
            raise ValueError("no training examples")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out = Path(out_dir)
        self.progress = progress
        self.pad = special_ids(tokenizer)[2]
        self.train_set = [encode(model, tokenizer, e.source, e.target) for e in train]
        self.dev_set = [encode(model, tokenizer, e.source, e.target) for e in (dev or [])]
        self.batches_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.batches_per_epoch / config.grad_accum)
        self.eval_every = config.eval_every or max(1, self.batches_per_epoch // config.grad_accum)
        self.run_info = {"prefix": prefix_config.to_json(), "train": asdict(config), "n_train": len(train),
                         "n_dev": len(self.dev_set)}

        torch.manual_seed(config.seed)
        self.tuner = PrefixTuner(model, prefix_config, tokenizer=tokenizer)
        self.optimizer = torch.optim.AdamW(self.tuner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warm, total = config.warmup_steps, self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
        )
        self.step = 0
        self.best_dev = math.inf
        self.history: list[dict] = []

    # --- data ----------------------------------------------------------------------------------

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th micro-batch of the run: epoch e uses a permutation seeded by (seed, e)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
        order = torch.randperm(len(self.train_set), generator=g).tolist()
        rows = order[pos * self.config.batch_size : (pos + 1) * self.config.batch_size]
        return collate_train(self.model, [self.train_set[i] for i in rows], self.pad)

    # --- loop ------------------------------------------------------------------------------------

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run_config()
        self.load_checkpoint()
        device = next(self.model.parameters()).device
        if self.step == 0 and self.dev_set and not self.history:  # dev loss before training, for comparison
            self.history.append({"step": 0, "train_loss": None, "dev_loss": self.dev_loss(), "seconds_per_step": None})
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        losses, t0 = [], time.perf_counter()
        try:
            while self.step < self.total_steps:
                self.tuner.train()
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for k in range(self.config.grad_accum):
                    batch = {n: t.to(device) for n, t in self.micro_batch(self.step * self.config.grad_accum + k).items()}
                    loss = self.tuner(**batch).loss / self.config.grad_accum
                    loss.backward()
                    step_loss += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(self.tuner.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    seconds = (time.perf_counter() - t0) / len(losses)
                    self._evaluate_and_save(sum(losses) / len(losses), seconds, bar)
                    losses, t0 = [], time.perf_counter()
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            print(f"\ninterrupted at step {self.step}; checkpoint saved in {self.out / 'checkpoint'}; "
                  "run the same command again to resume")
            raise
        bar.close()
        return {"steps": self.step, "best_dev_loss": self.best_dev, "history": self.history}

    def _evaluate_and_save(self, train_loss: float, seconds_per_step: float, bar) -> None:
        dev = self.dev_loss() if self.dev_set else None
        entry = {"step": self.step, "train_loss": train_loss, "dev_loss": dev, "seconds_per_step": seconds_per_step}
        self.history.append(entry)
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        # best by dev loss; without a dev set, the latest prefix is kept
        if dev is None or dev < self.best_dev:
            self.best_dev = dev if dev is not None else self.best_dev
            self.tuner.export().save(self.out / "prefix.safetensors")
        self.save_checkpoint()
        bar.write(f"step {self.step}: train loss {train_loss:.4f}" + (f", dev loss {dev:.4f}" if dev is not None else ""))

    @torch.no_grad()
    def dev_loss(self) -> float:
        """Mean negative log-likelihood per target token over the dev set (no dropout)."""
        return mean_target_nll(self.tuner, self.dev_set, self.pad, self.config.dev_batch_size, self.progress)

    # --- checkpoints -----------------------------------------------------------------------------

    def _check_run_config(self) -> None:
        path = self.out / "run.json"
        if path.is_file():
            before = json.loads(path.read_text())
            if before != self.run_info:
                diff = {k: (before.get(k), self.run_info.get(k)) for k in self.run_info if before.get(k) != self.run_info.get(k)}
                raise ValueError(
                    f"{self.out} holds a run with a different configuration (was, now): {diff}. "
                    "Use another output directory, or delete this one to start over."
                )
        else:
            path.write_text(json.dumps(self.run_info, indent=2))

    def save_checkpoint(self) -> None:
        """Write checkpoint/ atomically (temp dir + rename), tensors as safetensors, the rest as JSON."""
        tensors = {f"param.{n}": p.detach().contiguous() for n, p in self.tuner.named_parameters()}
        opt = self.optimizer.state_dict()
        for i, state in opt["state"].items():
            for k, v in state.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        info = {"step": self.step, "best_dev": None if math.isinf(self.best_dev) else self.best_dev,
                "param_groups": opt["param_groups"], "scheduler": self.scheduler.state_dict(),
                "history": self.history}
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
        """Resume from checkpoint/ if there is one (or checkpoint.old, if a save was cut short)."""
        ckpt = next((self.out / n for n in ("checkpoint", "checkpoint.old") if (self.out / n / "state.json").is_file()), None)
        if ckpt is None:
            return
        tensors = load_file(str(ckpt / "state.safetensors"))
        info = json.loads((ckpt / "state.json").read_text())
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
        torch.set_rng_state(tensors["rng.torch"])
        self.step = info["step"]
        self.best_dev = math.inf if info["best_dev"] is None else info["best_dev"]
        self.history = info["history"]


@torch.no_grad()
def mean_target_nll(tuner: PrefixTuner, examples: list[Encoded], pad: int, batch_size: int = 16,
                    progress: bool = False) -> float:
    """Mean negative log-likelihood per target token of ``examples`` under the tuner's prefix."""
    was_training = tuner.training
    tuner.eval()
    device = next(tuner.model.parameters()).device
    shift = not is_seq2seq(tuner.model)
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].target))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(chunks, desc="dev", leave=False, disable=not progress):
        batch = {n: t.to(device) for n, t in collate_train(tuner.model, [examples[i] for i in rows], pad).items()}
        logp, mask = token_logprobs(tuner(**batch).logits, batch["labels"], shift=shift)
        total -= float(logp.sum())
        count += int(mask.sum())
    tuner.train(was_training)
    return total / max(1, count)
