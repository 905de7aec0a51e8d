"""Every way of tuning the base model that prefixtune trains, by name: the method and the paper's baselines.

A method is one module with a :class:`Tuner` subclass (the trainable wrapper around a base model)
plus one :func:`register_method` line below, in the spirit of PEFT's ``register_peft_method``. The
trainer, ``prefixtune train --method``, ``prefixtune generate --run`` and the experiments read
everything else from the registry :data:`METHODS`.

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

import importlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from .config import PrefixConfig
from .loss import lm_forward


class Tuner(nn.Module):
    """The contract of every method's trainable wrapper, so that one trainer, data pipeline and
    decoding serve them all.

    - ``parameters()`` are exactly the trainable weights: the base model is held, not registered as
      a submodule (``self.model``); ``train()``/``eval()`` switch the base model too.
    - ``forward(input_ids, attention_mask, labels, return_logits)`` returns the loss on the target
      tokens (:func:`prefixtune.loss.lm_forward`, reduced by ``self.reduction``).
    - :meth:`build` makes the wrapper for a :class:`MethodConfig`; :meth:`save_trained` writes what
      the method keeps after training into a run directory (``trained_file`` among it);
      :meth:`load_trained` puts that on a fresh base model for decoding and returns the keyword
      arguments of :func:`prefixtune.generate` / :func:`prefixtune.score` that go with it (the
      method's extra decode inputs: ``prefixes=``, ``soft_prompt=``, or none when the weights live in
      the model); :meth:`decode_inputs` gives the same for the weights being trained.
    """

    method = "?"
    trained_file = "weights.safetensors"
    reduction = "token_mean"

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: see the class docstring

    @classmethod
    def build(cls, model, config: MethodConfig, prefix_config: PrefixConfig, tokenizer=None) -> Tuner:
        """The wrapper for ``config`` around a freshly loaded ``model`` (some methods change the model
        object in place: use a fresh one per run)."""
        raise NotImplementedError

    @classmethod
    def load_trained(cls, model, run_dir: Path, config: MethodConfig, prefix_config: PrefixConfig) -> dict:
        raise NotImplementedError

    def save_trained(self, out_dir: str | Path) -> Path:
        raise NotImplementedError

    def decode_inputs(self) -> dict:
        return {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_logits: bool = True, **kwargs):
        return lm_forward(self.model, self.reduction, input_ids, attention_mask, labels, return_logits, **kwargs)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_stored_parameters(self) -> int:
        return self.num_trainable_parameters()


@dataclass(frozen=True)
class Method:
    """One registered method. ``tuner``: its :class:`Tuner` subclass as ``"module:Class"`` (imported
    when first used). ``lr_grid``: the peak learning rates the experiments' learning-rate grid tries
    for it (see prefixtune/experiments/lr_grid.py). ``options``: the :class:`MethodConfig` fields it
    uses (recorded in run.json). ``prefix_options``: the :class:`PrefixConfig` fields it uses (every
    method trains with its ``loss``). ``help``: one line for ``prefixtune train --help``."""

    name: str
    tuner_path: str
    lr_grid: tuple[float, ...]
    options: tuple[str, ...] = ()
    prefix_options: tuple[str, ...] = ("loss",)
    help: str = ""

    @property
    def has_length(self) -> bool:
        """Sized by ``PrefixConfig.length`` (the prefix-like methods)."""
        return "length" in self.prefix_options

    @property
    def tuner(self) -> type[Tuner]:
        module, _, cls = self.tuner_path.partition(":")
        return getattr(importlib.import_module(module), cls)


METHODS: dict[str, Method] = {}


def register_method(name: str, tuner: str, lr_grid: tuple[float, ...], options: tuple[str, ...] = (),
                    prefix_options: tuple[str, ...] = ("loss",), help: str = "") -> Method:
    """Make method ``name`` known to the trainer, the CLI and the experiments (see :class:`Method`)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered already")
    METHODS[name] = Method(name, tuner, tuple(lr_grid), tuple(options), tuple(prefix_options), help)
    return METHODS[name]


PREFIX_ALL = tuple(f.name for f in fields(PrefixConfig))


# Learning-rate grids: 3 values per method, around the rates that 40-step probes had found (prefix
# 5e-4, fine-tuning 5e-5, adapters/LoRA 1e-3), a factor ~3 apart.
register_method("prefix", "prefixtune.tuner:PrefixTuner", (1e-4, 3e-4, 1e-3), prefix_options=PREFIX_ALL,
                help="the paper's method")
