"""How prefixes reach attention: masks of every implementation, refusals, identity, words initialisation.

Regression tests of issue 12 (each was a silent wrong result or an unhelpful crash before).
"""

import copy

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import prefixtune as pt
from prefixtune import attach
from prefixtune.attach import UnsupportedModelError
from architectures import ARCHS
from conftest import random_prefix, tiny_model


def _batch(seq2seq: bool):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    kw = dict(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), use_cache=False)
    if seq2seq:
        kw["decoder_input_ids"] = ids[:, :4]
    return kw


def _logits(model, **kw):
    with torch.no_grad():
        return model(**_batch(attach.is_seq2seq(model)), **kw).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "bart", "t5"])
def test_eager_model_without_prefix_is_unchanged_by_enable(arch):
    """Was: the sdpa-style mask (boolean, or None for causal) reached the eager function unchanged
    (logits off by 4.2 / 6 / 1.0 / 3.3)."""
    model = tiny_model(arch)
    model.config._attn_implementation = "eager"
    for c in attach._configs(model):
        c._attn_implementation = "eager"
    before = _logits(model)
    attach.enable(model)
    assert model.config._attn_implementation == "prefixtune"
    assert torch.allclose(_logits(model), before, atol=1e-6, rtol=1e-6)
    # and a prefix on an eager model gives what it gives on the same model under sdpa
    sdpa = tiny_model(arch)
    prefix = random_prefix(sdpa, 3, seed=1, scale=3.0)
    batch = pt.batch.make_batch([prefix, None])
    assert torch.allclose(_logits(model, prefix_batch=batch), _logits(sdpa, prefix_batch=batch), atol=1e-5)


def _padding_mask_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                            is_causal=None, **kwargs):
    """A stand-in for flash attention (which needs a GPU): takes the 2-D padding mask and does
    causality and the sliding window itself."""
    q_len, k_len = query.shape[2], key.shape[2]
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    mask = j <= i
    if sliding_window:
        mask = mask & (i - j < sliding_window)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def test_padding_mask_implementations_keep_their_kernel_without_a_prefix():
    """flash-attention-like implementations (a 2-D padding mask, causality and window in the kernel):
    without a prefix the model's own function runs; with one, sdpa with the same causal, window and
    padding rules, so the result equals the sdpa model's."""
    AttentionInterface.register("test_padding", _padding_mask_attention)
    AttentionMaskInterface.register("test_padding", flash_attention_mask)
    calls = []
    AttentionInterface.register("test_padding", lambda *a, **k: calls.append(1) or _padding_mask_attention(*a, **k))
    config = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=256, sliding_window=3, bos_token_id=1,
                              eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    flashlike = tf.MistralForCausalLM._from_config(config, attn_implementation="test_padding").eval()
    sdpa = copy.deepcopy(flashlike)
    for c in attach._configs(sdpa):
        c._attn_implementation = "sdpa"
    assert torch.allclose(_logits(flashlike), _logits(sdpa), atol=1e-5)
    attach.enable(flashlike)
    calls.clear()
    assert torch.allclose(_logits(flashlike), _logits(sdpa), atol=1e-5)
    assert calls  # its own function ran
    prefix = random_prefix(sdpa, 3, seed=1, scale=3.0)
    batch = pt.batch.make_batch([prefix, None])
    calls.clear()
    assert torch.allclose(_logits(flashlike, prefix_batch=batch), _logits(sdpa, prefix_batch=batch), atol=1e-5)
    assert not calls  # sdpa with the widened mask ran instead
    # without padding the flash-style mask is None: causality and the window still apply
    full = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]), use_cache=False, prefix_batch=pt.batch.make_batch([prefix]))
    with torch.no_grad():
        assert torch.allclose(flashlike(**full).logits, sdpa(**full).logits, atol=1e-5)


def test_implementations_whose_masks_cannot_be_widened_are_refused():
    model = tiny_model("llama-gqa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM uses attn_implementation='flex_attention'"):
        pt.PrefixTuner(model)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.expect == "refused"][:3], ids=lambda a: a.model_type)
def test_refused_models_are_left_as_they_were(arch):
    """Was: a tuner with zero parameters (StableLM, Falcon: enable() even changed Falcon's logits)."""
    attn = arch.attn[0]
    model = arch.build(attn)
    before = _logits(model)
    with pytest.raises(UnsupportedModelError, match=type(model).__name__):
        attach.enable(model)
    assert model.config._attn_implementation == attn
    assert all(not hasattr(m, "_prefixtune_hook") for m in model.modules()) and attach._state(model) is None
    assert torch.equal(_logits(model), before)


