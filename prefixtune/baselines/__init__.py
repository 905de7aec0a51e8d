"""Baselines of the paper's comparisons: fine-tuning (full, top-k layers), adapter-tuning, LoRA (PEFT),
the embedding-only (prompt) and infix ablations, and PEFT's own prefix tuning.

Every baseline is a wrapper around the base model with the same contract as
:class:`prefixtune.PrefixTuner`, so one trainer, data pipeline and decoding serve them all:
``parameters()`` are exactly the trainable weights, ``forward(input_ids, attention_mask, labels,
return_logits)`` returns the loss on the target tokens, ``save_trained(run_dir)`` writes what the
method keeps after training, ``num_stored_parameters()`` counts it. See prefixtune/methods.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..loss import lm_forward

WEIGHTS = "weights.safetensors"


class Tuned(nn.Module):
    """Base of the wrappers whose trained weights live inside the model (fine-tuning, adapters, LoRA,
    soft prompt): the base model is held, not registered, so ``parameters()`` is what subclasses
    yield; ``train()``/``eval()`` switch the base model too."""

    method = "?"

    def __init__(self, model, reduction: str = "token_mean"):
        super().__init__()
        self.__dict__["model"] = model
        self.reduction = reduction

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        return lm_forward(self.model, self.reduction, input_ids, attention_mask, labels, return_logits, **kwargs)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_stored_parameters(self) -> int:
        return self.num_trainable_parameters()

    def save_trained(self, out_dir: str | Path) -> Path:
        """The trained weights by name, as safetensors (atomic: temp file + rename)."""
        path = Path(out_dir) / WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {n: p.detach().float().contiguous().cpu() for n, p in self.named_parameters()}
        save_file(tensors, str(tmp), metadata={"prefixtune": json.dumps({"method": self.method})})
        tmp.replace(path)
        return path

    def load_trained(self, out_dir: str | Path) -> None:
        """Load weights that :meth:`save_trained` wrote (every trainable tensor must be there)."""
        path = Path(out_dir) / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no trained weights in {out_dir} ({WEIGHTS} is missing)")
        params = dict(self.named_parameters())
        with safe_open(str(path), framework="pt") as f:
            missing = set(params) - set(f.keys())
            if missing:
                raise ValueError(f"{path}: missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
            for name, p in params.items():
                t = f.get_tensor(name)
                if t.shape != p.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model wants {tuple(p.shape)}")
                p.data.copy_(t)
