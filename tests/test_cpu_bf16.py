"""prefixtune/cpu_bf16.py: bfloat16 products run in float32 on the rounded operands (what a CPU
without bfloat16 kernels does) give torch's bfloat16 results, forward and backward (attention: closer
to exact than torch's kernel), and decoding a bfloat16 model gives the same outputs. (Training under
autocast: tests/test_early_stopping.py.)"""

import contextlib

import pytest
import torch

import prefixtune as pt
from prefixtune import cpu_bf16
from prefixtune.cpu_bf16 import Float32Products
from conftest import CAUSAL_ARCHS, SEQ2SEQ_ARCHS, random_prefix, tiny_model

F = torch.nn.functional


def _close_to_bfloat16(got: torch.Tensor, want: torch.Tensor):
    """Equal up to a bfloat16 rounding of the result (summation order differs between kernels)."""
    assert got.dtype == want.dtype
    got, want = got.detach().float(), want.detach().float()
    assert torch.allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * float(want.abs().max()))
    assert float((got == want).float().mean()) > 0.9


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bfloat16"])
def test_products_and_their_gradients_are_the_bfloat16_kernels(autocast):
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(3, 40, 96, dtype=dtype)
    w = torch.nn.Parameter((torch.randn(64, 96) * 0.1).to(dtype))
    b = torch.nn.Parameter(torch.randn(64).to(dtype))
    other = torch.randn(3, 64, 40, dtype=dtype)

    def run(mode):
        w.grad = b.grad = None
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), mode:
            out = F.linear(xx, w, b)
            prod = out @ other
            mm = torch.addmm(b, xx[0], w.t())
            loss = (prod.float() ** 2).mean() + mm.float().sum()
        loss.backward()
        return out, prod, mm, xx.grad, w.grad, b.grad

    mode = Float32Products()
    native, emulated = run(contextlib.nullcontext()), run(mode)
    assert native[0].dtype == torch.bfloat16 and native[1].dtype == torch.bfloat16
    for got, want in zip(emulated, native):
        _close_to_bfloat16(got, want)
    assert not mode.copies  # a weight being differentiated is never kept


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bfloat16"])
@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_attention_in_float32_is_closer_to_exact_than_the_bfloat16_kernel(autocast, mask):
    """scaled_dot_product_attention in float32 on the bfloat16-rounded inputs (grouped-query, with
    each kind of mask) against float64 on the same inputs: its output and gradients are as close as
    one bfloat16 rounding of the result, and closer than torch's bfloat16 kernel (which also rounds
    its softmax weights); the gradients reach the inputs rounded to bfloat16, as autocast rounds them."""
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    q0, k0, v0 = torch.randn(2, 4, 48, 16) * 2, torch.randn(2, 2, 48, 16) * 2, torch.randn(2, 2, 48, 16)
    grad = torch.randn(2, 4, 48, 16)
    allowed = torch.rand(2, 1, 48, 48) > 0.3
    allowed[..., 0] = True  # every query sees something
    masks = {"causal": None, "bool": allowed, "additive": torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)}

    def run(mode, dtype, ctx):
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (q0, k0, v0))
        m = masks[mask] if masks[mask] is None or masks[mask].dtype == torch.bool else masks[mask].to(dtype)
        with ctx, mode:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=mask == "causal", enable_gqa=True)
        (out.to(grad.dtype) * grad.to(out.dtype)).sum().backward()
        return [t.detach() for t in (out, q.grad, k.grad, v.grad)]

    casting = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    native, emulated = run(contextlib.nullcontext(), dtype, casting), run(Float32Products(), dtype, casting)
    q0, k0, v0 = (t.to(torch.bfloat16).float() for t in (q0, k0, v0))
    exact = run(contextlib.nullcontext(), torch.float64, contextlib.nullcontext())  # on the rounded inputs
    for got, want, ref in zip(emulated, native, exact):
        assert got.dtype == want.dtype and got.shape == want.shape
        err = lambda t: float((t.double() - ref).abs().mean() / ref.abs().mean())  # noqa: E731
        assert err(got) < 2 ** -8 and err(got) < err(want), (err(got), err(want))
        assert torch.equal(got.float(), got.float().to(torch.bfloat16).float())  # rounded as autocast rounds


