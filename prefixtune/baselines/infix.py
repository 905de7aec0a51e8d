"""The paper's infix ablation: ``[x; INFIX; y]``, the trainable activations placed between the source
and the target instead of before the source.

An infix is a prefix (same P' -> MLP -> P, same export) whose positions only the separator and
the target can attend to: the source's tokens come before it, so causal attention hides it from
them (``PrefixBatch.visible_from``). Its exported file is a Prefix with ``meta["site"] = "infix"``;
:func:`prefixtune.generate` and :func:`prefixtune.score` place it by themselves. Decoder-only models.
"""

from __future__ import annotations

import torch

from .. import attach
from ..config import PrefixConfig
from ..loss import lm_forward
from ..prefix import Prefix, make_meta
from ..tuner import PrefixTuner


def separator_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the separator: the token before the first target label (decoder-only
    labels align with the inputs, -100 on the source)."""
    is_target = labels != -100
    if not bool(is_target.any(dim=1).all()):
        raise ValueError("every row needs at least one target token to place an infix")
    return is_target.int().argmax(dim=1) - 1


class InfixTuner(PrefixTuner):
    method = "infix"

    def __init__(self, model, config: PrefixConfig | None = None, tokenizer=None):
        if attach.is_seq2seq(model):
            raise ValueError("infix-tuning is defined for decoder-only models ([x; INFIX; y])")
        super().__init__(model, config, tokenizer)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        if labels is None:
            raise ValueError("InfixTuner.forward needs labels (they mark where the target starts)")
        batch = self.prefix_batch()
        batch.visible_from = separator_positions(labels)
        return lm_forward(self.model, self.reduction, input_ids, attention_mask, labels, return_logits,
                          prefix_batch=batch, **kwargs)

    def export(self) -> Prefix:
        prefix = super().export()
        prefix.meta = make_meta(self.model, prefix.kv, self.config, site="infix")
        return prefix
