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

Masks: every model builds its mask through transformers' mask interface for its attention
implementation. Ours dispatches to the mask function of the implementation the model had (sdpa:
boolean or None; eager: additive float; flash: the 2-D padding mask), so a call without a prefix
gets exactly the mask and function it had before. A call with a prefix turns that mask into a
boolean one, widens it by the prefix slots and runs sdpa or the modeling file's eager function.

Which models: :func:`enable` does not trust class names. It runs a 2-row probe before and after
switching the model to our function: every attention module the forward calls must receive our
keyword arguments, and the logits without a prefix must not change. Otherwise the switch is undone
and :class:`UnsupportedModelError` names the architecture and the reason (e.g. StableLM's decoder
layer does not pass keyword arguments to attention; Bloom and GPT-Neo compute attention outside
the interface). Attention modules the text forward never calls (a multimodal model's vision tower)
get no prefix.

Positions: a prefix has no position. Real tokens keep positions 0..n-1 exactly as without a
prefix (no shift), in training, scoring and generation alike, so no input can overflow the
model's maximum positions because of the prefix. Keys of a prefix are used as they are (for
RoPE models they are post-rotation keys, learned directly).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, \
    flash_attention_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import TransformersKwargs

from .modes import eval_mode

log = logging.getLogger("prefixtune")

IMPLEMENTATION = "prefixtune"
# The three places a prefix can sit. Decoder-only models only have "self".
PLACEMENTS_CAUSAL = ("self",)
PLACEMENTS_SEQ2SEQ = ("encoder", "decoder", "cross")


class UnsupportedModelError(ValueError):
    """A model (or setting) prefixtune cannot put a prefix on; the message names it and says why."""


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

    def select(self, rows: torch.Tensor) -> "PrefixBatch":
        """The batch of rows ``rows`` only (a prefix shared by all rows stays shared)."""
        def pick(t):
            return t if t is None or t.shape[0] == 1 else t.index_select(0, rows.to(t.device))

        return PrefixBatch(kv={p: [(pick(k), pick(v)) for k, v in layers] for p, layers in self.kv.items()},
                           mask={p: pick(m) for p, m in self.mask.items()}, visible_from=pick(self.visible_from))

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
    """What a prefix must look like for one base model, per placement.

    ``placements[p] = (layers, kv_heads, head_dim)``: head_dim is the width a prefix file stores,
    the larger of the key and value head sizes. ``head_dims[p] = (key, value)`` head sizes; they
    differ only for multi-head latent attention (DeepSeek-V2/V3: keys 192, values 128), where the
    narrower one uses the first columns of the stored width.
    """

    placements: dict[str, tuple[int, int, int]]
    head_dims: dict[str, tuple[int, int]]


@dataclass
class _Hook:
    """Per attention module: where its prefix comes from and which functions run it.

    ``plain``: the function the model had (what runs without a prefix); ``with_prefix``: what runs
    with one (the modeling file's eager function, or sdpa); ``mask_kind``: the form of the mask the
    model builds for ``plain`` ("bool", "additive" or "padding")."""

    slot: tuple[str, int] | None
    plain: object
    with_prefix: object
    mask_kind: str


@dataclass
class ModelState:
    """Everything prefixtune keeps on a model, in one attribute (``model._prefixtune``, see
    :func:`model_state`); the rest lives on the configs (``_prefixtune_original``: the implementation
    each had) and the attention modules (``_prefixtune_hook``), where the attention function finds it.

    ``original``, ``slots``, ``shapes``: what :func:`enable` found (None before, and after
    :func:`disable`); ``identity``: (weights version, identity), see :func:`model_identity`;
    ``name``: the name the model was loaded by (:func:`prefixtune.load_base_model`);
    ``lm_head_split``: the verdict of :func:`prefixtune.loss.lm_head_split` (None: not checked yet)."""

    original: str | None = None
    slots: dict[str, list[nn.Module]] | None = None
    shapes: PrefixShapes | None = None
    identity: tuple[int, dict] | None = None
    name: str | None = None
    lm_head_split: object = None


# Attention implementations whose masks we know how to widen: name of their mask function -> kind.
_MASK_KINDS = {sdpa_mask: "bool", eager_mask: "additive", flash_attention_mask: "padding"}


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


