"""Every method of ``prefixtune train --method`` through the one trainer: exactly the intended weights
train, the base changes only where the method says so, the saved result decodes to what was trained;
infix, prompt and PEFT-prefix mechanics checked numerically."""

import json

import pytest
import torch

import prefixtune as pt
from prefixtune.attach import PrefixBatch
from prefixtune.baselines.finetune import transformer_layers
from prefixtune.baselines.infix import InfixTuner, separator_positions
from prefixtune.baselines.peft_prefix import PeftPrefixModel
from prefixtune.baselines.prompt import PromptModel
from prefixtune.cli import main
from prefixtune.data import Example
from prefixtune.methods import METHODS, MethodConfig, load_trained, read_run
from prefixtune.batch import make_batch
from prefixtune.template import collate_train, encode
from prefixtune.train import TrainConfig, Trainer
from conftest import tiny_model

PAIRS = [Example(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food .")
         for i, f in enumerate(["Chinese", "Italian", "French", "Indian"] * 2)]
CONFIG = pt.PrefixConfig(length=3, mlp_hidden=16)


def _train(tmp_path, tokenizer, method, arch="llama-gqa", steps=3, **method_kw):
    model = tiny_model(arch, init_range=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, tokenizer, PAIRS, PAIRS[:4], CONFIG,
                      TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, eval_every=steps, seed=0),
                      tmp_path / method, progress=False, method=MethodConfig(method, **method_kw))
    trainable = {id(p) for p in trainer.tuner.parameters()}
    result = trainer.fit()
    return model, trainer, before, trainable, result


def _changed(model, before):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def _dev_nll(tokenizer, model, **kwargs):
    return sum(pt.score(model, tokenizer, [e.source for e in PAIRS[:4]], [e.target for e in PAIRS[:4]], **kwargs))


# every method on Llama (GQA, RoPE); the ones that are not Llama-only on GPT-2 and BART as well
CASES = ([(m, "llama-gqa") for m in METHODS]
         + [(m, a) for a in ("gpt2", "bart") for m in METHODS if m not in ("peft-prefix",) + (("infix",) if a == "bart" else ())])


@pytest.mark.parametrize("method,arch", CASES)
def test_each_method_trains_exactly_its_weights_and_its_saved_result_decodes_the_same(tmp_path, tokenizer, method, arch):
    model, trainer, before, trainable, result = _train(tmp_path, tokenizer, method, arch)
    assert result["best_dev_loss"] < result["history"][0]["dev_loss"]  # it learned something
    changed = _changed(model, before)
    layers = transformer_layers(model)
    top2 = {n for n, p in model.named_parameters() if any(p is q for b in layers[-2:] for q in b.parameters())}
    if method == "finetune":
        assert len(changed) > len(top2) and trainable == {id(p) for p in model.parameters()}
    elif method == "ft-top2":
        assert changed == top2 and trainable == {id(p) for n, p in model.named_parameters() if n in top2}
    elif method == "lora":  # only PEFT's injected low-rank weights train; the original weights stay
        assert changed == set() and all("lora_" in n for n, _ in trainer.tuner.named_parameters())
    else:  # prefix, infix, prompt, adapter, peft-prefix: the base is untouched and nothing in it trains
        assert changed == set() and not trainable & {id(p) for p in model.parameters()}
    assert trainer.tuner.num_trainable_parameters() == sum(p.numel() for p in trainer.tuner.parameters())

    # what training kept, loaded onto a fresh base model, scores the dev rows as the trainer did
    run = tmp_path / method
    method_config, prefix_config = read_run(run)
    assert method_config.method == method
    expected = -trainer.dev_loss() * sum(t for t in [len(encode(model, tokenizer, e.source, e.target).target) for e in PAIRS[:4]])
    fresh = tiny_model(arch, init_range=0.2)
    kwargs = load_trained(method_config, fresh, run, prefix_config)
    assert _dev_nll(tokenizer, fresh, **kwargs) == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # and decodes
    out = pt.generate(fresh, tokenizer, [PAIRS[0].source], max_new_tokens=3, **kwargs)
    assert isinstance(out[0], str)


