"""The method's mechanics on tiny random models: shapes, reparameterisation, export, gradients, objective, init."""

import pytest
import torch

import prefixtune as pt
from prefixtune import attach
from prefixtune.batch import make_batch
from prefixtune.loss import token_logprobs
from conftest import CAUSAL_ARCHS, SEQ2SEQ_ARCHS, TINY_ARCHS, tiny_model


def batch_for(model, seed=0, rows=3, length=9):
    """Random ids with right padding and labels on the last few tokens only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, -2:] = 0
    if attach.is_seq2seq(model):
        labels = torch.randint(3, 1000, (rows, 5), generator=g)
        labels[0, -1] = -100
    else:
        labels = ids.clone()
        labels[:, :4] = -100  # source
        labels[mask == 0] = -100  # padding
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("arch,expected", [
    ("gpt2", {"self": (2, 4, 8)}),
    ("llama-gqa", {"self": (2, 2, 16)}),  # 2 kv heads of 4; head_dim 16 != 32/4
    ("qwen2", {"self": (2, 1, 8)}),
    ("bart", {"encoder": (2, 4, 8), "decoder": (3, 4, 8), "cross": (3, 4, 8)}),
    ("t5", {"encoder": (2, 4, 8), "decoder": (2, 4, 8), "cross": (2, 4, 8)}),
])
def test_shapes_follow_the_model(arch, expected):
    model = tiny_model(arch)
    assert attach.prefix_shapes(model).placements == expected
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=6, mlp_hidden=20))
    for placement, (layers, heads, dim) in expected.items():
        enc = tuner.encoders[placement]
        assert enc() .shape == (layers, 2, heads, 6, dim)
        assert enc.mlp[0].out_features == 20 and enc.mlp[2].out_features == layers * 2 * heads * dim


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_enabling_does_not_change_the_model(arch):
    model = tiny_model(arch)
    b = batch_for(model)
    b.pop("labels")
    if attach.is_seq2seq(model):
        b["decoder_input_ids"] = b["input_ids"][:, :4]
    before = model(**b).logits
    attach.enable(model)
    assert model.config._attn_implementation == "prefixtune"
    assert torch.equal(model(**b).logits, before)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("reparameterize", [True, False])
def test_export_equals_mlp_and_every_parameter_gets_gradient(arch, reparameterize):
    model = tiny_model(arch)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=4, mlp_hidden=16, reparameterize=reparameterize))
    tuner.train()
    out = tuner(**batch_for(model))
    out.loss.backward()
    for name, p in tuner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in model.parameters()), "base model must get no gradient"
    # the base model's trainable flag is off and its weights are unchanged after an optimizer step
    torch.optim.AdamW(tuner.parameters(), lr=1e-2).step()
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())

    tuner.eval()
    b = batch_for(model, seed=1)
    with torch.no_grad():
        mlp_logits = tuner(**b).logits
        prefix = tuner.export()
        labels = b.pop("labels")
        if attach.is_seq2seq(model):
            b["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        exported_logits = model(**b, prefix_batch=make_batch([prefix] * 3)).logits
    assert (mlp_logits - exported_logits).abs().max() < 1e-5
    # the exported prefix is P_theta only: no MLP
    assert set(prefix.kv) == set(attach.prefix_shapes(model).placements)
    assert prefix.num_parameters == sum(t.numel() for t in tuner.prefix_kv().values())


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHS)
def test_seq2seq_has_three_independent_prefixes(arch):
    model = tiny_model(arch)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=8))
    assert set(tuner.encoders) == {"encoder", "decoder", "cross"}
    params = [set(id(p) for p in tuner.encoders[k].parameters()) for k in tuner.encoders]
    assert not (params[0] & params[1]) and not (params[1] & params[2]) and not (params[0] & params[2])
    # each placement changes the output on its own
    b = batch_for(model)
    with torch.no_grad():
        full = tuner(**b).loss
        for placement in tuner.encoders:
            kv = tuner.prefix_kv()
            batch = make_batch([pt.Prefix({p: t for p, t in kv.items() if p != placement}, {})])
            labels = b["labels"]
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], prefix_batch=batch,
                           decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
            logp, mask = token_logprobs(logits, labels, shift=False)
            without = -logp.sum() / mask.sum()
            assert abs(float(without - full)) > 1e-6, f"placement {placement} has no effect"


@pytest.mark.parametrize("arch", ["llama-gqa", "bart"])
def test_loss_counts_only_target_tokens(arch):
    model = tiny_model(arch)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=2, mlp_hidden=8)).eval()
    b = batch_for(model)
    out = tuner(**b)
    logits, labels = out.logits, b["labels"]
    if not attach.is_seq2seq(model):
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(logits, -1)
    manual = [-logp[i, t, labels[i, t]] for i in range(labels.shape[0]) for t in range(labels.shape[1]) if labels[i, t] != -100]
    assert torch.allclose(out.loss, torch.stack(manual).mean(), atol=1e-6)
    # the paper's per-sequence sum
    tuner.config.loss = "sequence_sum"
    assert torch.allclose(tuner(**b).loss, torch.stack(manual).sum() / labels.shape[0], atol=1e-5)
    # changing padding tokens does not change the loss (they are masked)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][b["attention_mask"] == 0] = 7
    tuner.config.loss = "token_mean"
    assert torch.allclose(tuner(**b2).loss, out.loss, atol=1e-6)


def _loss_and_grads(tuner, batch, return_logits):
    tuner.zero_grad()
    out = tuner(**batch, return_logits=return_logits)
    out.loss.backward()
    return out, [p.grad.clone() for p in tuner.parameters()]


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("loss", ["token_mean", "sequence_sum"])
def test_target_only_lm_head_equals_the_plain_path(arch, loss):
    """The training path (LM head on target positions only) gives the plain path's loss and gradients."""
    model = tiny_model(arch, init_range=0.2)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=16, loss=loss)).eval()
    assert pt.loss.lm_head_split(model) is not None  # these architectures do split
    b = batch_for(model)
    plain, plain_grads = _loss_and_grads(tuner, b, return_logits=True)
    fast, fast_grads = _loss_and_grads(tuner, b, return_logits=False)
    assert fast.logits is None and plain.logits is not None
    # equal up to float32 summation order (the sequence-sum loss is ~50 here: 1e-5 absolute was 2 ulps, and
    # one torch thread instead of two sums in another order)
    assert fast.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6, abs=1e-6)
    assert int(fast.n_targets) == int((b["labels"][:, 1:] != -100).sum()) == int(plain.n_targets)
    for a, g in zip(plain_grads, fast_grads):
        assert torch.allclose(a, g, atol=1e-6, rtol=1e-4)


