"""The Trainer's protocol options of issue 11 on tiny models: early stopping on dev loss or on a dev
score hook (the best evaluation kept, stopping exact across a resume), and bfloat16 autocast with
float32 master weights for methods that train the base model's weights."""

import json

import pytest
import torch

import prefixtune as pt
from prefixtune.data import Example
from prefixtune.methods import METHODS, MethodConfig
from prefixtune import cpu_bf16
from prefixtune import train as train_module
from prefixtune.train import TrainConfig, Trainer, autocast_context
from architectures import ARCHS, tiny_tokenizer
from conftest import tiny_model

PAIRS = [Example(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food .")
         for i, f in enumerate(["Chinese", "Italian", "French", "Indian", "English", "Japanese"] * 3)]


class Scripted:
    """A dev score that follows a script, and remembers the prefix it saw at each evaluation."""

    def __init__(self, values):
        self.values, self.seen = list(values), {}

    def __call__(self, trainer):
        self.seen[trainer.step] = trainer.tuner.export().kv["self"].clone()
        return self.values.pop(0)


def make(tmp_path, tokenizer, name="run", patience=2, score=None, max_steps=30, method=None, autocast=False):
    model = tiny_model("llama-gqa", init_range=0.2)
    return Trainer(model, tokenizer, PAIRS, PAIRS[:4], pt.PrefixConfig(length=3, mlp_hidden=16),
                   TrainConfig(max_steps=max_steps, batch_size=4, lr=5e-2, warmup_steps=2, eval_every=2, seed=0,
                               patience=patience, autocast=autocast), tmp_path / name, progress=False,
                   method=method, dev_score=score)


def test_stops_on_the_dev_score_and_keeps_the_best_evaluation(tmp_path, tokenizer):
    score = Scripted([1.0, 5.0, 4.0, 6.0, 3.0, 2.0, 9.0])  # best at the 4th evaluation (step 8), then 2 worse
    trainer = make(tmp_path, tokenizer, score=score)
    result = trainer.fit()
    assert result["steps"] == 12 and result["best_step"] == 8 and result["stopped_early"]
    assert result["selected_by"] == "dev_score" and result["best_dev_score"] == 6.0
    assert score.values == [9.0]  # never evaluated again after stopping
    kept = pt.Prefix.load(tmp_path / "run" / "prefix.safetensors").kv["self"]
    assert torch.equal(kept, score.seen[8]) and not torch.equal(kept, score.seen[12])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["dev_score"] for e in log] == [1.0, 5.0, 4.0, 6.0, 3.0, 2.0]
    # resumed by a fresh process: the history in the checkpoint says it has stopped; nothing more runs
    again = make(tmp_path, tokenizer, score=Scripted([]))
    assert again.fit()["steps"] == 12 and again.selection()["best_step"] == 8


def test_stops_on_dev_loss_without_a_hook(tmp_path, tokenizer):
    trainer = make(tmp_path, tokenizer, patience=1, max_steps=40)
    losses = iter([4.0, 3.0, 2.5, 2.7, 2.6])  # step 0, then best at the 2nd evaluation (step 4)
    trainer.dev_loss = lambda: next(losses)
    result = trainer.fit()
    assert result["stopped_early"] and result["steps"] == 6 and result["best_step"] == 4
    assert result["best_dev_loss"] == 2.5 and result["selected_by"] == "dev_loss"


def test_without_patience_it_runs_to_the_cap(tmp_path, tokenizer):
    result = make(tmp_path, tokenizer, patience=0, score=Scripted([3, 2, 1]), max_steps=6).fit()
    assert result["steps"] == 6 and not result["stopped_early"] and result["best_step"] == 2


def test_autocast_trains_float32_master_weights_with_bfloat16_products(tmp_path, tokenizer):
    trainer = make(tmp_path, tokenizer, method=MethodConfig("finetune"), autocast=True, max_steps=2, patience=0)
    seen = []
    hook = trainer.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {n: p.detach().clone() for n, p in trainer.tuner.named_parameters()}
    trainer.fit()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the products ran in bfloat16...
    params = dict(trainer.tuner.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())  # ...the weights stayed float32
    assert any(not torch.equal(before[n], p) for n, p in params.items())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    # the loss under autocast is the float32 loss up to bfloat16 rounding
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, 7, 8]])}
    with torch.no_grad():
        exact = trainer.tuner(**batch).loss
        with autocast_context(True):
            approx = trainer.tuner(**batch).loss
    assert approx.dtype == torch.float32 and 0 < abs(float(approx - exact)) < 0.05 * float(exact)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decoding_kwargs_decode_what_is_being_trained(tmp_path, tokenizer, method):
    """The dev score decodes the in-training weights as a finished run's files would, for every method,
    and what was trained takes part (a method whose decoding silently dropped it, as PEFT 0.21's
    generate does with a prefix on transformers 5, would score as the untrained base model)."""
    from prefixtune.methods import load_trained

    config = MethodConfig(method, size=0.05) if "size" in METHODS[method].options else MethodConfig(method)
    trainer = make(tmp_path, tokenizer, method=config, max_steps=2, patience=0)
    trainer.fit()
    trainer.tuner.eval()
    source, target = ["name : Place1 | food : French"], ["Place1 serves French food ."]
    live = pt.generate(trainer.model, tokenizer, source, max_new_tokens=5, **trainer.tuner.decode_inputs())
    live_score = pt.score(trainer.model, tokenizer, source, target, **trainer.tuner.decode_inputs())
    fresh = tiny_model("llama-gqa", init_range=0.2)
    base_score = pt.score(fresh, tokenizer, source, target)
    kwargs = load_trained(config, fresh, tmp_path / "run", pt.PrefixConfig(length=3, mlp_hidden=16))
    assert live == pt.generate(fresh, tokenizer, source, max_new_tokens=5, **kwargs)
    assert live_score == pytest.approx(pt.score(fresh, tokenizer, source, target, **kwargs), abs=1e-4)
    assert abs(live_score[0] - base_score[0]) > 0.1  # the trained part is used


