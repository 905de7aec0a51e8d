"""How a prefix is built and trained: :class:`PrefixConfig`.

The methods that train prefix-like activations (prefix, infix, prompt, peft-prefix; see
prefixtune/methods.py) take their shape from it; its ``loss`` is the reduction every method trains
with. run.json and an exported prefix's metadata record it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from .options import check_bounds, check_choices, option


@dataclass
class PrefixConfig:
    """How a prefix is built and trained (each field's help says what it does; ``prefixtune train
    --help`` shows the same). ``placements``: which attention placements get a prefix; None = all
    the model has ("self" for decoder-only models; "encoder", "decoder", "cross" for encoder-decoder
    models)."""

    length: int = option(10, "prefix length: positions per attention layer (paper: 10 for table-to-text, 200 for "
                         "summarisation)")
    reparameterize: bool = option(True, "optimise P directly, without the MLP (default: P' -> MLP -> P, the paper's "
                                  "reparameterisation)", flag="--flat")
    mlp_hidden: int = option(512, "hidden width of the reparameterisation MLP (paper: 512 for table-to-text, 800 for "
                             "summarisation)")
    embed_dim: int | None = option(None, "width d' of P' (default: the model's hidden size)")
    dropout: float = option(0.0, "dropout on the prefix during training (the original code's prefix dropout)",
                            flag="--prefix-dropout")
    init: Literal["random", "words"] = option(
        "random", "random, or words: start from the base model's own keys/values for --init-text. The text is "
        "tokenised without special tokens, its tokens repeated cyclically and cut to exactly --length tokens; the "
        "model's per-layer keys/values for them become P (the words in front of the input where positions are "
        "relative, see attach.words_kv). With the MLP, P' and the MLP are first fitted to those activations by "
        "--init-steps Adam steps of MSE (without prefix dropout), as the original code does; without it, copied")
    init_text: str | None = option(None, "text whose activations start the prefix (--init words), e.g. 'table-to-text:'")
    init_steps: int = option(500, "Adam steps fitting P' and the MLP to the words' activations (--init words)")
    init_lr: float = option(1e-3, "learning rate of those steps")
    loss: Literal["token_mean", "sequence_sum"] = option(
        "token_mean", "token_mean: mean log-likelihood over all target tokens of the batch; sequence_sum: the paper's "
        "objective, summed over each target's tokens, mean over rows")
    gradient_checkpointing: bool = option(False, "recompute the frozen model's activations in backward (less memory, "
                                          "more compute)")
    placements: tuple[str, ...] | None = None

    def __post_init__(self):
        check_choices(self)
        if self.init == "words" and not self.init_text:
            raise ValueError("PrefixConfig.init='words' needs init_text, e.g. 'table-to-text:'")
        # an MLP of width 0 trains a constant (its bias)
        check_bounds(self, {"length": 1, "mlp_hidden": 1, "embed_dim": 1, "init_steps": 0}, positive=("init_lr",))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PrefixConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.placements is not None:
            self.placements = tuple(self.placements)

    def to_json(self) -> dict:
        return asdict(self)

