"""Baselines of the paper's comparisons: fine-tuning (full, top-k layers), adapter-tuning, LoRA (PEFT),
the embedding-only (prompt) and infix ablations, and PEFT's own prefix tuning.

Every baseline is a :class:`prefixtune.methods.Tuner`, as :class:`prefixtune.PrefixTuner` is, so one
trainer, data pipeline and decoding serve them all; each is registered in prefixtune/methods.py.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..methods import Tuner
from ..prefix import save_safetensors

WEIGHTS = "weights.safetensors"


def trainable(module, prefix: str = "", remove_duplicate: bool = True):
    """(name, parameter) of ``module``'s parameters that train (``requires_grad``): the
    ``named_parameters`` of a method whose weights train inside the base model or PEFT's wrapper."""
    named = module.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate)
    return ((n, p) for n, p in named if p.requires_grad)


class Tuned(Tuner):
    """Base of the wrappers whose trained weights live inside the model (fine-tuning, adapters, LoRA):
    ``parameters()`` is what subclasses yield, kept by name in weights.safetensors after training.
    The soft prompt and PEFT's prefix build on it and keep something else besides (or instead)."""

    trained_file = WEIGHTS

    def __init__(self, model, reduction: str = "token_mean"):
        super().__init__(model)
        self.reduction = reduction

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        return cls(model, reduction=prefix_config.loss)

    @classmethod
    def load_trained(cls, model, run_dir, config, prefix_config) -> dict:
        """The trained weights go into ``model``; decoding needs nothing else."""
        cls.build(model, config, prefix_config).load_weights(run_dir)
        model.requires_grad_(False)
        return {}

    def save_trained(self, out_dir: str | Path) -> Path:
        """The trained weights by name, as safetensors."""
        return save_safetensors(Path(out_dir) / WEIGHTS, dict(self.named_parameters()), {"method": self.method})

    def load_weights(self, out_dir: str | Path) -> None:
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