def _full_mask(module, kwargs, query, key, attention_mask, kind: str):
    """The boolean [B, 1, Q, K] mask that ``attention_mask`` stands for: a boolean or additive 4-D
    mask, or None (causal or full); for ``kind`` "padding" (flash implementations) a 2-D padding
    mask or None, with causality and the sliding window left to the kernel (module, keyword args)."""
    b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.ndim == 4:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0  # additive float mask: 0 = attend, very negative = not
        return attention_mask[:, :, :, :k_len].expand(b, 1, q_len, k_len)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # queries are the last q_len positions of the keys (cache in front)
    i = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=query.device)[None, :]
    mask = (j <= i) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    window = kwargs.get("sliding_window")
    if window and kind == "padding":  # other implementations have the window in their mask already
        mask = mask & (i - j < window)
    mask = mask.expand(b, 1, q_len, k_len)
    if attention_mask is not None:  # [B, K] padding, True/1 = a real token
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    return mask


def _decode_step_attention(module, query, key, value, mask, pk, pv, pmask, kwargs):
    """One decoding step (a single query per row) without concatenating the prefix to the cache.

    ``torch.cat([prefix, cache])`` at every step and layer copies the whole cache, which costs
    more than the attention itself once the prefix is long (200 positions). Here the scores of the
    prefix and of the cache are computed separately and share one softmax; the result equals
    the concatenated attention (tested). ``pk``/``pv`` are ``[1 or rows, kv_heads, L, dim]``: a
    shared prefix is never copied per row. Returns what sdpa_attention_forward returns.
    """
    rows, heads, _, dim = query.shape
    kv_heads, dtype, vdim = key.shape[1], key.dtype, value.shape[-1]
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
        pout = (pscores.transpose(0, 1).reshape(kv_heads, rows * g, -1) @ pv[0]).view(kv_heads, rows, g, vdim).transpose(0, 1)
    else:
        pout = pscores @ pv
    out = ((scores @ value).float() + pout.float()) / total  # [rows, kv_heads, g, vdim]
    return out.reshape(rows, 1, heads, vdim).to(query.dtype), None


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    hook = _hook(module)
    batch: PrefixBatch | None = kwargs.pop("prefix_batch", None)
    record = kwargs.pop("prefix_record", None)
    if record is not None:  # see _probe and record_kv
        record[module] = (key.detach(), value.detach())
    slot = hook.slot
    if batch is None or slot is None or slot[0] not in batch.kv:
        return hook.plain(module, query, key, value, attention_mask, **kwargs)
    placement, layer = slot
    base = hook.with_prefix
    pk, pv = batch.kv[placement][layer]
    rows, length = query.shape[0], pk.shape[2]
    mask = _full_mask(module, kwargs, query, key, attention_mask, hook.mask_kind)
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
    if base is not _SDPA:  # the modeling file's eager function adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: relative position bias; a prefix has no position, so no bias
        pad = bias.new_zeros(*bias.shape[:-1], length)
        kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
    kwargs["is_causal"] = False  # the explicit mask carries causality
    kwargs.pop("sliding_window", None)  # and the window
    key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    gqa = key.shape[1] != query.shape[1]
    if base is _SDPA and query.device.type == "cpu" and bias is None and kwargs.get("softcap") is None and (
            CPU_GQA or not gqa):
        # grouped-query attention with a mask: transformers repeats the key/value heads first (its
        # GPU kernels need that); torch's CPU kernels take the groups directly, same result, ~3x faster.
        # With gradients, a bfloat16/float16 model's attention runs in float32 here: the CPU kernel's
        # low-precision backward is ~3x slower than its float32 one (and less exact)
        # (and under bfloat16 autocast, whose CPU policy would cast it back to bfloat16).
        # Not caught: a float32 model under bfloat16 autocast whose rotary embedding returns float32
        # query and key beside a bfloat16 value (Llama-style models): autocast then runs the kernel in
        # bfloat16, as it does transformers' own attention for methods without a prefix. The findings
        # grid (issue 11) trains so; changing it would change the numerics of its prefix runs mid-grid.
        # (On a CPU without bfloat16 kernels, cpu_bf16.Float32Products runs that attention in float32.)
        low = CPU_FP32_BACKWARD and query.dtype != torch.float32 and torch.is_grad_enabled()
        q, k, v = (t.float() for t in (query, key, value)) if low else (query, key, value)
        with torch.autocast("cpu", enabled=not low and torch.is_autocast_enabled("cpu")):
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"), enable_gqa=gqa)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return base(module, query, key, value, mask, **kwargs)


