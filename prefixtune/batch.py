"""Prefixes of a batch, assembled for the attention function: one :class:`~prefixtune.attach.PrefixBatch`
from the prefixes of its rows (exported files, or trainable tensors of several prefixes at once).
"""

from __future__ import annotations

import torch
from torch import nn

from .attach import PrefixBatch


def split_layers(kv: torch.Tensor, key_dim: int, value_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[rows, layers, 2, heads, length, width] -> per layer (keys, values), each [rows, heads, length,
    key_dim / value_dim] (the stored width is the larger of the two; see attach.PrefixShapes)."""
    return [(kv[:, i, 0, ..., :key_dim], kv[:, i, 1, ..., :value_dim]) for i in range(kv.shape[1])]


def make_batch(prefixes, device=None, separators=None) -> PrefixBatch | None:
    """One :class:`PrefixBatch` for a batch whose rows use ``prefixes`` (a list of Prefix or None).

    Rows with shorter prefixes or none get masked slots. When every row uses the same prefix it is
    broadcast (1 row, no mask), which costs nothing extra. ``separators``: each row's position of
    the separator token (where y starts to be predicted); needed when a row uses an infix.
    """
    prefixes = list(prefixes)
    if all(p is None for p in prefixes):
        return None
    infix = [p is not None and p.site == "infix" for p in prefixes]
    visible_from = None
    if any(infix):
        if separators is None:
            raise ValueError("an infix needs the separator position of each row (make_batch(..., separators=...))")
        visible_from = torch.tensor([int(s) if i else 0 for s, i in zip(separators, infix)], device=device)
    if all(p is prefixes[0] for p in prefixes):
        kv = {pl: prefixes[0].layer_kv(pl, t[None].to(device)) for pl, t in prefixes[0].kv.items()}
        return PrefixBatch(kv=kv, mask={pl: None for pl in kv}, visible_from=visible_from)
    first = next(p for p in prefixes if p is not None)
    dims = {pl: tuple(first.meta.get("head_dims", {}).get(pl, (t.shape[-1], t.shape[-1]))) for pl, t in first.kv.items()}
    return stack_prefixes([({pl: t.to(device) for pl, t in p.kv.items()} if p is not None else None, 1)
                           for p in prefixes], dims, visible_from)


def stack_prefixes(groups: list[tuple[dict[str, torch.Tensor] | None, int]], head_dims: dict[str, tuple[int, int]],
                   visible_from: torch.Tensor | None = None) -> PrefixBatch:
    """One :class:`PrefixBatch` for consecutive groups of rows, each group ``(P, rows)`` with its own
    P (``{placement: [layers, 2, kv_heads, length, width]}``, or None for no prefix). Shorter prefixes
    and rows without one get masked slots (exact: a masked key gets zero attention weight).
    Differentiable: several trainable prefixes can share one batch (prefixtune/train_many.py)."""
    placements = sorted({pl for kv, _ in groups if kv for pl in kv})
    kv_out, mask = {}, {}
    for pl in placements:
        ref = next(kv[pl] for kv, _ in groups if kv and pl in kv)
        longest = max(kv[pl].shape[3] for kv, _ in groups if kv and pl in kv)
        parts, masks = [], []
        for kv, n in groups:
            t = kv.get(pl) if kv else None
            length = 0 if t is None else t.shape[3]
            t = ref.new_zeros(*ref.shape[:3], longest, ref.shape[4]) if t is None else \
                nn.functional.pad(t, (0, 0, 0, longest - length))
            parts.append(t[None].expand(n, *t.shape))
            masks.append((torch.arange(longest, device=ref.device) < length)[None].expand(n, -1))
        kv_out[pl] = split_layers(torch.cat(parts), *head_dims[pl])
        mask[pl] = torch.cat(masks)
    return PrefixBatch(kv=kv_out, mask=mask, visible_from=visible_from)


