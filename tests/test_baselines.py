"""Baselines' mechanics on tiny random models: exactly the intended parameters train, the base never changes."""

import pytest
import torch

from prefixtune.baselines.adapter import AdapterModel, adapter_sites, bottleneck_for
from prefixtune.baselines.finetune import FineTuneModel, transformer_layers
from prefixtune.baselines.lora import LoraModel, rank_for
from conftest import TINY_ARCHS, tiny_model


def _inputs(model):
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return dict(input_ids=ids, **kw)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapters_train_alone_and_leave_the_base_unchanged(arch):
    model = tiny_model(arch)
    x = _inputs(model)
    base_logits = model(**x).logits
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    adapted = AdapterModel(model, bottleneck=3)
    # starts as the base model (up-projection at zero)
    assert torch.equal(model(**x).logits, base_logits)
    # the trainable parameters are exactly the adapters: 2 per layer (attention, feed-forward), plus
    # cross-attention in encoder-decoder models; d*r + r + r*d + d each
    d, sites = model.config.get_text_config().hidden_size, len(adapter_sites(model))
    assert sum(p.numel() for p in adapted.parameters()) == sites * (2 * d * 3 + 3 + d)
    assert not any(p.requires_grad for p in model.parameters())
    start = [p.clone() for p in adapted.parameters()]
    opt = torch.optim.AdamW(adapted.parameters(), lr=1e-2)
    for _ in range(2):  # step 1 moves `up` off zero; then `down` gets gradients too
        opt.zero_grad()
        model(**x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(start, adapted.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert not torch.allclose(model(**x).logits, base_logits)
    adapted.remove()
    assert torch.equal(model(**x).logits, base_logits)


@pytest.mark.parametrize("fraction", [0.001, 0.03])
def test_adapter_size_is_closest_to_the_fraction(fraction):
    model = tiny_model("llama-gqa")
    n_model = sum(p.numel() for p in model.parameters())
    r = bottleneck_for(model, fraction)

    def size(r):
        return sum(p.numel() for p in AdapterModel(tiny_model("llama-gqa"), r).parameters())

    assert abs(size(r) / n_model - fraction) <= min(abs(size(r + 1) / n_model - fraction),
                                                    abs(size(max(1, r - 1)) / n_model - fraction))


def _two_steps(params, model, x):
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**x).logits.float().logsumexp(-1).mean().backward()
        opt.step()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("top", [None, 2])
def test_finetuning_changes_exactly_the_intended_weights(arch, top):
    model = tiny_model(arch)
    x = _inputs(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    tuned = FineTuneModel(model, top_layers=top)
    top_ids = {id(p) for block in transformer_layers(model)[-2:] for p in block.parameters()}
    expected = {n for n, p in model.named_parameters() if top is None or id(p) in top_ids}
    assert {n for n, _ in tuned.named_parameters()} == expected
    _two_steps(list(tuned.parameters()), model, x)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) == (n not in expected), n


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lora_trains_only_its_low_rank_weights(arch):
    model = tiny_model(arch)
    x = _inputs(model)
    base_logits = model(**x).logits
    r = rank_for(model, 0.01)
    lora = LoraModel(model, rank=r)
    names = {n for n, _ in lora.named_parameters()}
    assert names and all("lora_" in n for n in names)
    size = sum(p.numel() for p in lora.parameters())
    assert abs(size / sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - 0.01) < 0.01 / r
    assert torch.allclose(model(**x).logits, base_logits, atol=1e-6)  # B starts at zero
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    _two_steps(list(lora.parameters()), model, x)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    assert not torch.allclose(model(**x).logits, base_logits)