def test_infix_is_invisible_to_the_source_and_visible_after_it(tokenizer):
    model = tiny_model("llama-gqa", init_range=0.2)
    tuner = InfixTuner(model, pt.PrefixConfig(length=3, reparameterize=False))
    enc = [encode(model, tokenizer, e.source, e.target) for e in PAIRS[:3]]
    batch = collate_train(model, enc, pad=2)
    sep = separator_positions(batch["labels"])
    assert sep.tolist() == [len(e.prompt) - 1 for e in enc]
    with torch.no_grad():
        infix = tuner(**batch).logits
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row, s in enumerate(sep.tolist()):
        # source positions: exactly the base model (they cannot see the infix); from the separator on: steered
        assert torch.allclose(infix[row, :s], base[row, :s], atol=1e-6)
        assert not torch.allclose(infix[row, s:], base[row, s:], atol=1e-3)
    # generation places it by itself (left padding): greedy tokens equal the training forward's argmax
    exported = tuner.export()
    assert exported.site == "infix"
    src = [e.source for e in PAIRS[:3]]
    first = pt.generate(model, tokenizer, src, prefixes=exported, max_new_tokens=1, batch_size=3)
    expect = [tokenizer.decode([int(infix[r, s].argmax())]).strip() for r, s in enumerate(sep.tolist())]
    assert first == expect
    # in a mixed batch with a prefix row and a base row: each row as alone
    other = tuner.export()
    other.meta["site"] = "prefix"
    mixed = pt.generate(model, tokenizer, src, prefixes=[exported, other, None], max_new_tokens=4, batch_size=3)
    alone = [pt.generate(model, tokenizer, [s], prefixes=p, max_new_tokens=4)[0] for s, p in zip(src, [exported, other, None])]
    assert mixed == alone


def test_visible_from_masks_the_decoding_step_like_the_full_pass():
    model = tiny_model("llama-gqa", init_range=0.2)
    prefix = InfixTuner(model, pt.PrefixConfig(length=2, reparameterize=False)).export()
    ids = torch.randint(3, 100, (2, 6))
    full = make_batch([prefix, prefix], separators=[3, 3])
    assert isinstance(full, PrefixBatch) and full.visible_from.tolist() == [3, 3]
    with torch.no_grad():
        whole = model(input_ids=ids, prefix_batch=full).logits
        out = model(input_ids=ids[:, :5], prefix_batch=make_batch([prefix, prefix], separators=[3, 3]), use_cache=True)
        step = model(input_ids=ids[:, 5:], past_key_values=out.past_key_values,
                     prefix_batch=make_batch([prefix, prefix], separators=[3, 3])).logits
    assert torch.allclose(step[:, 0], whole[:, 5], atol=1e-5)