register_method("finetune", "prefixtune.baselines.finetune:FineTuneModel", (1e-5, 3e-5, 1e-4), help="all weights")
register_method("ft-top2", "prefixtune.baselines.finetune:FineTuneModel", (3e-5, 1e-4, 3e-4), ("top_layers",),
                help="the top --top-layers blocks")
register_method("adapter", "prefixtune.baselines.adapter:AdapterModel", (3e-4, 1e-3, 3e-3), ("size", "bottleneck"),
                help="Houlsby adapters of ~--size of the model's parameters")
register_method("lora", "prefixtune.baselines.lora:LoraModel", (3e-4, 1e-3, 3e-3), ("size", "rank"),
                help="LoRA (PEFT) of ~--size of the model's parameters")
register_method("prompt", "prefixtune.baselines.prompt:PromptModel", (1e-4, 3e-4, 1e-3),
                prefix_options=("length", "reparameterize", "mlp_hidden", "embed_dim", "loss"),
                help="embedding-only ablation")
register_method("infix", "prefixtune.baselines.infix:InfixTuner", (1e-4, 3e-4, 1e-3), prefix_options=PREFIX_ALL,
                help="[x; INFIX; y] ablation")
register_method("peft-prefix", "prefixtune.baselines.peft_prefix:PeftPrefixModel", (1e-4, 3e-4, 1e-3),
                prefix_options=("length", "reparameterize", "mlp_hidden", "loss"),
                help="PEFT's prefix tuning (converted to our format for decoding)")


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
        keep = METHODS[self.method].options
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k in keep}}


def build(config: MethodConfig, model, prefix_config: PrefixConfig, tokenizer=None) -> Tuner:
    """The trainable wrapper for ``config.method`` around ``model`` (LoRA and adapters change the model
    object in place: use a fresh one per run). Resolves ``bottleneck``/``rank`` from ``size``."""
    return METHODS[config.method].tuner.build(model, config, prefix_config, tokenizer)


def load_trained(config: MethodConfig, model, run_dir: str | Path, prefix_config: PrefixConfig | None = None) -> dict:
    """Put the trained result in ``run_dir`` on ``model`` (a fresh base model) for decoding; returns the
    keyword arguments of :func:`prefixtune.generate` / :func:`prefixtune.score` that go with it
    (``prefixes=`` or ``soft_prompt=``; none when the weights now live in the model)."""
    tuner = METHODS[config.method].tuner
    if not (Path(run_dir) / tuner.trained_file).is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained {config.method} result yet ({tuner.trained_file}): the "
                                "training writes it at its evaluations (the best so far with a dev set)")
    return tuner.load_trained(model, Path(run_dir), config, prefix_config or PrefixConfig())


def unused_settings(config: MethodConfig, prefix_config: PrefixConfig) -> list[str]:
    """The fields of ``prefix_config`` and ``config`` set away from their defaults that this
    configuration does not use: not the method's, the words-initialisation settings under
    ``init="random"``, the MLP's without it (``reparameterize=False``). ``prefixtune train`` and
    ``train-many`` refuse them: whoever sets one expects it to change something."""
    method = METHODS[config.method]
    uses = set(method.prefix_options)
    if prefix_config.init != "words":
        uses -= {"init_text", "init_steps", "init_lr"}
    if not prefix_config.reparameterize:  # P trained directly (words copied, not fitted)
        uses -= {"mlp_hidden", "embed_dim", "init_steps", "init_lr"}
    return [f.name for f in fields(PrefixConfig) if f.name not in uses and getattr(prefix_config, f.name) != f.default] + \
           [f.name for f in fields(MethodConfig)
            if f.name not in ("method", *method.options) and getattr(config, f.name) != f.default]


def check_used(config: MethodConfig, prefix_config: PrefixConfig) -> None:
    """Raise ValueError naming the :func:`unused_settings` of a train-many job or a server training
    request (by field name, as they are given there)."""
    unused = unused_settings(config, prefix_config)
    if unused:
        raise ValueError(f"{unused} would change nothing with method {config.method!r}, init {prefix_config.init!r}"
                         f"{'' if prefix_config.reparameterize else ' and reparameterize false'}")


def describe(config: MethodConfig) -> str:
    """"adapter (bottleneck 12)": the method and the options it resolved (not the size it was asked for)."""
    shown = [f"{k.replace('_', ' ')} {v}" for k, v in config.to_json().items() if k not in ("method", "size")]
    return config.method + (f" ({', '.join(shown)})" if shown else "")


def read_run(run_dir: str | Path) -> tuple[MethodConfig, PrefixConfig]:
    """The method and prefix settings a run directory was trained with (its run.json)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no run.json)")
    info = json.loads(path.read_text())
    return MethodConfig(**info.get("method", {"method": "prefix"})), PrefixConfig(**info["prefix"])
