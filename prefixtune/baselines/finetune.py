"""Fine-tuning baselines of the paper: all weights (FT-full) or only the top k transformer layers (FT-top2)."""

from __future__ import annotations

from torch import nn

from . import Tuned, trainable


def transformer_layers(model) -> list[nn.Module]:
    """The model's transformer blocks, bottom to top (decoder blocks for encoder-decoder models): the
    longest ModuleList of identical block types in the model (``model.layers``, ``transformer.h``...)."""
    best: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1:
            if model.config.is_encoder_decoder and "decoder" not in name:
                continue
            if len(module) > len(best):
                best = list(module)
    if not best:
        raise ValueError(f"{type(model).__name__}: found no list of transformer blocks")
    return best


class FineTuneModel(Tuned):
    """The base model with all of its weights trainable (``top_layers=None``) or only those of its top
    ``top_layers`` transformer blocks. ``parameters()`` yields exactly the trainable ones."""

    method = "finetune"

    def __init__(self, model, top_layers: int | None = None, reduction: str = "token_mean"):
        super().__init__(model, reduction)  # parameters() below are the trainable ones only
        self.top_layers = top_layers
        if top_layers is None:
            model.requires_grad_(True)
        else:
            layers = transformer_layers(model)
            if not 1 <= top_layers <= len(layers):
                raise ValueError(f"top_layers must be in 1..{len(layers)}, got {top_layers}")
            model.requires_grad_(False)
            for block in layers[-top_layers:]:
                block.requires_grad_(True)

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        """"finetune": every weight; "ft-top2": the top ``config.top_layers`` blocks."""
        return cls(model, None if config.method == "finetune" else config.top_layers, reduction=prefix_config.loss)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return trainable(self.model, prefix, remove_duplicate)
