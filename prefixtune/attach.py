"""How prefixes reach attention, for every architecture.

transformers (5.x) routes every attention layer through a registered *attention function*
``f(module, query, key, value, attention_mask, **kwargs)``; keys and values arrive already
projected, position-encoded (RoPE) and cache-updated, before grouped-query heads are repeated.
That is exactly where the paper's prefix lives, so we register one function, ``"prefixtune"``,
that prepends the prefix keys/values of the current layer and widens the mask, then calls the
model's own implementation (sdpa, or the modeling file's eager function). We do not use
``past_key_values``: it is a cache, being removed as a forward argument, and cannot carry a
different prefix per batch row.

The prefixes of a batch travel as one forward keyword argument, ``prefix_batch`` (a
:class:`PrefixBatch`). transformers passes unknown keyword arguments down to the attention
function (and through ``generate`` and gradient checkpointing), so nothing is stored on the
model between calls and concurrent callers cannot see each other's prefixes.

Positions: a prefix has no position. Real tokens keep positions 0..n-1 exactly as without a
prefix (no shift), in training, scoring and generation alike, so no input can overflow the
model's maximum positions because of the prefix. Keys of a prefix are used as they are (for
RoPE models they are post-rotation keys, learned directly).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import TransformersKwargs

IMPLEMENTATION = "prefixtune"
# The three places a prefix can sit. Decoder-only models only have "self".
PLACEMENTS_CAUSAL = ("self",)
PLACEMENTS_SEQ2SEQ = ("encoder", "decoder", "cross")


@dataclass
class PrefixBatch:
    """Prefix keys/values for one batch, per placement and layer.

    ``kv[placement][layer] = (keys, values)`` with shape ``[rows, kv_heads, length, head_dim]``.
    ``rows`` is 1 (one prefix shared by the whole batch, broadcast without copying) or the batch
    size. ``mask`` is ``[rows, length]`` (True where a row really has a prefix slot) or None when
    every row uses all ``length`` slots; rows with shorter prefixes or none are padded with
    masked slots, which is exact: a masked key gets zero attention weight.

    ``visible_from`` (infix-tuning, decoder-only): ``[rows]``, the first token position of each row
    whose query may see the row's slots (0 = all, a prefix). Infix-tuning's [x; INFIX; y] places
    the trainable positions after the source: x's tokens cannot attend to them, the separator and y
    can. Since these positions have no position encoding of their own, hiding them from x's queries
    is all that differs from a prefix.
    """

    kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    mask: dict[str, torch.Tensor | None]
    visible_from: torch.Tensor | None = None
    _expanded: dict = field(default_factory=dict, repr=False)

    def expanded(self, key, t: torch.Tensor, rows: int) -> torch.Tensor:
        """``t`` matched to ``rows`` attention rows, kept for the next decoding steps: generate()
        calls every layer once per step with the same batch, so beams are expanded only once."""
        hit = self._expanded.get(key)
        if hit is None or hit.shape[0] != rows or hit.dtype != t.dtype:
            hit = self._expanded[key] = _expand_rows(t, rows)
        return hit

    def slot_mask(self, placement: str, rows: int, length: int, device) -> torch.Tensor:
        """``[rows, length]``: which prefix slots each attention row may see (built once per batch)."""
        hit = self._expanded.get(("mask", placement))
        if hit is None or hit.shape[0] != rows:
            m = self.mask[placement]
            m = torch.ones(1, length, dtype=torch.bool, device=device) if m is None else m
            hit = self._expanded[("mask", placement)] = _expand_rows(m, rows)
        return hit


@dataclass(frozen=True)
class PrefixShapes:
    """What a prefix must look like for one base model: per placement, layers x kv_heads x head_dim."""

    placements: dict[str, tuple[int, int, int]]  # placement -> (layers, kv_heads, head_dim)

    def width(self, placement: str) -> int:
        layers, heads, dim = self.placements[placement]
        return layers * 2 * heads * dim

    def to_json(self) -> dict:
        return {p: list(s) for p, s in self.placements.items()}


# ---------------------------------------------------------------------------------------------
# The attention function


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Match a prefix tensor's first dim to the attention batch (1 -> broadcast; beams -> repeat)."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    if rows % t.shape[0]:
        raise ValueError(f"prefix batch has {t.shape[0]} rows but attention batch has {rows}")
    # generate() expands each input to num_beams * num_return_sequences adjacent rows
    return t.repeat_interleave(rows // t.shape[0], dim=0)


def _full_mask(module, kwargs, query, key, attention_mask):
    """The boolean [B, 1, Q, K] mask that ``attention_mask`` stands for (None means causal or full)."""
    b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0  # additive float mask: 0 = attend, very negative = not
        return attention_mask[:, :, :, :k_len].expand(b, 1, q_len, k_len)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if causal and q_len > 1:
        # queries are the last q_len positions of the keys (cache in front)
        i = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        j = torch.arange(k_len, device=query.device)[None, :]
        return (j <= i).expand(b, 1, q_len, k_len)
    return torch.ones(b, 1, q_len, k_len, dtype=torch.bool, device=query.device)


def _decode_step_attention(module, query, key, value, mask, pk, pv, pmask, kwargs):
    """One decoding step (a single query per row) without concatenating the prefix to the cache.

    ``torch.cat([prefix, cache])`` at every step and layer copies the whole cache, which costs
    more than the attention itself once the prefix is long (200 positions). Here the scores of the
    prefix and of the cache are computed separately and share one softmax; the result equals
    the concatenated attention (tested). ``pk``/``pv`` are ``[1 or rows, kv_heads, L, dim]``: a
    shared prefix is never copied per row. Returns what sdpa_attention_forward returns.
    """
    rows, heads, _, dim = query.shape
    kv_heads, dtype = key.shape[1], key.dtype
    g = heads // kv_heads
    scale = kwargs.get("scaling") or dim**-0.5
    # matmuls in the model's dtype (no copy of the cache), softmax in float32
    q = query.view(rows, kv_heads, g, dim)
    pk, pv = pk.to(dtype), pv.to(dtype)
    scores = (q @ key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, g, T]
    if pk.shape[0] == 1:  # one prefix for all rows: fold rows into the matmul's M dimension
        qf = q.transpose(0, 1).reshape(kv_heads, rows * g, dim)
        pscores = (qf @ pk[0].transpose(-1, -2)).view(kv_heads, rows, g, -1).transpose(0, 1)
    else:
        pscores = q @ pk.transpose(-1, -2)  # [rows, kv_heads, g, L]
    pscores = pscores.float() * scale
    neg = torch.finfo(torch.float32).min
    scores = scores.masked_fill(~mask, neg)  # mask [rows, 1, 1, T]
    pscores = pscores.masked_fill(~pmask[:, None, None, :], neg)  # pmask [rows, L]
    top = torch.maximum(scores.amax(-1, keepdim=True), pscores.amax(-1, keepdim=True))
    scores, pscores = (scores - top).exp(), (pscores - top).exp()
    total = scores.sum(-1, keepdim=True) + pscores.sum(-1, keepdim=True)
    scores, pscores = scores.to(dtype), pscores.to(dtype)
    if pv.shape[0] == 1:
        pout = (pscores.transpose(0, 1).reshape(kv_heads, rows * g, -1) @ pv[0]).view(kv_heads, rows, g, dim).transpose(0, 1)
    else:
        pout = pscores @ pv
    out = ((scores @ value).float() + pout.float()) / total  # [rows, kv_heads, g, dim]
    return out.reshape(rows, 1, heads, dim).to(query.dtype), None


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    base = module._prefixtune_base
    batch: PrefixBatch | None = kwargs.pop("prefix_batch", None)
    slot = getattr(module, "_prefixtune_slot", None)
    record = kwargs.pop("prefix_record", None)
    if record is not None and slot is not None:  # see record_kv
        record.setdefault(slot[0], {})[slot[1]] = (key.detach(), value.detach())
    if batch is None or slot is None or slot[0] not in batch.kv:
        return base(module, query, key, value, attention_mask, **kwargs)
    placement, layer = slot
    pk, pv = batch.kv[placement][layer]
    rows, length = query.shape[0], pk.shape[2]
    mask = _full_mask(module, kwargs, query, key, attention_mask)
    pmask = batch.slot_mask(placement, rows, length, query.device)
    q_len, k_len = query.shape[2], key.shape[2]
    if batch.visible_from is not None:  # infix: queries before the infix do not see it
        seen = (torch.arange(k_len - q_len, k_len, device=query.device)[None, :]
                >= _expand_rows(batch.visible_from.to(query.device), rows)[:, None])  # [rows, q_len]
    if (q_len == 1 and FAST_DECODE and base is _SDPA and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not (module.training and kwargs.get("dropout"))):
        if pk.shape[0] != 1:  # per-row prefixes: match the rows (beams) once per generate call
            pk = batch.expanded(("k", placement, layer), pk, rows)
            pv = batch.expanded(("v", placement, layer), pv, rows)
        if batch.visible_from is not None:
            pmask = pmask & seen
        return _decode_step_attention(module, query, key, value, mask, pk, pv, pmask, kwargs)
    pk = _expand_rows(pk, rows).to(key.dtype)
    pv = _expand_rows(pv, rows).to(value.dtype)
    pmask = pmask[:, None, None, :].expand(rows, 1, q_len, length)
    if batch.visible_from is not None:
        pmask = pmask & seen[:, None, :, None]
    mask = torch.cat([pmask, mask], dim=-1)
    if module._prefixtune_additive_mask:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: relative position bias; a prefix has no position, so no bias
        pad = bias.new_zeros(*bias.shape[:-1], length)
        kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
    kwargs["is_causal"] = False  # the explicit mask carries causality
    key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    if (CPU_GQA and base is _SDPA and query.device.type == "cpu" and key.shape[1] != query.shape[1] and bias is None
            and kwargs.get("softcap") is None):
        # grouped-query attention with a mask: transformers repeats the key/value heads first (its
        # GPU kernels need that); torch's CPU kernels take the groups directly, same result, ~3x faster
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return base(module, query, key, value, mask, **kwargs)


_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
# Decoding steps use _decode_step_attention (no prefix re-concatenation); False = always concatenate.
FAST_DECODE = True
# Grouped-query attention with a prefix mask on CPU calls torch's kernel with enable_gqa; False =
# transformers' sdpa function (which repeats the key/value heads). Both switches exist for tests.
CPU_GQA = True
AttentionInterface.register(IMPLEMENTATION, prefix_attention)
# generate() rejects keyword arguments that are neither in forward's signature nor declared
# transformers kwargs (those travel down to attention); declare ours as one.
TransformersKwargs.__optional_keys__ = frozenset(TransformersKwargs.__optional_keys__ | {"prefix_batch", "prefix_record"})
# Masks for our function are built the way sdpa builds them (boolean, or None when causal).
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# Finding the attention layers of a model


def _is_attention(module: nn.Module) -> bool:
    # innermost module whose class is an "...Attention": LlamaAttention, GPT2Attention,
    # BartAttention, T5Attention (not T5LayerSelfAttention, which wraps one)
    if not type(module).__name__.endswith("Attention"):
        return False
    return not any(type(c).__name__.endswith("Attention") for c in module.modules() if c is not module)


def _placement(name: str, is_seq2seq: bool) -> str:
    if not is_seq2seq:
        return "self"
    if name.startswith("encoder.") or ".encoder." in name:
        return "encoder"
    cross = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")
    return "cross" if any(c in name for c in cross) else "decoder"


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def placements_of(model) -> tuple[str, ...]:
    return PLACEMENTS_SEQ2SEQ if is_seq2seq(model) else PLACEMENTS_CAUSAL


def attention_slots(model) -> dict[str, list[nn.Module]]:
    """Attention modules of the model, per placement, in layer order."""
    slots: dict[str, list[nn.Module]] = {p: [] for p in placements_of(model)}
    s2s = is_seq2seq(model)
    for name, module in model.named_modules():
        if _is_attention(module):
            # the shared encoder of some seq2seq models appears under two names; count it once
            placed = slots[_placement(name, s2s)]
            if all(m is not module for m in placed):
                placed.append(module)
    empty = [p for p, mods in slots.items() if not mods]
    if empty:
        raise ValueError(
            f"{type(model).__name__}: found no attention layers for placement(s) {empty}; "
            "prefixtune supports models whose attention goes through transformers' attention interface"
        )
    return slots


def enable(model) -> None:
    """Route the model's attention through :func:`prefix_attention`. Idempotent.

    Without a ``prefix_batch`` argument the model computes exactly what it did before (the
    original implementation is called unchanged); its weights are never touched.
    """
    config = model.config
    if config._attn_implementation == IMPLEMENTATION:
        return
    original = config._attn_implementation or "eager"
    for placement, modules in attention_slots(model).items():
        for layer, module in enumerate(modules):
            if original == "eager":
                # each modeling file has its own eager function (T5's adds a position bias)
                base = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
            else:
                base = _SDPA
            module._prefixtune_base = base
            module._prefixtune_additive_mask = original == "eager"
            module._prefixtune_slot = (placement, layer)
    model._prefixtune_original_attn = original
    # some models give sub-stacks their own config copy (T5's encoder and decoder): switch them all
    for sub in {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}.values():
        if hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = IMPLEMENTATION


# ---------------------------------------------------------------------------------------------
# Recording keys/values: shapes of a model, and activations of real words for initialisation


@torch.no_grad()
def record_kv(model, input_ids: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Keys/values ``[1, kv_heads, T, head_dim]`` that each attention layer computes for ``input_ids`` [1, T].

    For seq2seq models the same ids feed the encoder and the decoder, so "cross" holds the
    projections of the encoder's output for them.
    """
    enable(model)
    record: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    kwargs = dict(input_ids=input_ids, use_cache=False, prefix_record=record)
    if is_seq2seq(model):
        kwargs["decoder_input_ids"] = input_ids
    was_training = model.training
    model.eval()
    try:
        model(**kwargs)
    finally:
        model.train(was_training)
    return {p: [layers[i] for i in range(len(layers))] for p, layers in record.items()}


