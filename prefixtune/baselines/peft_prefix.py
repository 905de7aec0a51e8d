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

from pathlib import Path

import torch

from .. import attach
from ..config import PrefixConfig
from ..loss import lm_forward
from ..modes import eval_mode
from ..prefix import Prefix
from ..tuner import PrefixTuner
from . import Tuned, trainable


class PeftPrefixModel(Tuned):
    method = "peft-prefix"
    trained_file = PrefixTuner.trained_file  # written last, after PEFT's own weights

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

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        return cls(model, prefix_config)

    @classmethod
    def load_trained(cls, model, run_dir, config, prefix_config) -> dict:
        return PrefixTuner.load_trained(model, run_dir, config, prefix_config)  # our converted prefix

    def decode_inputs(self) -> dict:
        return {"prefixes": self.export()}

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return trainable(self.peft_model, prefix, remove_duplicate)

    def train(self, mode: bool = True):
        super().train(mode)
        self.peft_model.train(mode)
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        """PEFT's forward (its prefix in the cache), with our loss on the target tokens. Always with
        logits: PEFT's model runs its LM head on every position (our head split does not apply)."""
        return lm_forward(self.peft_model, self.reduction, input_ids, attention_mask, labels, return_logits=True)

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
        from ..peft_io import convert

        with eval_mode(self):
            kv = self.peft_kv().detach().float()  # [layers, 2, heads, length, dim] -> PEFT's flat layout
        flat = kv.permute(3, 0, 1, 2, 4).reshape(self.config.length, -1).cpu()
        prefix = convert(flat, self.model, self.config.length)
        prefix.meta["config"] = self.config.to_json()
        return prefix

    def num_stored_parameters(self) -> int:
        layers, heads, dim = attach.prefix_shapes(self.model).placements["self"]
        return self.config.length * layers * 2 * heads * dim

    def save_trained(self, out_dir: str | Path) -> Path:
        """prefix.safetensors (converted, for our decoding) and PEFT's own weights (weights.safetensors)."""
        super().save_trained(out_dir)
        return self.export().save(Path(out_dir) / self.trained_file)
