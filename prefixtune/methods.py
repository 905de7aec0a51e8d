"""Every way of tuning the base model that prefixtune trains, by name: the method and the paper's baselines.

``build`` wraps a freshly loaded base model for training (the trainer only needs the wrapper's
contract, see prefixtune/baselines/__init__.py); ``load_trained`` puts a finished run's result
back on a freshly loaded base model and returns what :func:`prefixtune.generate` needs for it.

| method       | trains                                          | keeps after training         |
| ------------ | ----------------------------------------------- | ---------------------------- |
| prefix       | P' + MLP (the paper's method)                    | P (prefix.safetensors)       |
| infix        | as prefix, placed [x; INFIX; y] (ablation)       | P (prefix.safetensors)       |
| prompt       | soft input embeddings, P' + MLP (embedding-only) | P (prompt.safetensors)       |
| peft-prefix  | PEFT's prefix tuning (its encoder, its route)    | P converted + PEFT's weights |
| finetune     | every weight                                     | every weight                 |
| ft-top2      | the top ``top_layers`` (2) transformer blocks    | those blocks                 |
| adapter      | Houlsby adapters of ~``size`` x the model        | the adapters                 |
| lora         | LoRA (PEFT) of ~``size`` x the model             | the LoRA weights             |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .config import PrefixConfig
from .prefix import Prefix
from .tuner import PrefixTuner

METHODS = ("prefix", "finetune", "ft-top2", "adapter", "lora", "prompt", "infix", "peft-prefix")
PREFIX_FILE = "prefix.safetensors"


@dataclass
class MethodConfig:
    """method: one of METHODS. size: adapter/lora parameters as a fraction of the model's (the
    bottleneck width or rank closest to it is used). top_layers: blocks trained by ft-top2.
    bottleneck / rank: set explicitly, or resolved from ``size`` by :func:`build` (and recorded)."""

    method: str = "prefix"
    size: float = 0.001
    top_layers: int = 2
    bottleneck: int | None = None
    rank: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 < self.size < 1:
            raise ValueError(f"size is a fraction of the model's parameters, in (0, 1); got {self.size}")

    def to_json(self) -> dict:
        """What identifies the method in run.json (only the fields that apply to it)."""
        keep = {"adapter": ("size", "bottleneck"), "lora": ("size", "rank"), "ft-top2": ("top_layers",)}
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k in keep.get(self.method, ())}}


def build(config: MethodConfig, model, prefix_config: PrefixConfig, tokenizer=None):
    """The trainable wrapper for ``config.method`` around ``model`` (LoRA and adapters change the model
    object in place: use a fresh one per run). Resolves ``bottleneck``/``rank`` from ``size``."""
    from .baselines import adapter, finetune, infix, lora, peft_prefix, prompt

    m, loss = config.method, prefix_config.loss
    if m == "prefix":
        return PrefixTuner(model, prefix_config, tokenizer=tokenizer)
    if m == "infix":
        return infix.InfixTuner(model, prefix_config, tokenizer=tokenizer)
    if m == "prompt":
        return prompt.PromptModel(model, prefix_config)
    if m == "peft-prefix":
        return peft_prefix.PeftPrefixModel(model, prefix_config)
    if m == "finetune":
        return finetune.FineTuneModel(model, None, reduction=loss)
    if m == "ft-top2":
        return finetune.FineTuneModel(model, config.top_layers, reduction=loss)
    if m == "adapter":
        config.bottleneck = config.bottleneck or adapter.bottleneck_for(model, config.size)
        return adapter.AdapterModel(model, config.bottleneck, reduction=loss)
    config.rank = config.rank or lora.rank_for(model, config.size)
    return lora.LoraModel(model, config.rank, reduction=loss)


def load_trained(config: MethodConfig, model, run_dir: str | Path, prefix_config: PrefixConfig | None = None) -> dict:
    """Put the trained result in ``run_dir`` on ``model`` (a fresh base model) for decoding; returns the
    keyword arguments of :func:`prefixtune.generate` / :func:`prefixtune.score` that go with it
    (``prefixes=`` or ``soft_prompt=``; none when the weights now live in the model)."""
    run_dir = Path(run_dir)
    if config.method in ("prefix", "infix", "peft-prefix"):
        return {"prefixes": Prefix.load(run_dir / PREFIX_FILE)}
    if config.method == "prompt":
        from .baselines.prompt import load_soft_prompt

        return {"soft_prompt": load_soft_prompt(run_dir, model).to(next(model.parameters()).device)}
    wrapper = build(config, model, prefix_config or PrefixConfig())
    wrapper.load_trained(run_dir)
    model.requires_grad_(False)
    return {}


def decoding_kwargs(tuner) -> dict:
    """What :func:`prefixtune.generate` needs to decode with ``tuner``'s current (in-training) weights,
    as :func:`load_trained` gives it for a finished run: the exported prefix (prefix, infix,
    peft-prefix), the soft prompt (prompt), or nothing (the weights are in the model)."""
    import torch

    from .baselines.prompt import PromptModel

    if isinstance(tuner, PromptModel):
        with torch.no_grad():
            return {"soft_prompt": tuner.soft_prompt().detach().float()}
    if hasattr(tuner, "export"):
        return {"prefixes": tuner.export()}
    return {}


def describe(config: MethodConfig) -> str:
    extra = {"adapter": f" (bottleneck {config.bottleneck})", "lora": f" (rank {config.rank})",
             "ft-top2": f" (top {config.top_layers} blocks)"}.get(config.method, "")
    return config.method + extra


def read_run(run_dir: str | Path) -> tuple[MethodConfig, PrefixConfig]:
    """The method and prefix settings a run directory was trained with (its run.json)."""
    import json

    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no run.json)")
    info = json.loads(path.read_text())
    return MethodConfig(**info.get("method", {"method": "prefix"})), PrefixConfig(**info["prefix"])