def _prefix_mask(*args, config=None, **kwargs):
    """Our mask interface: the mask the model's own implementation would get (see module doc)."""
    original = getattr(config, "_prefixtune_original", None) or "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, config=config, **kwargs)


_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
# Decoding steps use _decode_step_attention (no prefix re-concatenation); False = always concatenate.
FAST_DECODE = True
# Grouped-query attention with a prefix mask on CPU calls torch's kernel with enable_gqa; False =
# transformers' sdpa function (which repeats the key/value heads). Training a low-precision model on
# CPU runs the prefixed attention in float32 (see prefix_attention); False = in the model's dtype.
# The switches exist for tests and benchmarks.
CPU_GQA = True
CPU_FP32_BACKWARD = True
AttentionInterface.register(IMPLEMENTATION, prefix_attention)
# generate() rejects keyword arguments that are neither in forward's signature nor declared
# transformers kwargs (those travel down to attention); declare ours as one.
TransformersKwargs.__optional_keys__ = frozenset(TransformersKwargs.__optional_keys__ | {"prefix_batch", "prefix_record"})
AttentionMaskInterface.register(IMPLEMENTATION, _prefix_mask)


def _hook(module) -> _Hook:
    """The module's hook, made on its first call: the functions follow the implementation its
    config had before :func:`enable` switched it."""
    hook = module.__dict__.get("_prefixtune_hook")
    if hook is None:
        original = getattr(getattr(module, "config", None), "_prefixtune_original", None)
        if original is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} calls the attention interface without a config prefixtune switched; "
                "prefixtune cannot tell which implementation it had")
        kind = _MASK_KINDS[ALL_MASK_ATTENTION_FUNCTIONS[original]]
        plain = with_prefix = _SDPA
        if original == "eager":
            # each modeling file has its own eager function (T5's adds a position bias)
            plain = with_prefix = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if plain is None:
                raise UnsupportedModelError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
        elif original != "sdpa":
            plain = ALL_ATTENTION_FUNCTIONS[original]
        hook = module.__dict__["_prefixtune_hook"] = _Hook(None, plain, with_prefix, kind)
    return hook


# ---------------------------------------------------------------------------------------------
# Switching a model to prefixtune: which modules, checked by a probe


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def placements_of(model) -> tuple[str, ...]:
    return PLACEMENTS_SEQ2SEQ if is_seq2seq(model) else PLACEMENTS_CAUSAL


def attention_modules(model) -> dict[str, list[nn.Module]]:
    """Every innermost ``...Attention`` module per placement, in model order, by class name (what
    adapters attach to; :func:`attention_slots` has the ones that get a prefix)."""
    s2s = is_seq2seq(model)
    found: dict[str, list[nn.Module]] = {p: [] for p in placements_of(model)}
    seen = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("Attention") and id(module) not in seen and not any(
                type(c).__name__.endswith("Attention") for c in module.modules() if c is not module):
            seen.add(id(module))  # the shared encoder of some seq2seq models appears under two names
            found[_placement(name, s2s)].append(module)
    return found


def _placement(name: str, is_seq2seq: bool) -> str:
    if not is_seq2seq:
        return "self"
    if name.startswith("encoder.") or ".encoder." in name:
        return "encoder"
    cross = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")
    return "cross" if any(c in name for c in cross) else "decoder"


def _configs(model) -> list:
    """Every config object of the model and its submodules (some sub-stacks hold their own copy,
    multimodal models a text and a vision config), each one before its sub-configs."""
    found = {}
    for c in [model.config] + [getattr(m, "config", None) for m in model.modules()]:
        stack = [c]
        while stack:
            c = stack.pop()
            if c is None or id(c) in found or not hasattr(c, "_attn_implementation"):
                continue
            found[id(c)] = c
            stack += [getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {}]
    return list(found.values())


