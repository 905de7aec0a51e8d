"""Adapter-tuning (Houlsby et al., 2019), the paper's parameter-efficient baseline.

A bottleneck adapter ``h + up(act(down(h)))`` is inserted after every attention block's output and
after every feed-forward block's output, before the residual addition, in every layer (and, for
encoder-decoder models, after cross-attention too). ``up`` starts at zero, so the model starts
exactly as the base model. Only the adapters train; the base weights are frozen and never change.
Adapters are attached with forward hooks, so any architecture whose attention goes through
transformers' attention modules and whose feed-forward block is a named submodule works.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import attach
from . import Tuned

# the module that computes a layer's feed-forward output (before dropout and the residual add)
FEED_FORWARD_NAMES = ("mlp", "DenseReluDense", "fc2")


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)  # near-identity start (Houlsby): the model is unchanged at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def adapter_sites(model) -> list[nn.Module]:
    """Modules whose output gets an adapter: every attention module and every feed-forward block."""
    sites = [m for mods in attach.attention_modules(model).values() for m in mods]
    ffn = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in FEED_FORWARD_NAMES]
    if not ffn:
        raise ValueError(f"{type(model).__name__}: no feed-forward block named one of {FEED_FORWARD_NAMES}")
    return sites + ffn


def _width(model) -> int:
    return model.config.get_text_config().hidden_size


def bottleneck_for(model, fraction: float) -> int:
    """The bottleneck width whose adapters come closest to ``fraction`` of the model's parameters."""
    n_model = sum(p.numel() for p in model.parameters())
    sites = len(adapter_sites(model))
    d = _width(model)
    # per adapter: down (d*r + r) + up (r*d + d)
    r = round((fraction * n_model / sites - d) / (2 * d + 1))
    return max(1, r)


class AdapterModel(Tuned):
    """The frozen base model with adapters; ``parameters()`` are the adapters' only."""

    method = "adapter"

    def __init__(self, model, bottleneck: int, reduction: str = "token_mean"):
        super().__init__(model, reduction)  # the model is held, not a submodule
        self.bottleneck = bottleneck
        model.requires_grad_(False)
        d = _width(model)
        sites = adapter_sites(model)
        device, dtype = next(model.parameters()).device, torch.float32
        self.adapters = nn.ModuleList(Adapter(d, bottleneck).to(device, dtype) for _ in sites)
        self._hooks = [site.register_forward_hook(self._hook(a)) for site, a in zip(sites, self.adapters)]

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        config.bottleneck = config.bottleneck or bottleneck_for(model, config.size)  # recorded in run.json
        return cls(model, config.bottleneck, reduction=prefix_config.loss)

    @staticmethod
    def _hook(adapter: Adapter):
        def hook(module, args, output):
            if isinstance(output, tuple):  # attention modules return (output, weights, ...)
                return (adapter(output[0]),) + output[1:]
            return adapter(output)
        return hook

    def remove(self) -> None:
        """Detach the adapters: the base model computes exactly what it did before."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
