"""Exported prefixes: safetensors + JSON metadata, validated on load; never pickle."""

import json

import pytest
import torch
from safetensors.torch import save_file

import prefixtune as pt
from conftest import random_prefix, tiny_model


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("llama-gqa")
    prefix = random_prefix(model, 5, seed=0)
    path = prefix.save(tmp_path / "p.safetensors")
    loaded = pt.Prefix.load(path)
    assert torch.equal(loaded.kv["self"], prefix.kv["self"])
    meta = loaded.meta
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"
    assert meta["shapes"] == {"self": [2, 2, 16]} and meta["length"] == 5
    assert meta["positions"] == "unshifted" and meta["library_version"] == pt.__version__
    loaded.check_compatible(model)
    # the file is plain safetensors: its header is JSON, there is no pickle anywhere
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["prefixtune"])["length"] == 5
    assert b"\x80\x04" not in raw[:16]  # not a pickle stream
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_wrong_model_is_refused_with_both_names(tmp_path):
    prefix = random_prefix(tiny_model("llama-gqa"), 4, seed=0)
    with pytest.raises(ValueError, match=r"shapes do not match.*\(2, 2, 16\).*\(2, 4, 8\)"):
        prefix.check_compatible(tiny_model("gpt2"))
    other = tiny_model("llama-gqa", seed=1)  # same shapes, different weights
    with pytest.raises(ValueError, match="trained on base model .*fingerprint.* but is being used with"):
        prefix.check_compatible(other)
    with pytest.raises(ValueError, match="trained on base model"):
        pt.generate(other, None, ["x"], prefixes=prefix)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        pt.Prefix.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a valid .safetensors"):
        pt.Prefix.load(corrupt)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"self": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="not a valid"):
        pt.Prefix.load(pickled)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="no 'prefixtune' metadata"):
        pt.Prefix.load(foreign)
    # metadata that lies about the shapes
    prefix = random_prefix(tiny_model("gpt2"), 3, seed=0)
    prefix.meta["shapes"]["self"] = [2, 4, 16]
    prefix.save(tmp_path / "lying.safetensors")
    with pytest.raises(ValueError, match="metadata says"):
        pt.Prefix.load(tmp_path / "lying.safetensors")
    # length 0 (a valid safetensors file whose metadata agrees) and non-float tensors
    good = random_prefix(tiny_model("llama-gqa"), 2, seed=0)
    pt.Prefix(kv={"self": good.kv["self"][:, :, :, :0]}, meta=dict(good.meta, length=0)).save(tmp_path / "zero.safetensors")
    with pytest.raises(ValueError, match="zero.safetensors: tensor 'self' has prefix length 0"):
        pt.Prefix.load(tmp_path / "zero.safetensors")
    save_file({"self": good.kv["self"].long().contiguous()}, str(tmp_path / "int.safetensors"),
              metadata={"prefixtune": json.dumps(good.meta)})
    with pytest.raises(ValueError, match="dtype torch.int64, expected a floating-point"):
        pt.Prefix.load(tmp_path / "int.safetensors")
