"""Mixed-prefix batches equal running each row alone with its own prefix (the paper's multi-user case)."""

import pytest
import torch

import prefixtune as pt
from conftest import CAUSAL_ARCHS, TINY_ARCHS, random_prefix, tiny_model

SOURCES = ["name : The Eagle | Type : coffee shop", "hello", "a much longer source sentence with many more words in it",
           "name : Aromi | food : Chinese | area : riverside"]
TARGETS = ["The Eagle is a coffee shop .", "world", "short", "Aromi serves Chinese food by the river ."]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_scores_equal_single(arch, dtype, tokenizer):
    model = tiny_model(arch).to(dtype)
    p1, p2 = random_prefix(model, 3, seed=1, scale=3.0), random_prefix(model, 7, seed=2, scale=3.0)
    prefixes = [p1, p2, None, p1]
    mixed = pt.score(model, tokenizer, SOURCES, TARGETS, prefixes=prefixes)
    alone = [pt.score(model, tokenizer, [s], [t], prefixes=[p])[0] for s, t, p in zip(SOURCES, TARGETS, prefixes)]
    # float32: padding changes matmul shapes, hence rounding (sums of ~15 log-probs of ~-8 each);
    # float64 shows the computation itself is the same
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=0)
    assert torch.allclose(torch.tensor(mixed, dtype=torch.float64), torch.tensor(alone, dtype=torch.float64), **tol)
    # and the prefixes matter: scores differ from the base model's
    base = pt.score(model, tokenizer, SOURCES, TARGETS)
    assert abs(mixed[0] - base[0]) > 1e-3 and abs(mixed[1] - base[1]) > 1e-3
    assert abs(mixed[2] - base[2]) < 1e-5  # the row without a prefix is the base model


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_generate_equals_single(arch, num_beams, tokenizer):
    model = tiny_model(arch)
    p1, p2 = random_prefix(model, 2, seed=1, scale=3.0), random_prefix(model, 5, seed=2, scale=3.0)
    prefixes = [p1, p2, None, p2]
    kw = dict(num_beams=num_beams, max_new_tokens=8)
    mixed = pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, **kw)
    alone = [pt.generate(model, tokenizer, [s], prefixes=[p], **kw)[0] for s, p in zip(SOURCES, prefixes)]
    assert mixed == alone
    base = pt.generate(model, tokenizer, SOURCES, **kw)
    assert mixed[2] == base[2]
    assert mixed != base  # prefixes change what is generated


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + ["bart"])
def test_long_prefix_generation_and_sampling(arch, tokenizer):
    model = tiny_model(arch)
    p = random_prefix(model, 200, seed=3)
    out = pt.generate(model, tokenizer, SOURCES, prefixes=p, num_beams=2, max_new_tokens=5)
    assert len(out) == len(SOURCES) and all(isinstance(o, str) for o in out)
    torch.manual_seed(0)
    sampled = pt.generate(model, tokenizer, SOURCES[:2], prefixes=p, do_sample=True, temperature=1.0, top_k=0,
                          max_new_tokens=6, num_return_sequences=3)
    assert len(sampled) == 2 and all(len(group) == 3 for group in sampled)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + ["bart"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_steps_without_concatenation_equal_concatenation(arch, num_beams, tokenizer, monkeypatch):
    """Decoding steps attend to the prefix without re-concatenating it (attach._decode_step_attention):
    the step logits equal those of the plain concatenated attention."""
    from prefixtune import attach
    from prefixtune.batch import make_batch
    from prefixtune.template import collate_prompts, encode, special_ids

    model = tiny_model(arch)
    p1, p2 = random_prefix(model, 3, seed=1, scale=3.0), random_prefix(model, 200, seed=2, scale=3.0)
    batch = collate_prompts(model, [encode(model, tokenizer, s).prompt for s in SOURCES[:3]], special_ids(tokenizer)[2])
    calls = []
    fast = attach._decode_step_attention
    monkeypatch.setattr(attach, "_decode_step_attention", lambda *a: calls.append(1) or fast(*a))
    results = {}
    for mode, prefixes in [("shared", [p2] * 3), ("mixed", [p1, p2, None])]:
        for on in (True, False):
            monkeypatch.setattr(attach, "FAST_DECODE", on)
            out = model.generate(**batch, prefix_batch=make_batch(prefixes), num_beams=num_beams, max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
            results[mode, on] = out
        assert calls, "the decode-step path was not taken"
        a, b = results[mode, True], results[mode, False]
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits):
            assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)
        calls.clear()


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_cpu_grouped_query_kernel_equals_repeated_heads(arch, tokenizer, monkeypatch):
    """Forward and prefix gradients with torch's GQA kernel equal transformers' repeated-heads path."""
    from prefixtune import attach
    from prefixtune.template import collate_train, encode, special_ids

    model = tiny_model(arch, init_range=0.2)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=4, mlp_hidden=8))
    batch = collate_train(model, [encode(model, tokenizer, s, t) for s, t in zip(SOURCES, TARGETS)], special_ids(tokenizer)[2])
    gqa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: gqa_calls.append(k.get("enable_gqa")) or sdpa(*a, **k))
    results = []
    for on in (True, False):
        monkeypatch.setattr(attach, "CPU_GQA", on)
        tuner.zero_grad()
        out = tuner(**batch)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in tuner.parameters()]))
    assert True in gqa_calls  # the grouped-query kernel was used
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(ga, gb))


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "t5"])
def test_generate_returns_tokens_and_logprobs(arch, tokenizer):
    """return_tokens: the ids behind the text (up to the first EOS); encoded prompts as sources give the
    same; logprobs: each token's log p under the model's raw logits, its top-k sorted."""
    model = tiny_model(arch, init_range=0.2)
    p = random_prefix(model, 3, seed=1, scale=3.0)
    prefixes = [p, None, p, None]
    texts = pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, max_new_tokens=8)
    gens = pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, max_new_tokens=8, return_tokens=True, logprobs=3)
    assert [tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in gens] == texts
    assert all(0 < len(g.tokens) <= 8 and 2 not in g.tokens[:-1] for g in gens)
    prompts = [pt.template.encode(model, tokenizer, s).prompt for s in SOURCES]
    again = pt.generate(model, tokenizer, prompts, prefixes=prefixes, max_new_tokens=8, return_tokens=True)
    assert [g.tokens for g in again] == [g.tokens for g in gens] and again[0].logprobs is None
    for g in gens:
        for token, (lp, top) in zip(g.tokens, g.logprobs):
            assert len(top) == 3 and top[0] == (token, lp)  # greedy: the chosen token is the most likely
            assert top[0][1] >= top[1][1] >= top[2][1] and lp < 0
    with pytest.raises(ValueError, match="num_beams=1"):
        pt.generate(model, tokenizer, SOURCES[:1], num_beams=2, return_tokens=True, logprobs=1)


