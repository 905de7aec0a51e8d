"""Prefixes to and from Hugging Face PEFT's prefix tuning (``peft_type: PREFIX_TUNING``).

A PEFT prefix-tuning checkpoint is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, whose one tensor ``prompt_embeddings`` is P flattened per virtual
token: ``[length, layers * 2 * kv_heads * head_dim]`` (the MLP output when it was trained with
``prefix_projection``, which is what PEFT saves). The layout is ours ([layers, 2, kv_heads, length,
head_dim], see prefix.py) once reshaped; what differs is positions. PEFT puts P in the key/value
cache, so the real tokens take positions length..length+n-1; ours keep 0..n-1 (attach.py):

- rotary (RoPE) models: a query at m + length scores a PEFT key k as a query at m scores the key
  rotated by -length, so keys are rotated back on import and forward on export: exact both ways
  (tested: PEFT's forward equals ours, and ours -> PEFT -> ours gives the same tensor).
- absolute position embeddings (GPT-2, OPT...): the shift changes the real tokens' own inputs, so no
  conversion of P can make the two equal (P itself is copied unchanged: PEFT's forward equals ours
  with the inputs at positions length..; PEFT's forward ignores ``position_ids`` for prefix tuning).
  Importing such a checkpoint needs ``allow_position_shift=True`` (the prefix then runs with
  unshifted positions, unlike under PEFT); exporting says so.

Decoder-only models (PEFT's encoder-decoder prefix shares one P between decoder self- and cross-
attention and has none on the encoder). PEFT 0.21's ``PeftModel.generate`` drops the prefix on
transformers 5.x: decode through :func:`prefixtune.generate`.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import attach
from .prefix import Prefix, make_meta

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _rotary(model):
    """(rotary embedding module, the modeling file's apply_rotary_pos_emb(q, k, cos, sin)), or None."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return None
    attention = attach.attention_slots(model)["self"][0]
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if apply is None or list(inspect.signature(apply).parameters)[:4] != ["q", "k", "cos", "sin"]:
        raise ValueError(f"{type(model).__name__}: its rotary embedding is not applied as apply_rotary_pos_emb(q, k, "
                         "cos, sin); prefixtune cannot convert PEFT's shifted keys for it")
    return rotary, apply


def has_rotary(model) -> bool:
    return _rotary(model) is not None


@torch.no_grad()
def rotate_keys(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys ``[layers, kv_heads, length, dim]`` rotated by ``shift`` positions (negative: back).

    Rotation by -s is rotation by s with sin negated, so only position |s| is looked up (rotary
    tables have no negative positions)."""
    rotary, apply = _rotary(model)
    layers, heads, length, dim = keys.shape
    positions = torch.full((1, length), abs(shift), dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys.to(next(model.parameters()).dtype), positions)
    sin = sin if shift >= 0 else -sin
    out = torch.stack([apply(k[None].to(cos.dtype), k[None].to(cos.dtype), cos, sin)[1][0] for k in keys])
    return out.to(keys.dtype)


def _check_decoder_only(model) -> None:
    if attach.is_seq2seq(model):
        raise ValueError(f"{type(model).__name__}: PEFT prefix conversion is for decoder-only models (PEFT's "
                         "encoder-decoder prefix shares one P between decoder and cross-attention, none on the encoder)")


def from_peft(path: str | Path, model, allow_position_shift: bool = False) -> Prefix:
    """Our :class:`Prefix` from a PEFT prefix-tuning checkpoint directory, for ``model`` (the base
    model it was trained on). See the module doc for positions."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; expected a PEFT adapter directory")
    if not weights_path.is_file():
        bin_path = path / "adapter_model.bin"
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}" + (
            " (adapter_model.bin is a pickle, which prefixtune never loads: re-save it with "
            "save_pretrained(..., safe_serialization=True))" if bin_path.exists() else ""))
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{config_path}: task_type {config.get('task_type')!r}; only CAUSAL_LM prefixes convert")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            if "prompt_embeddings" not in f.keys():
                raise ValueError(f"{weights_path}: no 'prompt_embeddings' tensor (has {sorted(f.keys())[:5]})")
            flat = f.get_tensor("prompt_embeddings").float()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{weights_path}: not a valid safetensors file ({e})") from e
    prefix = convert(flat, model, config.get("num_virtual_tokens"), allow_position_shift, what=str(weights_path))
    prefix.meta.update(peft_source=str(path), peft_base_model=config.get("base_model_name_or_path"))
    return prefix


