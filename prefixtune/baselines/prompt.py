"""The paper's embedding-only ablation (prompt tuning): trainable vectors in the input embedding layer
only, ``[SOFT; x; y]``; every layer above computes its activations from them, as for real tokens.

The soft prompt goes through the same reparameterisation as a prefix (P' -> MLP -> P, P of width
the model's hidden size), or is optimised directly (``reparameterize=False``). Unlike a prefix, the
soft tokens take positions 0..length-1 and the source's follow them. After training only
P (``length x hidden``) is kept, in ``prompt.safetensors``; :func:`prefixtune.generate` takes it
as ``soft_prompt=``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .. import attach
from ..config import PrefixConfig
from ..loss import decoder_inputs_from_labels, lm_forward
from ..modes import eval_mode
from ..prefix import save_safetensors
from ..template import prepend_soft_prompt
from ..tuner import reparameterisation
from . import Tuned

FILE = "prompt.safetensors"


class PromptModel(Tuned):
    method = "prompt"
    trained_file = FILE

    def __init__(self, model, config: PrefixConfig):
        super().__init__(model, config.loss)
        model.requires_grad_(False)
        self.length = config.length
        emb = model.get_input_embeddings().weight
        d = emb.shape[1]
        if config.reparameterize:
            self.embedding, self.mlp = reparameterisation(config.length, config.embed_dim or d, config.mlp_hidden, d)
        else:  # start from the embeddings of random vocabulary tokens (Lester et al., 2021)
            rows = torch.randint(0, emb.shape[0], (config.length,))
            self.embedding = nn.Parameter(emb.detach()[rows].float().clone())
            self.mlp = None
        self.to(emb.device)

    @classmethod
    def build(cls, model, config, prefix_config, tokenizer=None):
        return cls(model, prefix_config)

    @classmethod
    def load_trained(cls, model, run_dir, config, prefix_config) -> dict:
        return {"soft_prompt": load_soft_prompt(run_dir, model).to(next(model.parameters()).device)}

    def decode_inputs(self) -> dict:
        with torch.no_grad(), eval_mode(self):
            return {"soft_prompt": self.soft_prompt().detach().float()}

    def soft_prompt(self) -> torch.Tensor:
        """P: ``[length, hidden]`` input embeddings."""
        return self.embedding if self.mlp is None else self.mlp(self.embedding)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        inputs = prepend_soft_prompt(self.model, self.soft_prompt(), input_ids, attention_mask, labels=labels, **kwargs)
        if attach.is_seq2seq(self.model) and labels is not None:  # decoder inputs from the unchanged labels
            inputs.setdefault("decoder_input_ids", decoder_inputs_from_labels(self.model, labels))
        labels = inputs.pop("labels", None)
        return lm_forward(self.model, self.reduction, None, labels=labels, return_logits=return_logits, **inputs)

    def num_stored_parameters(self) -> int:
        return self.length * self.model.get_input_embeddings().weight.shape[1]

    def save_trained(self, out_dir: str | Path) -> Path:
        soft = self.decode_inputs()["soft_prompt"]
        meta = {"method": self.method, "base_model": attach.model_identity(self.model), "length": self.length}
        return save_safetensors(Path(out_dir) / FILE, {"soft_prompt": soft}, meta)


def load_soft_prompt(path: str | Path, model=None) -> torch.Tensor:
    """The ``[length, hidden]`` soft prompt saved by :meth:`PromptModel.save_trained` (checked against
    ``model``'s weights when given)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise FileNotFoundError(f"soft prompt file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("prefixtune", "{}"))
        soft = f.get_tensor("soft_prompt")
    if model is not None:
        width = model.get_input_embeddings().weight.shape[1]
        if soft.ndim != 2 or soft.shape[1] != width:
            raise ValueError(f"{path}: soft prompt of shape {tuple(soft.shape)}; this model's embeddings have width {width}")
        if meta.get("base_model", {}).get("fingerprint") != attach.model_identity(model)["fingerprint"]:
            raise ValueError(f"{path}: trained on base model {meta.get('base_model')}, not {attach.model_identity(model)}")
    return soft
