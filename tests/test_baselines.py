"""Baselines' mechanics on tiny random models: exactly the intended parameters train, the base never changes."""

import pytest
import torch

from prefixtune.baselines.adapter import AdapterModel, adapter_sites, bottleneck_for
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