def model_state(model) -> ModelState:
    """prefixtune's state on ``model`` (made on first use)."""
    state = getattr(model, "_prefixtune", None)  # (getattr: an FSDP wrapper passes it through)
    if state is None:
        state = model._prefixtune = ModelState()
    return state


def _state(model) -> ModelState | None:
    """The state of an enabled model; None when :func:`enable` has not run on it."""
    state = getattr(model, "_prefixtune", None)
    return state if state is not None and state.slots is not None else None


def _probe_inputs(model) -> dict:
    """Two rows of 4 tokens, the second right-padded by one, so the probe exercises the padding mask."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device) % vocab
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], device=device)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    if is_seq2seq(model):
        kw["decoder_input_ids"] = ids.flip(-1)
    return kw


@torch.no_grad()
def _run(model, **kwargs):
    with eval_mode(model):
        return model(**kwargs)


def enable(model) -> None:
    """Route the model's attention through :func:`prefix_attention`. Idempotent.

    Without a ``prefix_batch`` argument the model computes exactly what it did before (its own
    implementation is called with the mask it built for it); its weights are never touched. A model
    that cannot take a prefix (see the module doc) is left as it was and
    :class:`UnsupportedModelError` says why.
    """
    if _state(model) is not None:
        return
    arch = type(model).__name__
    configs = _configs(model)
    original = model.config._attn_implementation or "eager"
    for c in configs:
        impl = c._attn_implementation or "eager"
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
        if mask_fn not in _MASK_KINDS:
            raise UnsupportedModelError(
                f"{arch} uses attn_implementation={impl!r}, whose masks prefixtune cannot widen by prefix slots; "
                "load the model with attn_implementation='sdpa' (or 'eager')")
    inputs = _probe_inputs(model)
    try:
        before = _run(model, **inputs).logits.float()
    except Exception as e:
        raise UnsupportedModelError(f"{arch}: a plain forward on token ids failed ({type(e).__name__}: {e}); "
                                    "prefixtune supports text-only causal and encoder-decoder LMs") from e
    originals = [c._attn_implementation or "eager" for c in configs]  # before any switch: a config's
    for c, impl in zip(configs, originals):  # setter also switches its sub-configs
        c._prefixtune_original = impl
        c._attn_implementation = IMPLEMENTATION
    try:
        slots, shapes = _probe(model, inputs, before)
    except Exception:
        disable(model)
        raise
    if _MASK_KINDS[ALL_MASK_ATTENTION_FUNCTIONS[original]] == "padding":
        log.warning("%s: attention with a prefix runs sdpa with an explicit mask (%s kernels take no such mask); "
                    "calls without a prefix keep %s", arch, original, original)
    state = model_state(model)
    state.original, state.slots, state.shapes, state.identity = original, slots, shapes, None


def disable(model) -> None:
    """Undo :func:`enable` (the model's configs and modules as they were)."""
    for c in _configs(model):
        original = c.__dict__.pop("_prefixtune_original", None)
        if original is not None:
            c._attn_implementation = original
    for m in model.modules():
        m.__dict__.pop("_prefixtune_hook", None)
    state = getattr(model, "_prefixtune", None)
    if state is not None:
        state.original = state.slots = state.shapes = state.identity = None


def _probe(model, inputs: dict, before: torch.Tensor) -> tuple[dict[str, list[nn.Module]], PrefixShapes]:
    """Which attention modules get a prefix, and their shapes; raises UnsupportedModelError (see enable)."""
    arch = type(model).__name__
    named = [m for mods in attention_modules(model).values() for m in mods]
    called: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, *_: called.append(m)) for m in named]
    record: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        after = _run(model, **inputs, prefix_record=record).logits.float()
    except Exception as e:
        raise UnsupportedModelError(f"{arch}: a forward through prefixtune's attention function failed "
                                    f"({type(e).__name__}: {e})") from e
    finally:
        for h in handles:
            h.remove()
    missed = [type(m).__name__ for m in dict.fromkeys(called) if m not in record]
    if missed and any(m in record for m in called):
        raise UnsupportedModelError(
            f"{arch}: {len(missed)} of its attention modules ({missed[0]}, ...) do not reach transformers' attention "
            "interface with the forward's keyword arguments, so a prefix cannot reach them")
    if missed:
        raise UnsupportedModelError(
            f"{arch}: its attention modules ({missed[0]}) do not receive the forward's keyword arguments (its "
            "layers do not pass **kwargs down to attention, or compute attention in their own code), so a prefix "
            "cannot reach them")
    if not record:
        raise UnsupportedModelError(
            f"{arch}: none of its layers goes through transformers' attention interface with the forward's keyword "
            "arguments, so a prefix cannot reach them")
    scale = 1e-4 * (1.0 + before.abs().max())
    if before.shape != after.shape or not torch.allclose(before, after, rtol=1e-4, atol=float(scale)):
        diff = (before - after).abs().max() if before.shape == after.shape else "shape"
        raise UnsupportedModelError(
            f"{arch}: switching its attention to prefixtune changes its output without a prefix (max logit "
            f"difference {float(diff):.3g}): its code takes another path when the attention implementation is "
            "not its own")
    # the modules that got our arguments, per placement, in model order (by name: some classes that
    # call the interface are not named "...Attention")
    s2s = is_seq2seq(model)
    slots: dict[str, list[nn.Module]] = {p: [] for p in placements_of(model)}
    seen = set()
    for name, module in model.named_modules():
        if module in record and id(module) not in seen:
            seen.add(id(module))
            slots[_placement(name, s2s)].append(module)
    empty = [p for p, mods in slots.items() if not mods]
    if empty:
        raise UnsupportedModelError(f"{arch}: found no attention layers for placement(s) {empty}")
    placements, head_dims = {}, {}
    for p, mods in slots.items():
        k, v = record[mods[0]]
        for layer, m in enumerate(mods):
            km, vm = record[m]
            if km.shape[1] != k.shape[1] or km.shape[3] != k.shape[3] or vm.shape[3] != v.shape[3]:
                raise UnsupportedModelError(
                    f"{arch}: its {p} attention layers differ in key/value heads or head size (layer 0: "
                    f"{k.shape[1]} heads of {k.shape[3]}/{v.shape[3]}, layer {layer}: {km.shape[1]} of "
                    f"{km.shape[3]}/{vm.shape[3]}); a prefix file has one shape per placement")
            _hook(m).slot = (p, layer)
        placements[p] = (len(mods), k.shape[1], max(k.shape[3], v.shape[3]))
        head_dims[p] = (k.shape[3], v.shape[3])
    return slots, PrefixShapes(placements, head_dims)