WORKING = [a for a in ARCHS if a.expect == "works"]


def _autocast_steps(model, tokenizer, tmp_path, method, cached, monkeypatch, float32_products=False):
    """Two training steps and a dev loss under bfloat16 autocast (the products by torch's bfloat16 kernels,
    or in float32 as on a CPU without them: prefixtune/cpu_bf16.py): losses, dev loss, trained weights,
    and how many frozen weights got a kept copy."""
    monkeypatch.setattr(train_module, "CACHE_FROZEN_CASTS", cached)
    monkeypatch.setattr(cpu_bf16, "FLOAT32_PRODUCTS", float32_products)
    trainer = Trainer(model, tokenizer, PAIRS, PAIRS[:4], pt.PrefixConfig(length=3, mlp_hidden=16),
                      TrainConfig(max_steps=4, batch_size=4, lr=5e-2, seed=0, autocast=True),
                      tmp_path / f"c{cached}{float32_products}", progress=False, method=method)
    assert isinstance(trainer.casts, cpu_bf16.Float32Products if float32_products else
                      train_module.FrozenCasts if cached else type(None))
    losses = []
    for _ in range(2):
        losses.append(trainer._train_step())
        trainer.step += 1
    weights = [p.detach().clone() for p in trainer.tuner.parameters() if p.requires_grad]
    return losses, trainer.dev_loss(), weights, 0 if trainer.casts is None else len(trainer.casts.copies)


@pytest.mark.parametrize("arch", WORKING, ids=[f"{a.model_type}-{i}" for i, a in enumerate(WORKING)])
def test_kept_bfloat16_copies_of_frozen_weights_give_autocasts_bits(arch, tmp_path, monkeypatch):
    """FrozenCasts: the frozen base's weights cast once, not at every forward; the same bits as autocast."""
    got = {cached: _autocast_steps(arch.build(arch.attn[0]), tiny_tokenizer(), tmp_path, None, cached, monkeypatch)
           for cached in (True, False)}
    (l1, d1, w1, n1), (l2, d2, w2, n2) = got[True], got[False]
    assert l1 == l2 and d1 == d2 and all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert n1 > 0 and n2 == 0  # the copies were used (and not when switched off)


@pytest.mark.parametrize("method", ["lora", "adapter", "ft-top2", "finetune", "peft-prefix"])
def test_kept_bfloat16_copies_give_autocasts_bits_for_every_method(method, tokenizer, tmp_path, monkeypatch):
    """Methods that train some base weights: only the frozen ones are cached (a trained weight changes)."""
    got = {cached: _autocast_steps(tiny_model("llama-gqa", init_range=0.2), tokenizer, tmp_path,
                                   MethodConfig(method, size=0.05), cached, monkeypatch) for cached in (True, False)}
    (l1, d1, w1, n1), (l2, d2, w2, _) = got[True], got[False]
    assert l1 == l2 and d1 == d2 and len(w1) == len(w2) and all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert (n1 > 0) == (method != "finetune")  # fine-tuning trains every weight: nothing to keep


@pytest.mark.parametrize("method", [None, "lora", "finetune"])
def test_float32_products_give_the_bfloat16_kernels_training(method, tokenizer, tmp_path, monkeypatch):
    """On a CPU without bfloat16 kernels the Trainer runs autocast's products in float32 on the rounded
    operands: the same training as torch's bfloat16 kernels up to rounding, and its kept copies
    of the frozen weights give the same bits as making them at every call."""
    got = {(cached, f32): _autocast_steps(tiny_model("llama-gqa", init_range=0.2), tokenizer, tmp_path,
                                          None if method is None else MethodConfig(method, size=0.05),
                                          cached, monkeypatch, float32_products=f32)
           for cached, f32 in ((True, True), (False, True), (True, False))}
    (l1, d1, w1, n1), (l2, d2, w2, n2), (l3, d3, w3, _) = got[True, True], got[False, True], got[True, False]
    assert l1 == l2 and d1 == d2 and all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert n1 > 0 and n2 == 0  # (fine-tuning: the dev loss's, under no_grad)
    # against the bfloat16 kernels: the first loss within one bfloat16 rounding (summation order, and the
    # attention's softmax weights, which torch's bfloat16 kernel rounds and ours keeps in float32), then
    # bfloat16 rounding apart (not the weights: Adam's first steps move each by ~lr times its gradient's
    # sign, which rounding can flip where the gradient is near 0)
    assert l1[0] == pytest.approx(l3[0], rel=2 ** -9)
    assert l1 == pytest.approx(l3, rel=1e-2) and d1 == pytest.approx(d3, rel=1e-2)