def prefix_shapes(model) -> PrefixShapes:
    """Per placement (layers, kv_heads, head_dim), measured on a 2-token forward (exact for any architecture)."""
    cached = getattr(model, "_prefixtune_shapes", None)
    if cached is not None:
        return cached
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device)
    kv = record_kv(model, ids)
    shapes = PrefixShapes({p: (len(layers), layers[0][0].shape[1], layers[0][0].shape[3]) for p, layers in kv.items()})
    model._prefixtune_shapes = shapes
    return shapes


def model_identity(model) -> dict:
    """Name, architecture and a fingerprint of the weights (a hash of part of the input embeddings)."""
    cached = getattr(model, "_prefixtune_identity", None)
    if cached is not None:
        return cached
    emb = model.get_input_embeddings().weight.detach()
    # rounded to bfloat16 so that the same weights loaded in float32, float16 or bfloat16 match
    sample = emb[: min(64, emb.shape[0])].to(torch.bfloat16).float().cpu().contiguous()
    digest = hashlib.sha256(sample.numpy().tobytes() + str(tuple(emb.shape)).encode()).hexdigest()[:16]
    identity = {
        "name": getattr(model, "_prefixtune_name", None) or model.config.name_or_path,
        "architecture": type(model).__name__,
        "fingerprint": digest,
    }
    model._prefixtune_identity = identity
    return identity
