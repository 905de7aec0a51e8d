"""Turning (source, target) text into model inputs: one rule shared by training, scoring and generation.

Decoder-only models see ``[PREFIX; x; SEP; y; EOS]`` as in the paper (GPT-2: ``x <bos> y <eos>``):
x is the source without special tokens, SEP is the tokenizer's BOS token (its EOS if it has none),
y is ``" " + target`` and EOS ends it; only y and EOS are scored. Encoder-decoder models get x
(with the tokenizer's special tokens) on the encoder and y as labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attach import is_seq2seq


@dataclass
class Encoded:
    prompt: list[int]  # encoder input (seq2seq) or x + SEP (decoder-only)
    target: list[int]  # y + EOS (empty when only generating)


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(separator, eos, pad) token ids."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; prefixtune needs one to end targets")
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return sep, eos, pad


def encode(model, tokenizer, source: str, target: str | None = None) -> Encoded:
    if is_seq2seq(model):
        prompt = tokenizer(source).input_ids
        tgt = tokenizer(text_target=target).input_ids if target is not None else []
        if tgt and tgt[-1] != tokenizer.eos_token_id:  # the model must learn to stop
            tgt.append(tokenizer.eos_token_id)
    else:
        sep, eos, _ = special_ids(tokenizer)
        prompt = tokenizer(source, add_special_tokens=False).input_ids + [sep]
        tgt = tokenizer(" " + target, add_special_tokens=False).input_ids + [eos] if target is not None else []
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and not is_seq2seq(model) and len(prompt) + len(tgt) > limit:
        raise ValueError(
            f"source + target is {len(prompt) + len(tgt)} tokens, more than the model's {limit} positions: "
            f"{source[:60]!r}..."
        )
    return Encoded(prompt, tgt)


def collate_train(model, examples: list[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels (-100 on source and padding), for training and scoring."""
    if is_seq2seq(model):
        ids = _pad([e.prompt for e in examples], pad, left=False)
        labels = _pad([e.target for e in examples], -100, left=False)
        return {"input_ids": ids, "attention_mask": _mask([e.prompt for e in examples], ids.shape[1], left=False), "labels": labels}
    seqs = [e.prompt + e.target for e in examples]
    ids = _pad(seqs, pad, left=False)
    labels = _pad([[-100] * len(e.prompt) + e.target for e in examples], -100, left=False)
    return {"input_ids": ids, "attention_mask": _mask(seqs, ids.shape[1], left=False), "labels": labels}


def collate_prompts(model, prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Batch of prompts for generate(): left-padded for decoder-only models, right-padded for seq2seq."""
    left = not is_seq2seq(model)
    ids = _pad(prompts, pad, left=left)
    return {"input_ids": ids, "attention_mask": _mask(prompts, ids.shape[1], left=left)}


def length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of rows of the given lengths, sorted by length (ties in input order) and cut into
    batches of ``size``: less padding. Every batched pass over a fixed set of rows uses this order
    (generation, scoring, the dev loss, and the rows each process decodes)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + size] for i in range(0, len(order), size)]


def prompt_batches(model, tokenizer, sources, batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, batches of source indices) as :func:`prefixtune.generate` decodes ``sources``
    (text, or prompts already encoded as token ids)."""
    prompts = [list(s) if not isinstance(s, str) else encode(model, tokenizer, s).prompt for s in sources]
    return prompts, length_batches([len(p) for p in prompts], batch_size)


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def _mask(seqs: list[list[int]], width: int, left: bool) -> torch.Tensor:
    rows = [([0] * (width - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def prepend_soft_prompt(model, soft_prompt: torch.Tensor, input_ids, attention_mask, labels=None, **rest) -> dict:
    """Model inputs with ``soft_prompt`` ([length, hidden] input embeddings) before every row's tokens
    (the encoder's, for seq2seq): ``inputs_embeds`` replaces ``input_ids``, the mask grows by
    ``length`` ones, and decoder-only labels by ``length`` ignored positions. With left padding the
    soft tokens come before the padding; positions follow the mask, so they are 0..length-1 and
    the source's continue after them, as in training."""
    embeds = model.get_input_embeddings()(input_ids)
    rows, length = input_ids.shape[0], soft_prompt.shape[0]
    soft = soft_prompt.to(embeds.dtype)[None].expand(rows, -1, -1)
    out = dict(rest, inputs_embeds=torch.cat([soft, embeds], dim=1),
               attention_mask=torch.cat([attention_mask.new_ones(rows, length), attention_mask], dim=1))
    if labels is not None:
        out["labels"] = labels if is_seq2seq(model) else torch.cat([labels.new_full((rows, length), -100), labels], dim=1)
    return out
