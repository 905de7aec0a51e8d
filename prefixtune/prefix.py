"""An exported prefix and its file format: P_theta only, with metadata that says which base model
it belongs to.

A prefix file is one ``.safetensors``: per placement ("self"; "encoder", "decoder", "cross") a
``[layers, 2, kv_heads, length, head_dim]`` float32 tensor (0 = keys, 1 = values) and, in the
header, JSON metadata (format version, base model name/architecture/fingerprint, shapes, site,
the config it was trained with). No pickle: loading never runs code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__, attach
from .batch import split_layers
from .config import PrefixConfig

FORMAT = "prefixtune.prefix/1"
POSITIONS = "unshifted"  # real tokens keep positions 0..n-1; a prefix has none (see attach.py)


@dataclass
class Prefix:
    """An exported prefix: P_theta only, per placement a ``[layers, 2, kv_heads, length, head_dim]``
    float32 tensor (index 0 = keys, 1 = values), plus metadata (base model identity, shapes...)."""

    kv: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.kv.values())).shape[3]

    @property
    def site(self) -> str:
        """"prefix" ([P; x; y], the method) or "infix" ([x; P; y], the paper's ablation)."""
        return self.meta.get("site", "prefix")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.kv.values())

    def save(self, path: str | Path) -> Path:
        """Write ``.safetensors`` with the metadata as JSON in its header (atomic)."""
        return save_safetensors(path, self.kv, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "Prefix":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prefix file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                kv = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a valid .safetensors prefix file ({e})") from e
        if "prefixtune" not in header:
            raise ValueError(f"{path}: safetensors file has no 'prefixtune' metadata; was it written by Prefix.save?")
        meta = json.loads(header["prefixtune"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported prefix format {meta.get('format')!r}, expected {FORMAT!r}")
        prefix = cls(kv=kv, meta=meta)
        if not kv:
            raise ValueError(f"{path}: holds no prefix tensor")
        for p, t in kv.items():
            shape = meta["shapes"].get(p)
            if shape is None or t.ndim != 5 or [t.shape[0], t.shape[2], t.shape[4]] != shape or t.shape[1] != 2:
                raise ValueError(f"{path}: tensor {p!r} has shape {tuple(t.shape)}, metadata says {shape}")
            if t.shape[3] < 1:
                raise ValueError(f"{path}: tensor {p!r} has prefix length {t.shape[3]}; a prefix needs at least 1 position")
            if not t.is_floating_point():
                raise ValueError(f"{path}: tensor {p!r} has dtype {t.dtype}, expected a floating-point type")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {p!r} holds NaN or infinite values")
            dims = meta.get("head_dims", {}).get(p, [shape[2], shape[2]])
            if len(dims) != 2 or max(dims) != shape[2] or min(dims) < 1:
                raise ValueError(f"{path}: head_dims {dims} of {p!r} do not fit its stored width {shape[2]}")
        return prefix

    def layer_kv(self, placement: str, tensor: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each ``[rows, kv_heads, length, head size]``, of ``tensor``
        (default: this prefix's, as one row) laid out as ``[rows, layers, 2, kv_heads, length, width]``."""
        t = self.kv[placement][None] if tensor is None else tensor
        kd, vd = self.meta.get("head_dims", {}).get(placement, (t.shape[-1], t.shape[-1]))
        return split_layers(t, kd, vd)

    @classmethod
    def from_peft(cls, path: str | Path, model, allow_position_shift: bool = False) -> "Prefix":
        """A PEFT prefix-tuning checkpoint directory as a prefix for ``model`` (prefixtune/peft_io.py)."""
        from .peft_io import from_peft

        return from_peft(path, model, allow_position_shift)

    def to_peft(self, model, out_dir: str | Path) -> Path:
        """Write this prefix as a PEFT prefix-tuning checkpoint directory (prefixtune/peft_io.py)."""
        from .peft_io import to_peft

        return to_peft(self, model, out_dir)

    def check_compatible(self, model) -> None:
        """Raise a clear error if this prefix was not made for ``model`` (shapes or identity differ)."""
        want = attach.prefix_shapes(model)
        have = {p: tuple(s) for p, s in self.meta.get("shapes", {}).items()}
        for p in self.kv:
            if p not in want.placements:
                raise ValueError(
                    f"prefix has placement {p!r} but model {type(model).__name__} has only {list(want.placements)}"
                )
            if have.get(p) != want.placements[p]:
                raise ValueError(
                    f"prefix shapes do not match the model: prefix {p!r} (layers, kv_heads, head_dim) = "
                    f"{have.get(p)} for base model {self.meta.get('base_model')}, but this model has "
                    f"{want.placements[p]} ({attach.model_identity(model)})"
                )
        for p in self.kv:
            dims = tuple(self.meta.get("head_dims", {}).get(p, (have[p][2], have[p][2])))
            if dims != want.head_dims[p]:
                raise ValueError(f"prefix {p!r} has (key, value) head sizes {dims}, this model {want.head_dims[p]}")
        mine, theirs = self.meta.get("base_model", {}), dict(attach.model_identity(model))
        rule = mine.get("fingerprint_rule", "embeddings/1")  # files of 0.1.0 carry no rule
        if rule != theirs["fingerprint_rule"]:
            theirs.update(fingerprint=attach.fingerprint(model, rule), fingerprint_rule=rule)
        if mine.get("fingerprint") != theirs["fingerprint"] or mine.get("architecture") != theirs["architecture"]:
            raise ValueError(
                f"prefix was trained on base model {mine} but is being used with {theirs}; "
                "a prefix only works with the exact model it was trained on"
            )


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` (as float32) with ``meta`` as JSON under the header's "prefixtune" key, as every
    file prefixtune keeps is written; atomic (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, str(tmp), metadata={"prefixtune": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def make_meta(model, kv: dict[str, torch.Tensor], config: PrefixConfig | None = None, site: str = "prefix") -> dict:
    dims = attach.prefix_shapes(model).head_dims
    head_dims = {p: list(dims[p]) for p in kv if dims[p][0] != dims[p][1]}
    return {
        **({"head_dims": head_dims} if head_dims else {}),
        "site": site,
        "format": FORMAT,
        "library_version": __version__,
        "base_model": attach.model_identity(model),
        "shapes": {p: [t.shape[0], t.shape[2], t.shape[4]] for p, t in kv.items()},
        "placements": list(kv),
        "length": next(iter(kv.values())).shape[3],
        "positions": POSITIONS,
        "config": config.to_json() if config is not None else None,
    }