def test_models_whose_logits_are_not_head_of_hidden_use_the_plain_path():
    model = tiny_model("llama-gqa")
    original = model.forward

    def scaled(*a, **k):  # a logit scale applied after the head, as some architectures (Cohere, Granite) do
        out = original(*a, **k)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    assert pt.loss.lm_head_split(model) is None
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=8)).eval()
    b = batch_for(model)
    with torch.no_grad():
        assert torch.equal(tuner(**b, return_logits=False).loss, tuner(**b).loss)


def test_mlp_runs_once_per_step_not_per_row():
    model = tiny_model("llama-gqa")
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=8))
    calls = []
    tuner.encoders["self"].mlp.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    tuner(**batch_for(model, rows=5))
    assert calls == [torch.Size([3, 2 * 2 * 2 * 16])]


def test_prefix_dropout_only_in_training():
    model = tiny_model("gpt2")
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=4, mlp_hidden=8, dropout=0.5))
    tuner.train()
    assert not torch.equal(tuner.prefix_kv()["self"], tuner.prefix_kv()["self"])
    tuner.eval()
    assert torch.equal(tuner.prefix_kv()["self"], tuner.prefix_kv()["self"])


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bart"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(arch)
        torch.manual_seed(0)
        tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=3, mlp_hidden=8, gradient_checkpointing=checkpointing))
        tuner.train()
        if checkpointing:
            assert model.is_activation_checkpointing
        tuner(**batch_for(model)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tuner.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama-gqa", "t5"])
@pytest.mark.parametrize("length", [3, 10])
def test_words_init(arch, length, tokenizer):
    model = tiny_model(arch)
    text = "table-to-text:"
    ids = tokenizer(text, add_special_tokens=False).input_ids  # 5 tokens: 3 = cut, 10 = repeated twice
    expected_ids = (ids * 4)[:length]
    # rotary models: the words sit in front of x, at positions -length..-1 (x keeps 0..)
    positions = torch.arange(-length, 0)[None] if arch == "llama-gqa" else None
    target = attach.record_kv(model, torch.tensor([expected_ids]), positions)
    # flat: copied exactly
    flat = pt.PrefixTuner(model, pt.PrefixConfig(length=length, reparameterize=False, init="words", init_text=text),
                          tokenizer=tokenizer)
    assert flat.words_in_front == (arch == "llama-gqa")
    # MLP: fitted to the activations
    mlp = pt.PrefixTuner(model, pt.PrefixConfig(length=length, mlp_hidden=64, init="words", init_text=text,
                                                init_steps=300, init_lr=1e-2), tokenizer=tokenizer)
    for placement, layers in target.items():
        want = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])
        assert torch.allclose(flat.encoders[placement]().detach(), want, atol=1e-6)
        got = mlp.encoders[placement]().detach()
        rel = (got - want).norm() / want.norm()
        assert rel < 0.1, f"{placement}: MLP fit relative error {rel:.3f}"
        random = pt.PrefixTuner(model, pt.PrefixConfig(length=length, mlp_hidden=64)).encoders[placement]().detach()
        assert (random - want).norm() / want.norm() > 5 * rel


def test_config_errors():
    with pytest.raises(ValueError, match="init_text"):
        pt.PrefixConfig(init="words")
    with pytest.raises(ValueError, match="length"):
        pt.PrefixConfig(length=0)
    for field, value in (("mlp_hidden", 0), ("embed_dim", 0), ("init_steps", -1), ("init_lr", 0.0)):
        with pytest.raises(ValueError, match=rf"PrefixConfig\.{field} must be"):  # a width-0 MLP trained a constant
            pt.PrefixConfig(**{field: value})
    with pytest.raises(ValueError, match="tokenizer"):
        pt.PrefixTuner(tiny_model("gpt2"), pt.PrefixConfig(init="words", init_text="summarize"))
    with pytest.raises(ValueError, match="placements"):
        pt.PrefixTuner(tiny_model("gpt2"), pt.PrefixConfig(placements=("cross",)))
