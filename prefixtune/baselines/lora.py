"""LoRA (Hu et al., 2021), through PEFT: the method users pick today, at a rank chosen to about a
given fraction of the model's parameters. PEFT injects the low-rank layers into the model in place;
its default target modules per architecture are used (q and v projections for Llama)."""

from __future__ import annotations

from . import Tuned, trainable


def lora_config(model, rank: int, alpha: float | None = None, dropout: float = 0.0):
    """PEFT's LoraConfig for ``model``: GPT-2's attention is a Conv1D (weight stored [in, out]), which
    LoRA must know (``fan_in_fan_out``), or PEFT fixes it with a warning on every build."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))


def _lora_size(model, rank: int) -> int:
    import copy

    from peft import get_peft_model

    probe = get_peft_model(copy.deepcopy(model), lora_config(model, rank))
    return sum(p.numel() for n, p in probe.named_parameters() if "lora_" in n)


def rank_for(model, fraction: float) -> int:
    """The LoRA rank whose parameters come closest to ``fraction`` of the model's (size is linear in the rank)."""
    n_model = sum(p.numel() for p in model.parameters())
    return max(1, round(fraction * n_model / _lora_size(model, 1)))


class LoraModel(Tuned):
    """The base model with LoRA layers injected (PEFT); ``parameters()`` are the LoRA weights only.
    The forward is the model's own (the LoRA layers sit inside it)."""

    method = "lora"

    def __init__(self, model, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 reduction: str = "token_mean"):
        from peft import get_peft_model

        super().__init__(model, reduction)  # the same object gets LoRA layers inside
        self.rank = rank
        model.requires_grad_(False)
        self.__dict__["peft_model"] = get_peft_model(model, lora_config(model, rank, alpha, dropout))

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        config.rank = config.rank or rank_for(model, config.size)  # recorded in run.json
        return cls(model, config.rank, reduction=prefix_config.loss)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return trainable(self.peft_model, prefix, remove_duplicate)
