"""How a prefix is built and trained: :class:`PrefixConfig`.

The methods that train prefix-like activations (prefix, infix, prompt, peft-prefix; see
prefixtune/methods.py) take their shape from it; its ``loss`` is the reduction every method trains
with. run.json and an exported prefix's metadata record it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass
class PrefixConfig:
    """How a prefix is built and trained.

    length: number of prefix positions per attention layer (paper: 10 for table-to-text, 200 for
        summarisation).
    reparameterize: True = P' (length x embed_dim) -> MLP -> P (the paper's default); False =
        optimise P directly ("flat").
    mlp_hidden: hidden width of the MLP (paper: 512 for table-to-text, 800 for summarisation).
    embed_dim: d', width of P'; None = the model's hidden size.
    dropout: dropout applied to P during training (the original code's prefix dropout).
    init: "random", or "words": start from the base model's own keys/values for ``init_text``.
        The text is tokenised without special tokens and its tokens are repeated cyclically, then
        cut, to exactly ``length`` tokens (so "table-to-text:" fills a length-10 prefix by
        repeating itself, and a long text keeps its first ``length`` tokens); the model is run on
        that token sequence and its per-layer keys/values become P: the words in front of the
        input where the model's positions are relative (see attach.words_kv). With the MLP, the
        MLP (and P') are first fitted to those activations by ``init_steps`` Adam steps of MSE (in
        eval mode, without prefix dropout), as the original code does; without it, they are copied.
    loss: "token_mean" (mean log-likelihood over all target tokens of the batch) or
        "sequence_sum" (the paper's objective: sum over each target's tokens, mean over rows).
    gradient_checkpointing: recompute the frozen model's activations in backward (less memory).
    placements: which attention placements get a prefix; None = all the model has ("self" for
        decoder-only models; "encoder", "decoder", "cross" for encoder-decoder models).
    """

    length: int = 10
    reparameterize: bool = True
    mlp_hidden: int = 512
    embed_dim: int | None = None
    dropout: float = 0.0
    init: Literal["random", "words"] = "random"
    init_text: str | None = None
    init_steps: int = 500
    init_lr: float = 1e-3
    loss: Literal["token_mean", "sequence_sum"] = "token_mean"
    gradient_checkpointing: bool = False
    placements: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"PrefixConfig.length must be >= 1, got {self.length}")
        if self.init not in ("random", "words"):
            raise ValueError(f"PrefixConfig.init must be 'random' or 'words', got {self.init!r}")
        if self.init == "words" and not self.init_text:
            raise ValueError("PrefixConfig.init='words' needs init_text, e.g. 'table-to-text:'")
        if self.loss not in ("token_mean", "sequence_sum"):
            raise ValueError(f"PrefixConfig.loss must be 'token_mean' or 'sequence_sum', got {self.loss!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PrefixConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.placements is not None:
            self.placements = tuple(self.placements)

    def to_json(self) -> dict:
        return asdict(self)