def test_kept_copies_follow_the_weight():
    """A frozen weight's float32 copy is remade when its values, storage or dtype change."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    mode = Float32Products()
    with mode:
        first = layer(x)
        assert len(mode.copies) == 2  # the weight and the bias
        layer.weight.mul_(2)  # in place: a new version
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.zeros_like(layer.weight)  # new storage, same version
        assert torch.equal(layer(x).float(), layer.bias.float().expand(2, 4))
    assert not torch.equal(first, layer(x))


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + SEQ2SEQ_ARCHS)
def test_a_bfloat16_model_decodes_and_scores_as_with_the_bfloat16_kernels(arch, tokenizer, monkeypatch):
    """generate and score enter Float32Products for a bfloat16 model where FLOAT32_PRODUCTS is set."""
    model = tiny_model(arch, init_range=0.2).to(torch.bfloat16)
    prefix = random_prefix(model, 4, seed=1)
    sources = ["name : Place1 | food : French", "name : Place2 | area : riverside | food : Italian"]
    targets = ["Place1 serves French food .", "Place2 is by the river ."]
    got = {}
    for flag in (True, False):
        monkeypatch.setattr(cpu_bf16, "FLOAT32_PRODUCTS", flag)
        got[flag] = (pt.generate(model, tokenizer, sources, prefixes=prefix, max_new_tokens=6, return_tokens=True),
                     pt.score(model, tokenizer, sources, targets, prefixes=prefix))
    (gen, scores), (gen_native, scores_native) = got[True], got[False]
    assert [g.tokens for g in gen] == [g.tokens for g in gen_native]
    assert scores == pytest.approx(scores_native, rel=2e-2)


def test_products_is_a_no_op_where_not_needed(monkeypatch):
    model = tiny_model("gpt2")
    monkeypatch.setattr(cpu_bf16, "FLOAT32_PRODUCTS", True)
    assert isinstance(cpu_bf16.products(model), contextlib.nullcontext)  # float32
    assert isinstance(cpu_bf16.products(model.to(torch.bfloat16)), Float32Products)
    assert cpu_bf16.products_kind() == "float32"  # what the grid's ledger records
    monkeypatch.setattr(cpu_bf16, "FLOAT32_PRODUCTS", False)  # a CPU with bfloat16 kernels
    assert isinstance(cpu_bf16.products(model), contextlib.nullcontext)
    assert cpu_bf16.products_kind() == "native"


def test_the_serving_engine_runs_a_bfloat16_model_in_float32_products(tokenizer, monkeypatch):
    """The engine keeps one Float32Products across steps (its weight copies made once) and makes the
    tokens generate() makes in the same arithmetic. (Not compared with torch's bfloat16 kernels token
    for token: its attention's rounding differs, and this tiny model's bfloat16 logits tie.)"""
    from prefixtune.serve.engine import Engine, Seq

    model = tiny_model("llama-gqa", init_range=0.2).to(torch.bfloat16)
    prefix = random_prefix(model, 3, seed=2)
    prompts = [pt.template.encode(model, tokenizer, s).prompt for s in ("name : Aromi | food : Chinese", "hello")]
    got = {}
    for flag in (True, False):
        monkeypatch.setattr(cpu_bf16, "FLOAT32_PRODUCTS", flag)
        engine = Engine(model, eos=2, max_rows=2)
        seqs = [Seq(p, prefix if i else None, 6) for i, p in enumerate(prompts)]
        for s in seqs:
            engine.add(s)
        tokens = {id(s): [] for s in seqs}
        while engine.busy():
            for seq, token, _ in engine.step():
                tokens[id(seq)].append(token)
                if len(tokens[id(seq)]) == seq.max_new_tokens:
                    engine.finish(seq)
        alone = pt.generate(model, tokenizer, prompts, prefixes=[None, prefix], max_new_tokens=6, return_tokens=True)
        assert [tokens[id(s)] for s in seqs] == [g.tokens for g in alone]
        got[flag] = engine.products
    assert isinstance(got[True], Float32Products) and len(got[True].copies) > 0
    assert isinstance(got[False], contextlib.nullcontext)


def test_a_linear_called_with_keywords_runs_as_it_would():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    with Float32Products():
        out = F.linear(input=x, weight=w)  # (not intercepted: torch's kernel)
    assert torch.equal(out, F.linear(x, w))