def test_multi_head_latent_attention_keeps_key_and_value_sizes():
    """DeepSeek-V3: keys 16 wide (8 no-position + 8 rotary), values 8 (was: the value size taken from the keys)."""
    arch = next(a for a in ARCHS if a.model_type == "deepseek_v3")
    model = arch.build("sdpa")
    shapes = attach.prefix_shapes(model)
    assert shapes.head_dims == {"self": (16, 8)} and shapes.placements == {"self": (2, 4, 16)}
    prefix = random_prefix(model, 3, seed=0)
    assert prefix.meta["head_dims"] == {"self": [16, 8]}
    assert prefix.kv["self"][:, 1, ..., 8:].abs().max() == 0  # the unused value columns are stored as zeros
    keys, values = prefix.layer_kv("self")[0]
    assert keys.shape[-1] == 16 and values.shape[-1] == 8


def test_seq2seq_models_without_label_helpers_train():
    """M2M100/NLLB have no prepare_decoder_input_ids_from_labels (was: AttributeError in training and score)."""
    model = next(a for a in ARCHS if a.model_type == "m2m_100").build("sdpa")
    assert not hasattr(model, "prepare_decoder_input_ids_from_labels")
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=2, mlp_hidden=8))
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    out = tuner(input_ids=torch.tensor([[5, 6, 7], [8, 9, 2]]), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in tuner.parameters())


def test_fingerprint_sees_any_layer_and_not_the_dtype(tmp_path):
    model = tiny_model("llama-gqa")
    prefix = random_prefix(model, 3, seed=0)
    # float32 and bfloat16 loads of the same weights are the same model
    prefix.check_compatible(copy.deepcopy(model).to(torch.bfloat16))
    # a change to one layer's weights only (the embeddings untouched) is another model
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="trained on base model"):
        prefix.check_compatible(tuned)
    # prefixes written before the rule existed (embedding rows only) still load on their model
    old = pt.Prefix(kv=prefix.kv, meta=dict(prefix.meta))
    old.meta["base_model"] = {k: v for k, v in prefix.meta["base_model"].items() if k != "fingerprint_rule"}
    old.meta["base_model"]["fingerprint"] = attach.fingerprint(model, "embeddings/1")
    old = pt.Prefix.load(old.save(tmp_path / "old.safetensors"))
    old.check_compatible(model)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_words_init_is_not_shrunk_by_prefix_dropout(reparameterize, tokenizer):
    """Was: the MLP was fitted in training mode, so with dropout 0.5 the exported P was 0.5x the activations."""
    model = tiny_model("llama-gqa")
    config = dict(length=4, init="words", init_text="table-to-text:", reparameterize=reparameterize, mlp_hidden=64,
                  init_steps=300, init_lr=1e-2)
    want = pt.PrefixTuner(model, pt.PrefixConfig(**config), tokenizer=tokenizer).export().kv["self"]
    got = pt.PrefixTuner(model, pt.PrefixConfig(**config, dropout=0.5), tokenizer=tokenizer).export().kv["self"]
    assert (got - want).norm() / want.norm() < 0.15
    assert 0.9 < got.norm() / want.norm() < 1.1


def test_words_prefix_is_the_words_in_front(tokenizer):
    """RoPE: the words are recorded at positions -n..-1, so the prefix equals running [words; x]
    (was: at 0..n-1, off by 3.7 in the logits on SmolLM2-like models)."""
    model = tiny_model("llama-gqa", init_range=0.2)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=5, reparameterize=False, init="words",
                                                  init_text="table-to-text:"), tokenizer=tokenizer)
    assert tuner.words_in_front
    words = tokenizer("table-to-text:", add_special_tokens=False).input_ids[:5]
    x = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        joint = model(input_ids=torch.cat([torch.tensor([words]), x], 1), use_cache=False).logits[:, 5:]
        prefixed = model(input_ids=x, use_cache=False, prefix_batch=pt.batch.make_batch([tuner.export()])).logits
    assert torch.allclose(prefixed, joint, atol=1e-4), (prefixed - joint).abs().max()


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_low_precision_training_attention_runs_in_float32_on_cpu(arch, monkeypatch):
    """bfloat16 model, training: the prefixed attention runs in float32 on CPU (3x faster backward
    there). Loss and prefix gradients agree with the bfloat16 kernel's within bfloat16 rounding, and
    are at least as close to a float32 model's."""
    from prefixtune.loss import lm_forward

    def grads(model, fp32):
        monkeypatch.setattr(attach, "CPU_FP32_BACKWARD", fp32)
        torch.manual_seed(0)
        tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=16))
        batch = _batch(False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = lm_forward(model, "token_mean", batch["input_ids"], batch["attention_mask"], labels,
                         prefix_batch=tuner.prefix_batch())
        out.loss.backward()
        return out.loss.item(), torch.cat([p.grad.flatten() for p in tuner.parameters()])

    reference = grads(tiny_model(arch, init_range=0.2), True)
    model = tiny_model(arch, init_range=0.2).to(torch.bfloat16)
    fast, slow = grads(model, True), grads(model, False)
    assert abs(fast[0] - slow[0]) < 1e-2 * abs(slow[0])
    assert (fast[1] - slow[1]).norm() < 5e-2 * slow[1].norm()
    assert (fast[1] - reference[1]).norm() <= 1.5 * (slow[1] - reference[1]).norm()