def attention_slots(model) -> dict[str, list[nn.Module]]:
    """Attention modules that get a prefix, per placement, in layer order (enables the model)."""
    enable(model)
    return _state(model).slots


def prefix_shapes(model) -> PrefixShapes:
    """Per placement (layers, kv_heads, head_dim), as the probe of :func:`enable` measured them."""
    enable(model)
    return _state(model).shapes


# ---------------------------------------------------------------------------------------------
# Recording keys/values: activations of real words for initialisation


@torch.no_grad()
def record_kv(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
              ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Keys/values ``[1, kv_heads, T, head_dim]`` that each prefixed attention layer computes for
    ``input_ids`` [1, T] (at ``position_ids``, default 0..T-1).

    For seq2seq models the same ids feed the encoder and the decoder, so "cross" holds the
    projections of the encoder's output for them.
    """
    enable(model)
    record: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    kwargs = dict(input_ids=input_ids, use_cache=False, prefix_record=record)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if is_seq2seq(model):
        kwargs["decoder_input_ids"] = input_ids
    _run(model, **kwargs)
    return {p: [record[m] for m in mods] for p, mods in _state(model).slots.items()}


# ---------------------------------------------------------------------------------------------
# Which model a prefix belongs to


FINGERPRINT_RULE = "weights-sample/2"


def model_identity(model, pin: bool = False) -> dict:
    """Name, architecture and a fingerprint of the weights (see :func:`fingerprint`).

    Kept on an enabled model until a weight is replaced or changed in place (a copy, a fine-tune).
    ``pin``: keep it regardless (taken from the full weights before FSDP shards them)."""
    state = _state(model)
    version = -1 if state is not None and state.identity and state.identity[0] == -1 else _weights_version(model)
    if state is not None and state.identity is not None and state.identity[0] == version:
        return state.identity[1]
    identity = {
        "name": model_state(model).name or model.config.name_or_path,
        "architecture": type(model).__name__,
        "fingerprint": fingerprint(model),
        "fingerprint_rule": FINGERPRINT_RULE,
    }
    if state is not None:
        state.identity = (-1 if pin else version, identity)
    return identity


def _weights_version(model) -> int:
    """Changes when a parameter is replaced or modified in place (torch counts in-place writes)."""
    return hash(tuple((id(p), p._version) for p in model.parameters()))


@torch.no_grad()
def fingerprint(model, rule: str = FINGERPRINT_RULE) -> str:
    """A hash of the weights, the same whether they are loaded in float32, float16 or bfloat16.

    ``weights-sample/2``: every parameter tensor's name and shape and 64 of its values, taken at
    evenly spaced flat positions and rounded to bfloat16. A fine-tune, a merged LoRA or another
    checkpoint of the same architecture changes sampled values in almost every tensor, so it
    differs; what it cannot see is a change smaller than bfloat16's rounding (about 0.4% of a
    weight) at every sampled position, or a change confined to unsampled positions.
    ``embeddings/1`` (files written before 0.1.1): the first 64 rows of the input embeddings.
    """
    h = hashlib.sha256()
    if rule == "embeddings/1":
        emb = model.get_input_embeddings().weight.detach()
        sample = emb[: min(64, emb.shape[0])].to(torch.bfloat16).float().cpu().contiguous()
        h.update(sample.numpy().tobytes() + str(tuple(emb.shape)).encode())
        return h.hexdigest()[:16]
    if rule != FINGERPRINT_RULE:
        raise ValueError(f"unknown fingerprint rule {rule!r}")
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        k = min(64, flat.numel())
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(1, k - 1)  # exact in int64
        values = flat[idx].to(torch.bfloat16).float().cpu().contiguous()
        h.update(name.encode() + str(tuple(p.shape)).encode() + values.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def words_kv(model, ids: list[int]) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], bool]:
    """Keys/values of the words ``ids`` for a words-initialised prefix, and whether they are exactly
    "the words in front of the input".

    The input keeps positions 0..; words in front of it sit at -n..-1. Decoder-only models whose
    positions are relative (RoPE) see only differences of positions, so recording the words at
    -n..-1 makes the prefix equal to running [words; x] as one text. That is checked here on a probe
    input (a model may look positions up in a table, where -1 is not a position: GPT-J, CodeGen) and
    used only if it holds; otherwise, and for absolute positions and encoder-decoder models, the
    words are recorded at 0..n-1, as the paper's code does (logged).
    """
    device = next(model.parameters()).device
    words = torch.tensor([ids], device=device)
    at_start = record_kv(model, words)
    if is_seq2seq(model):
        return at_start, False
    n = len(ids)
    try:
        in_front = record_kv(model, words, torch.arange(-n, 0, device=device)[None])
    except Exception:  # e.g. absolute position embeddings cannot look up -1
        in_front = None
    if in_front is not None:
        x = _probe_inputs(model)["input_ids"][:1]
        joint = _run(model, input_ids=torch.cat([words, x], 1), use_cache=False).logits[:, n:].float()

        def error(kv):
            batch = PrefixBatch(kv={"self": kv["self"]}, mask={"self": None})
            return float((_run(model, input_ids=x, use_cache=False, prefix_batch=batch).logits.float() - joint).abs().max())

        err_front, err_start = error(in_front), error(at_start)
        # float32 rounding, or (lower precision) far closer than the words at 0..n-1
        if err_front <= 1e-5 * (1.0 + float(joint.abs().max())) or err_front < 0.1 * err_start:
            return in_front, True
    log.warning("%s: the words prefix is recorded at positions 0..%d, not in front of the input (its positions "
                "are not relative, or not defined below 0)", type(model).__name__, n - 1)
    return at_start, False
