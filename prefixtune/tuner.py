"""The trainable prefix: P'_theta and its MLP reparameterisation, the training forward, and export.

A prefix gives every attention layer ``length`` extra key/value positions. During training the
keys/values P_theta come from a small matrix P'_theta through an MLP (the paper's
reparameterisation, which makes optimisation stable); :meth:`PrefixTuner.export` then runs the
MLP once and keeps only P_theta as a :class:`~prefixtune.prefix.Prefix`, which is all that is
stored and served.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from . import attach
from .attach import PrefixBatch, PrefixShapes
from .batch import split_layers
from .config import PrefixConfig
from .loss import TunerOutput, lm_forward
from .methods import Tuner
from .modes import eval_mode
from .prefix import Prefix, make_meta


def reparameterisation(length: int, embed_dim: int, hidden: int, width: int) -> tuple[nn.Parameter, nn.Sequential]:
    """P' (``[length, embed_dim]``, nn.Embedding's init) and the MLP that makes P (``[length, width]``)
    of it: the paper's reparameterisation, of a prefix and of the embedding-only ablation's soft prompt."""
    return (nn.Parameter(torch.randn(length, embed_dim)),
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)))


class PrefixEncoder(nn.Module):
    """P'_theta and the MLP for one placement (or P_theta directly when flat).

    forward() returns P_theta as ``[layers, 2, kv_heads, length, head_dim]``; it runs once per
    step, for the whole batch.
    """

    def __init__(self, config: PrefixConfig, shape: tuple[int, int, int], embed_dim: int):
        super().__init__()
        self.shape = shape
        layers, heads, dim = shape
        width = layers * 2 * heads * dim
        if config.reparameterize:
            self.embedding, self.mlp = reparameterisation(config.length, embed_dim, config.mlp_hidden, width)
        else:
            self.embedding = nn.Parameter(torch.randn(config.length, width))  # P itself
            self.mlp = None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self) -> torch.Tensor:
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        flat = self.dropout(flat)
        layers, heads, dim = self.shape
        # [length, layers*2*heads*dim] -> [layers, 2, heads, length, dim] (layer-major, keys then values)
        return flat.view(-1, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)

    def fit(self, target: torch.Tensor, steps: int, lr: float) -> float:
        """Fit the output to ``target`` [layers, 2, heads, length, dim] (words init). Returns final MSE."""
        if self.mlp is None:
            with torch.no_grad():
                self.embedding.copy_(target.permute(3, 0, 1, 2, 4).reshape(self.embedding.shape))
            return 0.0
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            loss = nn.functional.mse_loss(self(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())



class PrefixTuner(Tuner):
    """A frozen base model plus one trainable prefix.

    The base model is held but not registered as a submodule, so ``tuner.parameters()`` and
    ``tuner.state_dict()`` are the prefix's alone; its weights are frozen and never change.
    ``tuner.train()``/``eval()`` also switch the base model (dropout, gradient checkpointing).
    """

    method = "prefix"
    trained_file = "prefix.safetensors"

    def __init__(self, model, config: PrefixConfig | None = None, tokenizer=None):
        super().__init__(model)
        config = config or PrefixConfig()
        self.config = config
        model.requires_grad_(False)
        attach.enable(model)
        shapes: PrefixShapes = attach.prefix_shapes(model)
        placements = config.placements or tuple(shapes.placements)
        unknown = set(placements) - set(shapes.placements)
        if unknown:
            raise ValueError(f"placements {sorted(unknown)} not in this model's {list(shapes.placements)}")
        embed_dim = config.embed_dim or _hidden_size(model)
        self.encoders = nn.ModuleDict(
            {p: PrefixEncoder(config, shapes.placements[p], embed_dim) for p in placements}
        )
        if config.gradient_checkpointing:
            # non-reentrant: prefix tensors reach attention as keyword arguments, which the
            # reentrant variant would not differentiate
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.to(next(model.parameters()).device)
        self.words_in_front = None  # init="words": whether P equals the words in front of x (attach.words_kv)
        if config.init == "words":
            self.init_from_words(config.init_text, tokenizer)
        self.train(model.training)

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        return cls(model, prefix_config, tokenizer=tokenizer)

    @classmethod
    def load_trained(cls, model, run_dir, config, prefix_config) -> dict:
        return {"prefixes": Prefix.load(Path(run_dir) / cls.trained_file)}

    def decode_inputs(self) -> dict:
        return {"prefixes": self.export()}

    @property
    def reduction(self) -> str:
        return self.config.loss

    def prefix_kv(self) -> dict[str, torch.Tensor]:
        """P_theta per placement, ``[layers, 2, kv_heads, length, head_dim]`` (MLP run once)."""
        return {p: enc() for p, enc in self.encoders.items()}

    def prefix_batch(self) -> PrefixBatch:
        kv = self.prefix_kv()
        dims = attach.prefix_shapes(self.model).head_dims
        return PrefixBatch(kv={p: split_layers(t[None], *dims[p]) for p, t in kv.items()}, mask={p: None for p in kv})

    @torch.no_grad()
    def init_from_words(self, text: str, tokenizer) -> dict[str, float]:
        """Initialise from the base model's activations for ``text`` (rule: see PrefixConfig.init)."""
        if tokenizer is None:
            raise ValueError("init='words' needs the tokenizer: PrefixTuner(model, config, tokenizer=tokenizer)")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init_text {text!r} tokenises to nothing")
        n = self.config.length
        ids = (ids * math.ceil(n / len(ids)))[:n]
        recorded, self.words_in_front = attach.words_kv(self.model, ids)
        width = {p: s[2] for p, s in attach.prefix_shapes(self.model).placements.items()}
        errors = {}
        for p, enc in self.encoders.items():
            # per layer [1, heads, length, key/value size] (keys, values) -> [layers, 2, heads, length, width]
            pad = lambda t: nn.functional.pad(t[0], (0, width[p] - t.shape[-1]))  # noqa: E731
            target = torch.stack([torch.stack([pad(k), pad(v)]) for k, v in recorded[p]]).float()
            # fitted without prefix dropout, so P is the activations themselves
            with eval_mode(enc), torch.enable_grad():
                errors[p] = enc.fit(target, self.config.init_steps, self.config.init_lr)
        return errors

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True,
                **kwargs) -> TunerOutput:
        """HF-style forward with the loss on target tokens (see :func:`lm_forward`)."""
        return lm_forward(self.model, self.reduction, input_ids, attention_mask, labels, return_logits,
                          prefix_batch=self.prefix_batch(), **kwargs)

    def save_trained(self, out_dir: str | Path) -> Path:
        """Write what training keeps (the exported prefix) into a run directory."""
        return self.export().save(Path(out_dir) / self.trained_file)

    def num_stored_parameters(self) -> int:
        return sum(t.numel() for t in self.prefix_kv().values())

    def export(self) -> Prefix:
        """Run the MLP once and keep only P_theta (the MLP is dropped)."""
        with torch.no_grad(), eval_mode(self):  # no prefix dropout in the exported prefix
            kv = {p: t.detach().float().cpu().clone() for p, t in self.prefix_kv().items()}
            for p, t in kv.items():  # columns past a head's size are never used: store zeros
                kd, vd = attach.prefix_shapes(self.model).head_dims[p]
                t[:, 0, ..., kd:] = 0
                t[:, 1, ..., vd:] = 0
        return Prefix(kv=kv, meta=make_meta(self.model, kv, self.config))


def _hidden_size(model) -> int:
    c = model.config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(c, name, None):
            return getattr(c, name)
    return model.get_input_embeddings().weight.shape[1]

