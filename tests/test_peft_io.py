"""Prefixes to and from PEFT's prefix-tuning checkpoints (prefixtune/peft_io.py)."""

import copy
import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import prefixtune as pt
from prefixtune.cli import main
from prefixtune.batch import make_batch
from conftest import random_prefix, tiny_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def _ours(model, prefix):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, prefix_batch=make_batch([prefix, prefix])).logits


def _peft(model, directory, **kw):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directory))
    peft_model.eval()
    with torch.no_grad():
        return peft_model(input_ids=IDS, attention_mask=MASK, **kw).logits


def _close(a, b):
    return (a - b)[MASK.bool()].abs().max()


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_export_to_peft_and_back_rotary(arch, tmp_path):
    model = tiny_model(arch, init_range=0.2)
    prefix = random_prefix(model, 4, seed=0, scale=0.5)
    prefix.to_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    # PEFT's own loader and forward (prefix in its cache, positions shifted) give our logits
    ours, theirs = _ours(model, prefix), _peft(model, tmp_path / "peft")
    assert _close(ours, theirs) < 1e-4
    with torch.no_grad():
        assert _close(model(input_ids=IDS, attention_mask=MASK).logits, theirs) > 0.1  # the prefix matters
    # and back: ours -> PEFT -> ours is the same prefix
    back = pt.Prefix.from_peft(tmp_path / "peft", model)
    assert torch.allclose(back.kv["self"], prefix.kv["self"], atol=1e-5)
    back.check_compatible(model)


def test_import_a_peft_trained_checkpoint(tmp_path):
    """A checkpoint written by PEFT itself (trained with the MLP projection, saved with save_pretrained)."""
    model = tiny_model("llama-gqa", init_range=0.2)
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "trained"))
    prefix = pt.Prefix.from_peft(tmp_path / "trained", model)
    assert _close(_ours(model, prefix), _peft(model, tmp_path / "trained")) < 1e-4


def test_absolute_positions_are_said_not_silently_converted(tmp_path):
    """GPT-2: under PEFT the inputs take positions L.., under prefixtune 0..: the same P, but equal
    outputs only when our inputs are shifted too; importing needs an explicit opt-in."""
    model = tiny_model("gpt2", init_range=0.2)
    prefix = random_prefix(model, 4, seed=0, scale=0.5)
    prefix.to_peft(model, tmp_path / "peft")
    theirs = _peft(model, tmp_path / "peft")
    with torch.no_grad():
        shifted = model(input_ids=IDS, attention_mask=MASK, position_ids=torch.arange(4, 11)[None].expand(2, -1),
                        prefix_batch=make_batch([prefix, prefix])).logits
    assert _close(shifted, theirs) < 1e-4
    assert _close(_ours(model, prefix), theirs) > 1e-3  # PEFT's shift: not our outputs
    with pytest.raises(ValueError, match="absolute position embeddings"):
        pt.Prefix.from_peft(tmp_path / "peft", model)
    back = pt.Prefix.from_peft(tmp_path / "peft", model, allow_position_shift=True)
    assert torch.equal(back.kv["self"], prefix.kv["self"])


def test_bad_checkpoints_are_refused(tmp_path):
    model = tiny_model("llama-gqa")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pt.Prefix.from_peft(tmp_path, model)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never loads"):
        pt.Prefix.from_peft(tmp_path, model)
    random_prefix(model, 3, seed=0).to_peft(model, tmp_path / "ok")
    other = tmp_path / "lora"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="expected 'PREFIX_TUNING'"):
        pt.Prefix.from_peft(other, model)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 128\).*\(3, 32\)"):
        pt.Prefix.from_peft(tmp_path / "ok", tiny_model("qwen2"))  # 1 kv head, not 2
    with pytest.raises(ValueError, match="decoder-only"):
        random_prefix(tiny_model("bart"), 2, seed=0).to_peft(tiny_model("bart"), tmp_path / "b")


def test_cli_import_and_export(tmp_path, tokenizer, smollm2):
    """On the embedded SmolLM2: export-peft writes what PEFT loads and gives our logits; import-peft reads it back."""
    model, _ = smollm2
    prefix = random_prefix(model, 5, seed=0, scale=0.3)
    src = prefix.save(tmp_path / "p.safetensors")
    assert main(["export-peft", str(src), "--out", str(tmp_path / "peft")]) == 0
    with torch.no_grad():
        ids, mask = IDS[:1], MASK[:1]
        ours = model(input_ids=ids, attention_mask=mask, prefix_batch=make_batch([prefix])).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max() < 1e-3
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back = pt.Prefix.load(tmp_path / "back.safetensors")
    assert torch.allclose(back.kv["self"], prefix.kv["self"], atol=1e-4)