def convert(flat: torch.Tensor, model, length: int, allow_position_shift: bool = False, what: str = "PEFT's prefix"
            ) -> Prefix:
    """PEFT's flat P ``[length, layers * 2 * kv_heads * head_dim]`` (what it saves as
    ``prompt_embeddings``, and what its prefix encoder outputs) as our :class:`Prefix` for ``model``."""
    _check_decoder_only(model)
    layers, heads, dim = attach.prefix_shapes(model).placements["self"]
    if attach.prefix_shapes(model).head_dims["self"] != (dim, dim):
        raise ValueError(f"{type(model).__name__}: keys and values differ in head size; PEFT's layout cannot hold it")
    if flat.ndim != 2 or tuple(flat.shape) != (length, layers * 2 * heads * dim):
        raise ValueError(f"{what}: prompt_embeddings has shape {tuple(flat.shape)}; for {type(model).__name__} with "
                         f"{length} virtual tokens it must be ({length}, {layers * 2 * heads * dim}) = layers {layers} "
                         f"x 2 x kv heads {heads} x head size {dim}")
    kv = flat.float().reshape(length, layers, 2, heads, dim).permute(1, 2, 3, 0, 4).contiguous()
    if _rotary(model) is not None:
        kv[:, 0] = rotate_keys(model, kv[:, 0], -length)
    elif not allow_position_shift:
        raise ValueError(
            f"{type(model).__name__} has absolute position embeddings, not rotary ones: under PEFT the input took "
            f"positions {length}.., under prefixtune it keeps 0.., so this prefix will not give PEFT's outputs; pass "
            "allow_position_shift=True (--allow-position-shift) to convert it anyway")
    kv = {"self": kv}
    meta = make_meta(model, kv)
    meta["converted_from"] = "peft-prefix-tuning"
    return Prefix(kv=kv, meta=meta)


def to_peft(prefix: Prefix, model, out_dir: str | Path) -> Path:
    """Write ``prefix`` (made for ``model``) as a PEFT prefix-tuning checkpoint that
    ``PeftModel.from_pretrained(model, out_dir)`` loads. See the module doc for positions."""
    from peft import PrefixTuningConfig

    _check_decoder_only(model)
    prefix.check_compatible(model)
    if prefix.site != "prefix" or set(prefix.kv) != {"self"}:
        raise ValueError(f"only a decoder-only prefix converts to PEFT (this one: site {prefix.site!r}, placements "
                         f"{sorted(prefix.kv)})")
    if prefix.meta.get("head_dims"):
        raise ValueError("keys and values differ in head size (multi-head latent attention); PEFT's layout cannot hold it")
    kv = prefix.kv["self"].float().clone()
    layers, _, heads, length, dim = kv.shape
    if _rotary(model) is not None:
        kv[:, 0] = rotate_keys(model, kv[:, 0], length)
    flat = kv.permute(3, 0, 1, 2, 4).reshape(length, layers * 2 * heads * dim).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, num_layers=layers,
                                num_attention_heads=heads, token_dim=heads * dim, prefix_projection=False,
                                inference_mode=True,
                                base_model_name_or_path=prefix.meta.get("base_model", {}).get("name"))
    config.save_pretrained(str(out))
    save_file({"prompt_embeddings": flat}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