def test_prompt_tuning_is_a_soft_prefix_of_the_input_embeddings(tokenizer):
    model = tiny_model("llama-gqa", init_range=0.2)
    tuner = PromptModel(model, pt.PrefixConfig(length=4, mlp_hidden=16))
    enc = [encode(model, tokenizer, e.source, e.target) for e in PAIRS[:3]]
    batch = collate_train(model, enc, pad=2)
    with torch.no_grad():
        out = tuner(**batch)
        soft = tuner.soft_prompt()
        # by hand: [SOFT; x; y] as embeddings, loss on y only
        emb = torch.cat([soft[None].expand(3, -1, -1), model.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(3, 4, dtype=torch.long), batch["attention_mask"]], 1)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits[:, 4:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    assert float(out.nll_sum) == pytest.approx(float(nll), rel=1e-5)
    # score() and generate() with the soft prompt agree with the training forward (left padding included)
    scores = pt.score(model, tokenizer, [e.source for e in PAIRS[:3]], [e.target for e in PAIRS[:3]], soft_prompt=soft)
    assert sum(scores) == pytest.approx(-float(out.nll_sum), rel=1e-5)
    first = pt.generate(model, tokenizer, [e.source for e in PAIRS[:3]], soft_prompt=soft, max_new_tokens=1, batch_size=3)
    sep = [len(e.prompt) - 1 for e in enc]
    assert first == [tokenizer.decode([int(logits[r, s].argmax())]).strip() for r, s in enumerate(sep)]


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_peft_prefix_converts_exactly_to_our_format(arch):
    """PEFT's forward (prefix in the cache, shifted positions) equals ours with the converted prefix."""
    model = tiny_model(arch, init_range=0.2)
    tuner = PeftPrefixModel(model, pt.PrefixConfig(length=4, mlp_hidden=16))
    with torch.no_grad():
        for p in tuner.parameters():
            p.normal_(0, 0.5)
    tuner.eval()
    ids = torch.randint(3, 1000, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        theirs = tuner(ids, mask).logits
        prefix = tuner.export()
        ours = model(input_ids=ids, attention_mask=mask, prefix_batch=make_batch([prefix, prefix])).logits
        base = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() < 1e-4
    assert (base - theirs)[real].abs().max() > 0.1  # the prefix matters, so the check means something
    assert prefix.meta["converted_from"] == "peft-prefix-tuning"
    assert tuner.num_stored_parameters() == prefix.num_parameters


def test_peft_prefix_refuses_models_it_cannot_convert():
    with pytest.raises(ValueError, match="rotary"):
        PeftPrefixModel(tiny_model("gpt2"), pt.PrefixConfig(length=2, mlp_hidden=8)).export()
    with pytest.raises(ValueError, match="decoder-only"):
        PeftPrefixModel(tiny_model("bart"), pt.PrefixConfig(length=2, mlp_hidden=8))


def test_cli_trains_every_method_and_records_its_costs(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in PAIRS))
    n_model = sum(p.numel() for p in tiny_model("llama-gqa").parameters())
    for method, spec in METHODS.items():
        run = tmp_path / method
        own = (["--length", "3"] if spec.has_length else []) + (["--size", "0.03"] if "size" in spec.options else [])
        assert main(["train", "--model", str(model_dir), "--train", str(data), "--dev", str(data), "--out", str(run),
                     "--method", method, "--max-steps", "2", "--batch-size", "4", *own]) == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"]["method"] == method
        assert 0 < summary["trainable_parameters"] <= n_model and 0 < summary["stored_parameters"] <= n_model
        assert summary["wall_seconds"] > 0 and summary["peak_memory_mb"] > 100
        out = tmp_path / f"{method}.txt"
        assert main(["generate", "--model", str(model_dir), "--run", str(run), "--input", str(data),
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == len(PAIRS)
    # an option the method does not use is refused by name, before any model loads
    for method, flags, unused in (("finetune", ["--length", "20"], "--length: not used by --method finetune"),
                                  ("lora", ["--init", "words", "--init-text", "x"], "--init, --init-text: not used by --method lora"),
                                  ("prefix", ["--size", "0.03", "--top-layers", "3"], "--size, --top-layers: not used by --method prefix --init random"),
                                  ("prompt", ["--prefix-dropout", "0.1"], "--prefix-dropout: not used by --method prompt"),
                                  ("peft-prefix", ["--embed-dim", "8"], "--embed-dim: not used by --method peft-prefix"),
                                  ("prefix", ["--init-text", "table-to-text:"], "--init-text: not used by --method prefix --init random"),
                                  ("infix", ["--init-steps", "9"], "--init-steps: not used by --method infix --init random"),
                                  ("prefix", ["--flat", "--mlp-hidden", "800"], "--mlp-hidden: not used by --method prefix --init random --flat"),
                                  ("prefix", ["--flat", "--init", "words", "--init-text", "x", "--init-lr", "0.01"],
                                   "--init-lr: not used by --method prefix --init words --flat")):
        assert main(["train", "--model", str(tmp_path / "no-model"), "--train", str(data), "--out", str(tmp_path / "x"),
                     "--method", method, *flags]) == 2
        assert f"{unused} (it would change nothing)" in capsys.readouterr().err
    full = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert full["trainable_parameters"] == n_model
    adapter = json.loads((tmp_path / "adapter" / "summary.json").read_text())
    assert adapter["method"]["bottleneck"] >= 1 and 1.0 < adapter["trainable_percent"] < 6.0
