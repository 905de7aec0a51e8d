"""The method: prefix parameters, their MLP reparameterisation, training forward, and export.

A prefix gives every attention layer ``length`` extra key/value positions. During training the
keys/values P_theta come from a small matrix P'_theta through an MLP (the paper's
reparameterisation, which makes optimisation stable); :meth:`PrefixTuner.export` then runs the
MLP once and keeps only P_theta as a :class:`Prefix`, which is all that is stored and served.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import ModelOutput

from . import __version__, attach
from .attach import PrefixBatch, PrefixShapes  # noqa: F401  (PrefixShapes: re-export)

FORMAT = "prefixtune.prefix/1"
POSITIONS = "unshifted"  # real tokens keep positions 0..n-1; a prefix has none (see attach.py)


@dataclass
class PrefixConfig:
    """How a prefix is built and trained.

    length: number of prefix positions per attention layer (paper: 10 for table-to-text, 200 for
        summarisation).
    reparameterize: True = P' (length x embed_dim) -> MLP -> P (the paper's default); False =
        optimise P directly ("flat").
    mlp_hidden: hidden width of the MLP (paper: 512 for table-to-text, 800 for summarisation).
    embed_dim: d', width of P'; None = the model's hidden size.
    dropout: dropout applied to P during training (the original code's prefix dropout).
    init: "random", or "words": start from the base model's own keys/values for ``init_text``.
        The text is tokenised without special tokens and its tokens are repeated cyclically, then
        cut, to exactly ``length`` tokens (so "table-to-text:" fills a length-10 prefix by
        repeating itself, and a long text keeps its first ``length`` tokens); the model is run on
        that token sequence and its per-layer keys/values become P: the words in front of the
        input where the model's positions are relative (see attach.words_kv). With the MLP, the
        MLP (and P') are first fitted to those activations by ``init_steps`` Adam steps of MSE (in
        eval mode, without prefix dropout), as the original code does; without it, they are copied.
    loss: "token_mean" (mean log-likelihood over all target tokens of the batch) or
        "sequence_sum" (the paper's objective: sum over each target's tokens, mean over rows).
    gradient_checkpointing: recompute the frozen model's activations in backward (less memory).
    placements: which attention placements get a prefix; None = all the model has ("self" for
        decoder-only models; "encoder", "decoder", "cross" for encoder-decoder models).
    """

    length: int = 10
    reparameterize: bool = True
    mlp_hidden: int = 512
    embed_dim: int | None = None
    dropout: float = 0.0
    init: Literal["random", "words"] = "random"
    init_text: str | None = None
    init_steps: int = 500
    init_lr: float = 1e-3
    loss: Literal["token_mean", "sequence_sum"] = "token_mean"
    gradient_checkpointing: bool = False
    placements: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"PrefixConfig.length must be >= 1, got {self.length}")
        if self.init not in ("random", "words"):
            raise ValueError(f"PrefixConfig.init must be 'random' or 'words', got {self.init!r}")
        if self.init == "words" and not self.init_text:
            raise ValueError("PrefixConfig.init='words' needs init_text, e.g. 'table-to-text:'")
        if self.loss not in ("token_mean", "sequence_sum"):
            raise ValueError(f"PrefixConfig.loss must be 'token_mean' or 'sequence_sum', got {self.loss!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PrefixConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.placements is not None:
            self.placements = tuple(self.placements)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Exported prefix


@dataclass
class Prefix:
    """An exported prefix: P_theta only, per placement a ``[layers, 2, kv_heads, length, head_dim]``
    float32 tensor (index 0 = keys, 1 = values), plus metadata (base model identity, shapes...)."""

    kv: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.kv.values())).shape[3]

    @property
    def site(self) -> str:
        """"prefix" ([P; x; y], the method) or "infix" ([x; P; y], the paper's ablation)."""
        return self.meta.get("site", "prefix")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.kv.values())

    def save(self, path: str | Path) -> Path:
        """Write ``.safetensors`` with the metadata as JSON in its header (atomic: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {f"{p}": t.detach().float().contiguous().cpu() for p, t in self.kv.items()}
        save_file(tensors, str(tmp), metadata={"prefixtune": json.dumps(self.meta, sort_keys=True)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Prefix":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prefix file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                kv = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a valid .safetensors prefix file ({e})") from e
        if "prefixtune" not in header:
            raise ValueError(f"{path}: safetensors file has no 'prefixtune' metadata; was it written by Prefix.save?")
        meta = json.loads(header["prefixtune"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported prefix format {meta.get('format')!r}, expected {FORMAT!r}")
        prefix = cls(kv=kv, meta=meta)
        if not kv:
            raise ValueError(f"{path}: holds no prefix tensor")
        for p, t in kv.items():
            shape = meta["shapes"].get(p)
            if shape is None or t.ndim != 5 or [t.shape[0], t.shape[2], t.shape[4]] != shape or t.shape[1] != 2:
                raise ValueError(f"{path}: tensor {p!r} has shape {tuple(t.shape)}, metadata says {shape}")
            if t.shape[3] < 1:
                raise ValueError(f"{path}: tensor {p!r} has prefix length {t.shape[3]}; a prefix needs at least 1 position")
            if not t.is_floating_point():
                raise ValueError(f"{path}: tensor {p!r} has dtype {t.dtype}, expected a floating-point type")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {p!r} holds NaN or infinite values")
            dims = meta.get("head_dims", {}).get(p, [shape[2], shape[2]])
            if len(dims) != 2 or max(dims) != shape[2] or min(dims) < 1:
                raise ValueError(f"{path}: head_dims {dims} of {p!r} do not fit its stored width {shape[2]}")
        return prefix

    def layer_kv(self, placement: str, tensor: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each ``[rows, kv_heads, length, head size]``, of ``tensor``
        (default: this prefix's, as one row) laid out as ``[rows, layers, 2, kv_heads, length, width]``."""
        t = self.kv[placement][None] if tensor is None else tensor
        kd, vd = self.meta.get("head_dims", {}).get(placement, (t.shape[-1], t.shape[-1]))
        return split_layers(t, kd, vd)

    @classmethod
    def from_peft(cls, path: str | Path, model, allow_position_shift: bool = False) -> "Prefix":
        """A PEFT prefix-tuning checkpoint directory as a prefix for ``model`` (prefixtune/peft_io.py)."""
        from .peft_io import from_peft

        return from_peft(path, model, allow_position_shift)

    def to_peft(self, model, out_dir: str | Path) -> Path:
        """Write this prefix as a PEFT prefix-tuning checkpoint directory (prefixtune/peft_io.py)."""
        from .peft_io import to_peft

        return to_peft(self, model, out_dir)

    def check_compatible(self, model) -> None:
        """Raise a clear error if this prefix was not made for ``model`` (shapes or identity differ)."""
        want = attach.prefix_shapes(model)
        have = {p: tuple(s) for p, s in self.meta.get("shapes", {}).items()}
        for p in self.kv:
            if p not in want.placements:
                raise ValueError(
                    f"prefix has placement {p!r} but model {type(model).__name__} has only {list(want.placements)}"
                )
            if have.get(p) != want.placements[p]:
                raise ValueError(
                    f"prefix shapes do not match the model: prefix {p!r} (layers, kv_heads, head_dim) = "
                    f"{have.get(p)} for base model {self.meta.get('base_model')}, but this model has "
                    f"{want.placements[p]} ({attach.model_identity(model)})"
                )
        for p in self.kv:
            dims = tuple(self.meta.get("head_dims", {}).get(p, (have[p][2], have[p][2])))
            if dims != want.head_dims[p]:
                raise ValueError(f"prefix {p!r} has (key, value) head sizes {dims}, this model {want.head_dims[p]}")
        mine, theirs = self.meta.get("base_model", {}), dict(attach.model_identity(model))
        rule = mine.get("fingerprint_rule", "embeddings/1")  # files of 0.1.0 carry no rule
        if rule != theirs["fingerprint_rule"]:
            theirs.update(fingerprint=attach.fingerprint(model, rule), fingerprint_rule=rule)
        if mine.get("fingerprint") != theirs["fingerprint"] or mine.get("architecture") != theirs["architecture"]:
            raise ValueError(
                f"prefix was trained on base model {mine} but is being used with {theirs}; "
                "a prefix only works with the exact model it was trained on"
            )


def make_meta(model, kv: dict[str, torch.Tensor], config: PrefixConfig | None = None, site: str = "prefix") -> dict:
    dims = attach.prefix_shapes(model).head_dims
    head_dims = {p: list(dims[p]) for p in kv if dims[p][0] != dims[p][1]}
    return {
        **({"head_dims": head_dims} if head_dims else {}),
        "site": site,
        "format": FORMAT,
        "library_version": __version__,
        "base_model": attach.model_identity(model),
        "shapes": {p: [t.shape[0], t.shape[2], t.shape[4]] for p, t in kv.items()},
        "placements": list(kv),
        "length": next(iter(kv.values())).shape[3],
        "positions": POSITIONS,
        "config": config.to_json() if config is not None else None,
    }


def split_layers(kv: torch.Tensor, key_dim: int, value_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[rows, layers, 2, heads, length, width] -> per layer (keys, values), each [rows, heads, length,
    key_dim / value_dim] (the stored width is the larger of the two; see attach.PrefixShapes)."""
    return [(kv[:, i, 0, ..., :key_dim], kv[:, i, 1, ..., :value_dim]) for i in range(kv.shape[1])]


def make_batch(prefixes, device=None, separators=None) -> PrefixBatch | None:
    """One :class:`PrefixBatch` for a batch whose rows use ``prefixes`` (a list of Prefix or None).

    Rows with shorter prefixes or none get masked slots. When every row uses the same prefix it is
    broadcast (1 row, no mask), which costs nothing extra. ``separators``: each row's position of
    the separator token (where y starts to be predicted); needed when a row uses an infix.
    """
    prefixes = list(prefixes)
    if all(p is None for p in prefixes):
        return None
    infix = [p is not None and p.site == "infix" for p in prefixes]
    visible_from = None
    if any(infix):
        if separators is None:
            raise ValueError("an infix needs the separator position of each row (make_batch(..., separators=...))")
        visible_from = torch.tensor([int(s) if i else 0 for s, i in zip(separators, infix)], device=device)
    if all(p is prefixes[0] for p in prefixes):
        kv = {pl: prefixes[0].layer_kv(pl, t[None].to(device)) for pl, t in prefixes[0].kv.items()}
        return PrefixBatch(kv=kv, mask={pl: None for pl in kv}, visible_from=visible_from)
    first = next(p for p in prefixes if p is not None)
    dims = {pl: tuple(first.meta.get("head_dims", {}).get(pl, (t.shape[-1], t.shape[-1]))) for pl, t in first.kv.items()}
    return stack_prefixes([({pl: t.to(device) for pl, t in p.kv.items()} if p is not None else None, 1)
                           for p in prefixes], dims, visible_from)


def stack_prefixes(groups: list[tuple[dict[str, torch.Tensor] | None, int]], head_dims: dict[str, tuple[int, int]],
                   visible_from: torch.Tensor | None = None) -> PrefixBatch:
    """One :class:`PrefixBatch` for consecutive groups of rows, each group ``(P, rows)`` with its own
    P (``{placement: [layers, 2, kv_heads, length, width]}``, or None for no prefix). Shorter prefixes
    and rows without one get masked slots (exact: a masked key gets zero attention weight).
    Differentiable: several trainable prefixes can share one batch (prefixtune/train_many.py)."""
    placements = sorted({pl for kv, _ in groups if kv for pl in kv})
    kv_out, mask = {}, {}
    for pl in placements:
        ref = next(kv[pl] for kv, _ in groups if kv and pl in kv)
        longest = max(kv[pl].shape[3] for kv, _ in groups if kv and pl in kv)
        parts, masks = [], []
        for kv, n in groups:
            t = kv.get(pl) if kv else None
            length = 0 if t is None else t.shape[3]
            t = ref.new_zeros(*ref.shape[:3], longest, ref.shape[4]) if t is None else \
                nn.functional.pad(t, (0, 0, 0, longest - length))
            parts.append(t[None].expand(n, *t.shape))
            masks.append((torch.arange(longest, device=ref.device) < length)[None].expand(n, -1))
        kv_out[pl] = split_layers(torch.cat(parts), *head_dims[pl])
        mask[pl] = torch.cat(masks)
    return PrefixBatch(kv=kv_out, mask=mask, visible_from=visible_from)


# ---------------------------------------------------------------------------------------------
# Trainable prefix


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
            self.embedding = nn.Parameter(torch.randn(config.length, embed_dim))  # P' (nn.Embedding's init)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, config.mlp_hidden), nn.Tanh(), nn.Linear(config.mlp_hidden, width))
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


@dataclass
class PrefixTunerOutput(ModelOutput):
    """``loss`` as configured; ``nll_sum`` (summed NLL of the target tokens), ``nll_rows`` (the same
    per row) and ``n_targets`` (their count) when labels are given; ``logits`` unless
    ``return_logits=False``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None
    n_targets: torch.Tensor | None = None
    nll_rows: torch.Tensor | None = None


class PrefixTuner(nn.Module):
    """A frozen base model plus one trainable prefix.

    The base model is held but not registered as a submodule, so ``tuner.parameters()`` and
    ``tuner.state_dict()`` are the prefix's alone; its weights are frozen and never change.
    ``tuner.train()``/``eval()`` also switch the base model (dropout, gradient checkpointing).
    """

    method = "prefix"

    def __init__(self, model, config: PrefixConfig | None = None, tokenizer=None):
        super().__init__()
        config = config or PrefixConfig()
        self.config = config
        self.__dict__["model"] = model  # not a submodule: see class docstring
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

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

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
            was_training = enc.training
            enc.eval()  # fitted without prefix dropout, so P is the activations themselves
            try:
                with torch.enable_grad():
                    errors[p] = enc.fit(target, self.config.init_steps, self.config.init_lr)
            finally:
                enc.train(was_training)
        return errors

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True,
                **kwargs) -> PrefixTunerOutput:
        """HF-style forward with the loss on target tokens (see :func:`lm_forward`)."""
        return lm_forward(self.model, self.config.loss, input_ids, attention_mask, labels, return_logits,
                          prefix_batch=self.prefix_batch(), **kwargs)

    def save_trained(self, out_dir: str | Path) -> Path:
        """Write what training keeps (the exported prefix) into a run directory."""
        return self.export().save(Path(out_dir) / "prefix.safetensors")

    def num_stored_parameters(self) -> int:
        return sum(t.numel() for t in self.prefix_kv().values())

    def export(self) -> Prefix:
        """Run the MLP once and keep only P_theta (the MLP is dropped)."""
        with torch.no_grad():
            was_training = self.training
            self.eval()  # no prefix dropout in the exported prefix
            kv = {p: t.detach().float().cpu().clone() for p, t in self.prefix_kv().items()}
            self.train(was_training)
            for p, t in kv.items():  # columns past a head's size are never used: store zeros
                kd, vd = attach.prefix_shapes(self.model).head_dims[p]
                t[:, 0, ..., kd:] = 0
                t[:, 1, ..., vd:] = 0
        return Prefix(kv=kv, meta=make_meta(self.model, kv, self.config))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _hidden_size(model) -> int:
    c = model.config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(c, name, None):
            return getattr(c, name)
    return model.get_input_embeddings().weight.shape[1]


def lm_forward(model, reduction: str, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True,
               **kwargs) -> PrefixTunerOutput:
    """One forward of ``model`` with the training loss on the target tokens only (``labels`` != -100),
    for every way of tuning (prefix, infix, prompt, adapters, LoRA, fine-tuning): extra inputs of the
    method (``prefix_batch``, ``inputs_embeds``...) pass through ``kwargs``. ``labels`` align with
    the inputs for decoder-only models (shifted here) and with the decoder inputs for seq2seq.

    ``return_logits=False`` (what training uses) lets decoder-only models apply the LM head to the
    target positions only: the loss never looks at source positions, and the head is a large share
    of a small model's compute and memory. The loss is the same (see :func:`lm_head_split`);
    ``logits`` is then None.
    """
    seq2seq = attach.is_seq2seq(model)
    if seq2seq and labels is not None and "decoder_input_ids" not in kwargs:
        kwargs["decoder_input_ids"] = decoder_inputs_from_labels(model, labels)
    kwargs.update(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    split = None if return_logits or labels is None or seq2seq else lm_head_split(model)
    if split is None:
        logits = model(**kwargs).logits
        if labels is None:
            return PrefixTunerOutput(logits=logits)
        logp, mask = token_logprobs(logits, labels, shift=not seq2seq)
        nll_rows = -logp.sum(-1)
    else:
        body, head = split
        hidden = body(**kwargs).last_hidden_state[:, :-1]  # the state at t predicts token t+1
        mask = labels[:, 1:] != -100
        logp = -nn.functional.cross_entropy(head(hidden[mask]).float(), labels[:, 1:][mask], reduction="none")
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
        nll_rows = torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, -logp)
        logits = None
    nll_sum, n_targets = -logp.sum(), mask.sum()
    loss = _reduce(nll_sum, n_targets, labels.shape[0], reduction)
    return PrefixTunerOutput(loss=loss, logits=logits, nll_sum=nll_sum, n_targets=n_targets, nll_rows=nll_rows)


def decoder_inputs_from_labels(model, labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for seq2seq ``labels`` (teacher forcing): the labels shifted right behind the
    decoder start token, -100 replaced by padding; the model's own rule where it has one."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    config = model.config
    start = config.decoder_start_token_id
    pad = config.pad_token_id
    if start is None or pad is None:
        raise ValueError(f"{type(model).__name__}: needs config.decoder_start_token_id and pad_token_id to "
                         "build decoder inputs from labels")
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == -100, pad)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) (0 where masked) and the mask of real target tokens (labels != -100)."""
    if shift:  # decoder-only: the logit at t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    nll = nn.functional.cross_entropy(
        (logits if logits.dtype == torch.float64 else logits.float()).flatten(0, 1), labels.flatten(),
        ignore_index=-100, reduction="none",
    ).view_as(labels)
    return -nll, mask


@torch.no_grad()
def lm_head_split(model):
    """(body, head) of a decoder-only LM such that ``head(body(...).last_hidden_state)`` are its
    logits, or None when the model does not split that way (e.g. logits scaled or soft-capped
    after the head). Checked once per model on a short input, so any architecture is safe."""
    cached = getattr(model, "_prefixtune_lm_head_split", None)
    if cached is not None:
        return cached or None
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    split = False
    if body is not None and body is not model and head is not None:
        was_training = model.training
        model.eval()
        try:
            ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
            full = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
            split = (body, head) if torch.allclose(full, mine, rtol=1e-4, atol=1e-4) else False
        except Exception:  # any other signature or output type: use the full forward
            split = False
        finally:
            model.train(was_training)
    model._prefixtune_lm_head_split = split
    return split or None


def target_loss(logits, labels, shift: bool, reduction: str = "token_mean") -> torch.Tensor:
    """Negative log-likelihood of the target tokens only (source and padding are masked)."""
    logp, mask = token_logprobs(logits, labels, shift)
    return _reduce(-logp.sum(), mask.sum(), logits.shape[0], reduction)


def _reduce(nll_sum, n_targets, rows: int, reduction: str):
    """token_mean: per target token; sequence_sum: summed per sequence, mean over rows."""
    return nll_sum / n_targets.clamp(min=1) if reduction == "token_mean" else nll_sum / rows
