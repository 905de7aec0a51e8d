"""The training loss every method shares: log p(y | x) over the target tokens alone.

:func:`lm_forward` runs one forward of the base model (with whatever the method adds: a prefix
batch, input embeddings, injected layers) and returns the summed negative log-likelihood of the
target tokens, its count, and the loss reduced as configured (:func:`normaliser`: per target token,
or the paper's sum per sequence). The trainer normalises a step spread over micro-batches and
processes by the same rule, so the reduction is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from . import attach
from .modes import eval_mode


@dataclass
class TunerOutput(ModelOutput):
    """``loss`` as configured; ``nll_sum`` (summed NLL of the target tokens), ``nll_rows`` (the same
    per row) and ``n_targets`` (their count) when labels are given; ``logits`` unless
    ``return_logits=False``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None
    n_targets: torch.Tensor | None = None
    nll_rows: torch.Tensor | None = None


def lm_forward(model, reduction: str, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True,
               **kwargs) -> TunerOutput:
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
            return TunerOutput(logits=logits)
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
    loss = nll_sum / normaliser(reduction, n_targets.clamp(min=1), labels.shape[0])
    return TunerOutput(loss=loss, logits=logits, nll_sum=nll_sum, n_targets=n_targets, nll_rows=nll_rows)


def normaliser(reduction: str, n_targets, rows: int):
    """What a batch's summed NLL is divided by: its target tokens ("token_mean") or its rows
    ("sequence_sum": summed per sequence, mean over rows)."""
    return n_targets if reduction == "token_mean" else rows


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
    state = attach.model_state(model)
    cached = state.lm_head_split
    if cached is not None:
        return cached or None
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    split = False
    if body is not None and body is not model and head is not None:
        try:
            with eval_mode(model):
                ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
                full = model(input_ids=ids, use_cache=False).logits.float()
                mine = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
            split = (body, head) if torch.allclose(full, mine, rtol=1e-4, atol=1e-4) else False
        except Exception:  # any other signature or output type: use the full forward
            split = False
    state.lm_head_split = split
    return split or None

