"""prefixtune.beam: beam search with final rows retired gives transformers' beam search outputs.

Random tiny models repeat one token and never end a row early, so these tests raise the end token's
logit where a pseudo-random function of the row's own hidden state is high (``_ending``): rows then
end at different steps, as a trained model's do, and a forward hook checks that the batch shrank.
"""

import importlib

import pytest
import torch

import prefixtune as pt
from prefixtune import beam
from prefixtune.batch import make_batch
from architectures import ARCHS, tiny_tokenizer
from conftest import random_prefix

generate_module = importlib.import_module("prefixtune.generate")  # the module (prefixtune.generate is the function)
SOURCES = ["name : The Eagle | Type : coffee shop", "hello there", "a longer source with more words in it",
           "one table to text", "short", "world is a coffee shop hello"]
CAUSAL = [a for a in ARCHS if a.expect == "works" and not a.seq2seq]
# models whose generate passes inputs beam.beam_search does not know: transformers' loop runs them
TRANSFORMERS_LOOP = {"gemma3": "its generate passes mm_encoder_outputs"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ending(module, args, logits):
    """The LM head's output with the end token (id 2) raised where sin(1000 h_0) > 0.95."""
    logits[..., 2] += 12 * (torch.sin(1000 * args[0][..., 0].float()) > 0.95).to(logits.dtype)
    return logits


def _both(model, tokenizer, monkeypatch, **kw):
    """(tokens with rows retired, tokens from transformers' loop, batch sizes the retiring run saw)."""
    rows = []  # the batch size of each decoding step (one new token per row)

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if ids.shape[1] == 1:
            rows.append(ids.shape[0])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    out = {}
    for retire in (True, False):
        monkeypatch.setattr(generate_module, "RETIRE_ROWS", retire)
        rows.clear()
        gens = pt.generate(model, tokenizer, SOURCES, return_tokens=kw.get("num_return_sequences", 1) == 1, **kw)
        out[retire] = ([g.tokens for g in gens] if kw.get("num_return_sequences", 1) == 1 else gens), list(rows)
    hook.remove()
    return out[True][0], out[False][0], out[True][1]


@pytest.mark.parametrize("arch", CAUSAL, ids=[f"{a.model_type}-{i}" for i, a in enumerate(CAUSAL)])
def test_retiring_rows_gives_transformers_beam_search(arch, tokenizer, monkeypatch):
    fallbacks, real = [], beam._HF._beam_search
    monkeypatch.setattr(beam._HF, "_beam_search", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    model = arch.build(arch.attn[0])
    model.get_output_embeddings().register_forward_hook(_ending)
    p1, p2 = random_prefix(model, 2, seed=2, scale=3.0), random_prefix(model, 5, seed=3, scale=3.0)
    prefixes = [p1, None, p2, p1, None, p2]
    settings = [  # E2E-like, summarization-like (processors, a length penalty), early stopping
        dict(num_beams=3, max_new_tokens=12),
        dict(num_beams=4, max_new_tokens=12, min_new_tokens=3, no_repeat_ngram_size=2, length_penalty=0.6),
        dict(num_beams=3, max_new_tokens=12, early_stopping=True, length_penalty=1.5),
    ]
    cases, shrank = [(kw, prefixes) for kw in settings] + [(settings[0], p1), (settings[0], None)], []
    for kw, ps in cases:  # mixed prefixes in every setting; one shared prefix, and none
        fallbacks.clear()
        retired, hf, rows = _both(model, tokenizer, monkeypatch, prefixes=ps, **kw)
        assert retired == hf, kw
        # transformers' loop ran once (RETIRE_ROWS off), or twice where this model falls back to it
        assert len(fallbacks) == 1 + (arch.model_type in TRANSFORMERS_LOOP)
        shrank.append(min(rows) < max(rows))
    if arch.model_type not in TRANSFORMERS_LOOP:
        assert sum(shrank) >= 3, f"rows were retired early in only {sum(shrank)} of {len(cases)} cases; the test needs more"
    # several returned sequences per source
    retired, hf, _ = _both(model, tokenizer, monkeypatch, prefixes=prefixes, num_beams=3,
                           num_return_sequences=2, max_new_tokens=10)
    assert retired == hf


def test_unsupported_settings_run_transformers_loop(tokenizer, monkeypatch):
    """Logits processors it does not know and encoder-decoder models go to transformers' own beam search."""
    from conftest import tiny_model

    model = CAUSAL[0].build("sdpa")
    calls, real = [], beam._HF._beam_search
    monkeypatch.setattr(beam._HF, "_beam_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    for kw in (dict(sequence_bias={(5,): 1.0}), dict(exponential_decay_length_penalty=(4, 1.1))):
        calls.clear()
        pt.generate(model, tokenizer, SOURCES, num_beams=3, max_new_tokens=6, **kw)
        assert calls, kw
    bart = tiny_model("bart")
    assert not beam.supported(bart, [], [], bart.generation_config, False, {})


def test_selected_prefix_rows_equal_a_batch_of_those_rows():
    model = CAUSAL[1].build("sdpa")
    p1, p2 = random_prefix(model, 2, seed=2), random_prefix(model, 5, seed=3)
    infix = random_prefix(model, 3, seed=4)
    infix.meta["site"] = "infix"  # rows with an infix carry their separator position (visible_from)
    prefixes, seps = [p1, None, p2, infix], [4, 5, 6, 7]
    batch = make_batch(prefixes, separators=seps)
    rows = torch.tensor([3, 0, 2])
    got, want = batch.select(rows), make_batch([prefixes[i] for i in rows], separators=[seps[i] for i in rows])
    for placement in want.kv:
        for (gk, gv), (wk, wv) in zip(got.kv[placement], want.kv[placement]):
            assert torch.equal(gk, wk) and torch.equal(gv, wv)
        assert torch.equal(got.mask[placement], want.mask[placement])
    assert torch.equal(got.visible_from, want.visible_from)
    shared = make_batch([p1] * 4)
    assert shared.select(rows).kv["self"][0][0] is shared.kv["self"][0][0]  # stays shared
