"""PEFT's own prefix tuning, the external peer: trained through PEFT (``PrefixTuningConfig``, its
prompt encoder and its ``past_key_values`` route), at the same length, steps and data as ours.

PEFT puts its prefix in the key/value cache, so the real tokens take positions length..length+n-1
(ours keep 0..n-1, see prefixtune/attach.py). After training its prefix is converted to our format
so it can be decoded by :func:`prefixtune.generate` (PEFT 0.21's own ``generate`` on transformers
5.x silently drops the prefix): the layout is the same ([layers, 2, kv_heads, length, head_dim]),
and for rotary models each key is rotated back by ``length`` positions, which makes every query's
attention to it exactly what it was under PEFT's shifted positions (RoPE scores depend only on
the difference of the two rotations). Tested: our forward with the converted prefix equals PEFT's.
Decoder-only models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import attach
from ..prefix import Prefix, PrefixConfig, make_meta, token_logprobs, _reduce
from . import Tuned


class PeftPrefixModel(Tuned):
    method = "peft-prefix"

    def __init__(self, model, config: PrefixConfig):
        from peft import PrefixTuningConfig, get_peft_model

        if attach.is_seq2seq(model):
            raise ValueError("peft-prefix is supported here for decoder-only models")
        super().__init__(model, config.loss)
        self.config = config
        model.requires_grad_(False)
        attach.enable(model)  # (no prefix_batch is passed: the model computes what it did before)
        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.length,
                                         prefix_projection=config.reparameterize, encoder_hidden_size=config.mlp_hidden)
        self.__dict__["peft_model"] = get_peft_model(model, peft_config)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.peft_model.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            if p.requires_grad:
                yield name, p

    def train(self, mode: bool = True):
        super().train(mode)
        self.peft_model.train(mode)
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        """PEFT's forward (its prefix in the cache), with our loss on the target tokens."""
        from ..prefix import PrefixTunerOutput

        logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if labels is None:
            return PrefixTunerOutput(logits=logits)
        logp, mask = token_logprobs(logits, labels, shift=True)
        nll_sum, n_targets = -logp.sum(), mask.sum()
        return PrefixTunerOutput(loss=_reduce(nll_sum, n_targets, labels.shape[0], self.reduction),
                                 logits=logits if return_logits else None, nll_sum=nll_sum, n_targets=n_targets)

    def peft_kv(self) -> torch.Tensor:
        """PEFT's prefix as it enters the cache: ``[layers, 2, kv_heads, length, head_dim]``."""
        encoder = self.peft_model.prompt_encoder[self.peft_model.active_adapter]
        tokens = self.peft_model.prompt_tokens[self.peft_model.active_adapter][None, : self.config.length]
        flat = encoder(tokens.to(next(encoder.parameters()).device))[0]  # [length, layers * 2 * heads * dim]
        layers, heads, dim = attach.prefix_shapes(self.model).placements["self"]
        return flat.view(-1, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def export(self) -> Prefix:
        """PEFT's trained prefix in our format (keys rotated back for rotary models, see module doc)."""
        was = self.training
        self.eval()
        kv = self.peft_kv().detach().float().clone()
        self.train(was)
        kv[:, 0] = unshift_rotary_keys(self.model, kv[:, 0], self.config.length)
        kv = {"self": kv.cpu()}
        meta = make_meta(self.model, kv, self.config)
        meta["converted_from"] = "peft-prefix-tuning"
        return Prefix(kv=kv, meta=meta)

    def num_stored_parameters(self) -> int:
        layers, heads, dim = attach.prefix_shapes(self.model).placements["self"]
        return self.config.length * layers * 2 * heads * dim

    def save_trained(self, out_dir: str | Path) -> Path:
        """prefix.safetensors (converted, for our decoding) and PEFT's own weights (weights.safetensors)."""
        super().save_trained(out_dir)
        return self.export().save(Path(out_dir) / "prefix.safetensors")


def _rotary(model):
    """(rotary embedding module, the modeling file's apply_rotary_pos_emb), or None without RoPE."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return None
    attention = next(iter(attach.attention_slots(model)["self"]))
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise ValueError(f"{type(model).__name__}: has a rotary embedding but no apply_rotary_pos_emb to convert PEFT keys")
    return rotary, apply


@torch.no_grad()
def unshift_rotary_keys(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys ``[layers, kv_heads, length, dim]`` rotated by ``-shift`` positions (unchanged without RoPE).

    Under PEFT a query at token position m sits at m + shift; q_m . k = R(m + shift) q . k =
    R(m) q . R(-shift) k, so R(-shift) k is the key that gives the same score at position m."""
    found = _rotary(model)
    if found is None:  # absolute positions change the token inputs themselves: no exact conversion
        raise ValueError(f"{type(model).__name__}: converting PEFT's prefix (shifted positions) needs a rotary model")
    rotary, apply = found
    layers, heads, length, dim = keys.shape
    positions = torch.full((1, length), -shift, dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys.to(next(model.parameters()).dtype), positions)
    out = torch.stack([apply(k[None].to(cos.dtype), k[None].to(cos.dtype), cos, sin)[1][0] for k in keys])
    return out.to(keys.dtype)
