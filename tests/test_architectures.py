"""Every architecture of tests/architectures.py either works or is refused at construction, nothing else.

Works means, on a tiny random config, for each tested attention implementation (sdpa, eager):
the tuner has trainable parameters and gradients reach every placement's prefix; changing any one
layer's prefix changes the logits; after enabling, a forward and a generation without a prefix equal
the untouched model's; mixed-prefix greedy and beam generation equal each row alone, a row without a
prefix equals plain generation; mixed scores equal scores alone; for rotary models a words prefix
equals running the words in front of the input. Refused means PrefixTuner raises
UnsupportedModelError naming the architecture.
"""

import copy

import pytest
import torch

import prefixtune as pt
from prefixtune import attach
from prefixtune.attach import UnsupportedModelError
from architectures import ARCHS, tiny_tokenizer
from conftest import random_prefix

SOURCES = ["name : The Eagle | Type : coffee shop", "hello there", "a longer source with more words in it"]
TARGETS = ["The Eagle is a coffee shop .", "world", "short one"]
CASES = [(a, attn) for a in ARCHS for attn in a.attn]


def _ids(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    if attach.is_seq2seq(model):
        kw["decoder_input_ids"] = torch.randint(3, 200, (2, 5), generator=g)
    return kw


def _logits(model, prefix=None, **kw):
    batch = pt.batch.make_batch([prefix] * 2) if prefix is not None else None
    with torch.no_grad():
        return model(**_ids(model), **kw, **({"prefix_batch": batch} if batch is not None else {})).logits


def _hf_generate(model, tokenizer, sources, **kw):
    """Plain transformers generation of the untouched model, decoded as prefixtune decodes."""
    from prefixtune.template import collate_prompts, encode, special_ids

    _, eos, pad = special_ids(tokenizer)
    out = []
    for s in sources:
        batch = collate_prompts(model, [encode(model, tokenizer, s).prompt], pad)
        ids = model.generate(**batch, do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw)
        if not attach.is_seq2seq(model):
            ids = ids[:, batch["input_ids"].shape[1]:]
        out.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch,attn", CASES, ids=[f"{a.model_type}-{attn}" for a, attn in CASES])
def test_architecture(arch, attn, tokenizer):
    model = arch.build(attn)
    if arch.expect == "refused":
        before = _logits(model)
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            pt.PrefixTuner(model, pt.PrefixConfig(length=3))
        assert torch.equal(_logits(model), before)  # refusing leaves the model as it was
        assert model.config._attn_implementation == attn
        return
    untouched = copy.deepcopy(model)
    gen = dict(max_new_tokens=6)
    plain = _hf_generate(untouched, tokenizer, SOURCES, **gen)

    # trainable, and gradients reach every placement's prefix
    torch.manual_seed(0)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=16))
    assert tuner.num_trainable_parameters() > 0
    assert set(tuner.encoders) == set(attach.placements_of(model))
    labels = _ids(model)["decoder_input_ids"] if attach.is_seq2seq(model) else _ids(model)["input_ids"].clone()
    tuner.train()
    tuner(**{k: v for k, v in _ids(model).items() if k not in ("use_cache", "decoder_input_ids")}, labels=labels).loss.backward()
    for placement, encoder in tuner.encoders.items():
        grads = [p.grad for p in encoder.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches the {placement} prefix"
    tuner.eval()

    # without a prefix the model is what it was
    assert torch.allclose(_logits(model), _logits(untouched), atol=1e-5, rtol=1e-5)

    # every layer's prefix matters
    prefix = random_prefix(model, 3, seed=1, scale=3.0)
    with_prefix = _logits(model, prefix)
    assert not torch.allclose(with_prefix, _logits(model), atol=1e-4)
    for placement, t in prefix.kv.items():
        for layer in range(t.shape[0]):
            changed = copy.deepcopy(prefix)
            changed.kv[placement][layer] += 1.0
            assert not torch.allclose(_logits(model, changed), with_prefix, atol=1e-5), \
                f"{placement} layer {layer}'s prefix does not change the logits"

    # mixed batches equal rows alone; a row without a prefix is plain generation
    p1, p2 = random_prefix(model, 2, seed=2, scale=3.0), random_prefix(model, 5, seed=3, scale=3.0)
    prefixes = [p1, None, p2]
    for beams in (1, 2):
        mixed = pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, num_beams=beams, **gen)
        alone = [pt.generate(model, tokenizer, [s], prefixes=[p], num_beams=beams, **gen)[0]
                 for s, p in zip(SOURCES, prefixes)]
        assert mixed == alone, f"beam {beams}: mixed batch differs from rows alone"
    assert pt.generate(model, tokenizer, SOURCES, **gen) == plain
    assert pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, **gen)[1] == plain[1]
    mixed = pt.score(model, tokenizer, SOURCES, TARGETS, prefixes=prefixes)
    alone = [pt.score(model, tokenizer, [s], [t], prefixes=[p])[0] for s, t, p in zip(SOURCES, TARGETS, prefixes)]
    assert torch.allclose(torch.tensor(mixed), torch.tensor(alone), atol=1e-4, rtol=1e-5)

    if not arch.seq2seq:  # words initialisation: the words in front of x where positions are relative
        words = pt.PrefixTuner(model, pt.PrefixConfig(length=4, reparameterize=False, init="words",
                                                      init_text="table to text"), tokenizer=tokenizer)
        assert words.words_in_front == arch.rotary
        if arch.rotary:
            ids = tokenizer("table to text", add_special_tokens=False).input_ids
            ids = (ids * 4)[:4]
            x = torch.tensor([[11, 12, 13, 14, 15]])
            with torch.no_grad():
                joint = model(input_ids=torch.cat([torch.tensor([ids]), x], 1), use_cache=False).logits[:, 4:]
                prefixed = model(input_ids=x, use_cache=False,
                                 prefix_batch=pt.batch.make_batch([words.export()])).logits
            assert torch.allclose(prefixed, joint, atol=1e-4, rtol=1e-4), (prefixed - joint).abs().max()


def test_readme_support_table_is_generated_from_this_list():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("support_table", root / "scripts" / "support_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (root / "README.md").read_text()
    assert module.render(readme) == readme, "README.md's support table is stale: run python scripts/support_table.py"
    assert all(f"`{a.model_type}`" in readme for a in ARCHS)