def test_low_precision_decoding_gives_the_lm_head_a_contiguous_input(tokenizer):
    """bfloat16 on CPU: generate's first step slices the last position (a strided view), which the
    bf16 LM head would run as a batched matmul copying its weight per row. The input is made
    contiguous for the call only; float32 models are untouched."""
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    head = model.get_output_embeddings()
    seen, forward = [], head.forward
    head.forward = lambda x: seen.append(x.is_contiguous()) or forward(x)  # runs after the pre-hooks
    out = pt.generate(model, tokenizer, SOURCES, max_new_tokens=3)
    del head.forward
    assert len(out) == len(SOURCES) and seen and all(seen)
    assert not head._forward_pre_hooks  # nothing left on the model
    from prefixtune.generate import _contiguous_lm_head_input
    assert _contiguous_lm_head_input(tiny_model("llama-gqa")) is None


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_static_cache_decoding_equals_the_default_cache(arch, tokenizer):
    """transformers' static KV cache (``cache_implementation="static"``, a generate keyword that passes
    through): keys and values preallocated to the full length, unused positions masked. With prefixes
    (mixed, and a row without) the tokens equal the default cache's in float32 (benchmarks/precision.py
    measures its speed)."""
    model = tiny_model(arch)
    p1, p2 = random_prefix(model, 2, seed=1, scale=3.0), random_prefix(model, 5, seed=2, scale=3.0)
    prefixes = [p1, p2, None, p2]
    kw = dict(max_new_tokens=8)
    static = pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, cache_implementation="static", **kw)
    assert static == pt.generate(model, tokenizer, SOURCES, prefixes=prefixes, **kw)
    assert static != pt.generate(model, tokenizer, SOURCES, **kw)  # the prefixes are used


def test_generate_refuses_settings_it_cannot_run(tokenizer):
    """A batch size or beam count below 1 used to end in a ZeroDivisionError or a cryptic range() error,
    and a top_p above 1 was silently no filtering at all: each is refused, named."""
    model = tiny_model("llama-gqa")
    for kwargs, message in ((dict(batch_size=0), "batch size must be >= 1, got 0"),
                            (dict(num_beams=0), "num_beams must be >= 1, got 0"),
                            (dict(do_sample=True, top_p=2.0), r"top_p is a probability mass in \(0, 1\], got 2.0")):
        with pytest.raises(ValueError, match=message):
            pt.generate(model, tokenizer, SOURCES[:2], max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        pt.score(model, tokenizer, SOURCES[:2], TARGETS[:2], batch_size=0)
