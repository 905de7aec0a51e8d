"""Training loop, checkpoints and CLI on tiny models (a local model directory, as a user's HF path)."""

import argparse
import json
import re
import signal

import pytest
import torch

import prefixtune as pt
from prefixtune.cli import build_parser, main
from prefixtune.data import Example
from prefixtune.template import collate_train
from prefixtune.train import TrainConfig, Trainer
from conftest import tiny_model

PAIRS = [Example(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food .")
         for i, f in enumerate(["Chinese", "Italian", "French", "Indian", "English", "Japanese"] * 3)]


def make_trainer(tmp_path, tokenizer, max_steps, seed=0, name="run"):
    model = tiny_model("llama-gqa", init_range=0.2)
    return Trainer(model, tokenizer, PAIRS, PAIRS[:4], pt.PrefixConfig(length=3, mlp_hidden=16, dropout=0.1),
                   TrainConfig(max_steps=max_steps, batch_size=4, grad_accum=2, lr=5e-2, warmup_steps=2,
                               eval_every=3, seed=seed), tmp_path / name, progress=False)


def test_training_lowers_dev_loss_and_keeps_best(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=12)
    weights = {n: p.clone() for n, p in trainer.model.state_dict().items()}
    result = trainer.fit()
    history = result["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 12
    assert result["best_dev_loss"] < history[0]["dev_loss"] - 0.5
    best = pt.Prefix.load(tmp_path / "run" / "prefix.safetensors")
    best.check_compatible(trainer.model)
    assert all(torch.equal(weights[n], p) for n, p in trainer.model.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6, 9, 12]


def test_resume_is_exact(tmp_path, tokenizer):
    straight = make_trainer(tmp_path, tokenizer, max_steps=8, name="straight")
    straight.fit()
    # the same run, stopped after 3 steps (as if interrupted) and resumed by a fresh process
    first = make_trainer(tmp_path, tokenizer, max_steps=8, name="resumed")
    first.total_steps = 3
    first.fit()
    # as if killed in the middle of saving a checkpoint: only the previous one is left
    (tmp_path / "resumed" / "checkpoint").rename(tmp_path / "resumed" / "checkpoint.old")
    second = make_trainer(tmp_path, tokenizer, max_steps=8, name="resumed")
    second.fit()
    assert second.step == 8
    for (n, a), b in zip(straight.tuner.named_parameters(), second.tuner.parameters()):
        assert torch.equal(a, b), n
    # a different configuration in the same directory is refused, naming the difference
    other = make_trainer(tmp_path, tokenizer, max_steps=9, name="resumed")
    with pytest.raises(ValueError, match=r"holds a run with other settings \(train\.max_steps: 8 -> 9\)"):
        other.fit()
    ckpt = tmp_path / "resumed" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors"]


def test_generate_from_an_unfinished_run_says_so(tmp_path, tokenizer, capsys, monkeypatch):
    """``generate --run`` on a training that is not done decodes what it kept so far and says so on stderr;
    a run with nothing kept yet (stopped before its first evaluation) is refused, naming the file."""
    import shutil

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama-gqa", init_range=0.2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    half = make_trainer(tmp_path, tokenizer, max_steps=None, name="half")  # 5 epochs: 13 steps
    real_step = Trainer._train_step

    def step_then_ctrl_c(self):
        if self.step == 3:  # Ctrl-C during the 4th step: it stops at that step's end
            signal.raise_signal(signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        half.fit()
    monkeypatch.undo()
    best = half.selection()["best_step"]
    assert half.step == 4 and best == 3 and half.total_steps == 13
    sources = tmp_path / "sources.txt"
    sources.write_text("name : Place1 | food : Italian\n")
    common = ["generate", "--model", str(model_dir), "--input", str(sources), "--max-new-tokens", "3"]
    assert main([*common, "--run", str(tmp_path / "half"), "--out", str(tmp_path / "o.txt")]) == 0
    err = capsys.readouterr().err
    assert (f"prefixtune generate: note: {tmp_path / 'half'}: its training is unfinished (step 4 of at most 13); decoding "
            f"what it has kept so far (its best dev evaluation, step {best})") in err
    (tmp_path / "early").mkdir()
    shutil.copy(tmp_path / "half" / "run.json", tmp_path / "early")
    assert main([*common, "--run", str(tmp_path / "early"), "--out", str(tmp_path / "o2.txt")]) == 2
    assert f"prefixtune generate: error: {tmp_path / 'early'} holds no trained prefix result yet (prefix.safetensors)" in capsys.readouterr().err
    done = make_trainer(tmp_path, tokenizer, max_steps=3, name="done")
    done.fit()
    assert main([*common, "--run", str(tmp_path / "done"), "--out", str(tmp_path / "o3.txt")]) == 0
    assert "unfinished" not in capsys.readouterr().err


def test_cli_train_and_generate_on_a_local_model(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in PAIRS))
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--train", str(data), "--dev", str(data), "--out", str(run),
                 "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--length", "4", "--mlp-hidden", "16"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stored_parameters"] == 4 * 2 * 2 * 4 * 8
    sources = tmp_path / "sources.txt"
    sources.write_text("name : Place1 | food : Italian\nname : Place2 | food : French\n")
    out = tmp_path / "out.txt"
    p = str(run / "prefix.safetensors")
    assert main(["generate", "--model", str(model_dir), "--prefix", p, "--input", str(sources), "--out", str(out),
                 "--num-beams", "2", "--max-new-tokens", "5"]) == 0
    assert len(out.read_text().splitlines()) == 2
    out2 = tmp_path / "two.jsonl"
    assert main(["generate", "--model", str(model_dir), "--prefix", p, "--prefix", p, "--input", str(sources),
                 "--out", str(out2), "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows) == 2 and [o["prefix"] for o in rows[0]["outputs"]] == [p, p]
    assert rows[0]["outputs"][0]["output"] == rows[0]["outputs"][1]["output"]


def test_cli_generate_resumes_after_an_interruption(tmp_path, tokenizer, monkeypatch):
    """Finished batches go to OUT.partial as they come; the same command, rerun, decodes only the
    rest and writes what an uninterrupted run writes (greedy, beam and sampled)."""
    from prefixtune.generate import PartialOutputs

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sources = tmp_path / "sources.txt"
    sources.write_text("".join(f"name : Place{i} | food : {'Italian ' * (i % 3)}\n" for i in range(7)))  # 4 batches of 2
    added = []
    real_add = PartialOutputs.add

    def add(self, *a):
        real_add(self, *a)
        added.append(a[0])
        if len(added) == 2 and interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialOutputs, "add", add)
    for flags in (["--num-beams", "1"], ["--num-beams", "2"], ["--do-sample", "--top-k", "50", "--seed", "3"]):
        common = ["generate", "--model", str(model_dir), "--input", str(sources), "--batch-size", "2",
                  "--max-new-tokens", "6", *flags]
        interrupt, added[:] = False, []
        straight = tmp_path / "straight.txt"
        assert main([*common, "--out", str(straight)]) == 0 and len(added) == 4
        out = tmp_path / "resumed.txt"
        out.unlink(missing_ok=True)
        partial = tmp_path / "resumed.txt.partial"
        interrupt, added[:] = True, []
        assert main([*common, "--out", str(out)]) == 130  # Ctrl-C after 2 of 4 batches
        assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 2
        with partial.open("a") as f:
            f.write('{"batch": 3, "rows": [')  # a torn last line, as a killed process leaves
        interrupt, added[:] = False, []
        assert main([*common, "--out", str(out)]) == 0
        assert len(added) == 2, flags  # only the 2 batches left
        assert out.read_text() == straight.read_text(), flags
        assert not partial.exists()
    # a partial file of other settings is started over, not mixed in
    interrupt, added[:] = True, []
    assert main([*common, "--out", str(out)]) == 130
    interrupt, added[:] = False, []
    assert main([*common[:-2], "--seed", "4", "--out", str(out)]) == 0 and len(added) == 4


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"\n')
    assert main(["train", "--train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"source": "a", "target": ""}\n')
    assert main(["train", "--train", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert f"{empty}:1: expected a non-empty string \"target\"" in capsys.readouterr().err
    empty.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    assert main(["train", "--train", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert f'{empty}:2: no "target" (training and scoring need one per row)' in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "prefixtune train: error: --task jsonl needs --train FILE.jsonl" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"source": "a", "target": "b"}\n')
    for flag in ("--train", "--dev"):  # a named task's own data would silently have been used instead
        assert main(["train", "--task", "e2e", flag, str(good), "--out", str(tmp_path / "r")]) == 2
        assert f"{flag} FILE is for --task jsonl; --task e2e reads its {flag[2:]} split from the data directory" in \
            capsys.readouterr().err
    for flag in ("--patience", "--max-dev-examples"):  # each silently did nothing
        assert main(["train", "--train", str(good), flag, "3", "--out", str(tmp_path / "r")]) == 2
        assert f"{flag} is about the dev set: give --dev FILE.jsonl" in capsys.readouterr().err
    assert main(["generate", "--input", str(good), "--split", "dev", "--out", str(tmp_path / "o.txt")]) == 2
    assert "--split dev picks a named task's split to decode; with --input" in capsys.readouterr().err
    for flags, message in ((["--batch-size", "0"], "TrainConfig.batch_size must be >= 1, got 0 (--batch-size)"),
                           (["--epochs", "0"], "TrainConfig.epochs must be a positive number, got 0.0 (--epochs)"),
                           (["--model", str(tmp_path / "no" / "model")], f"model '{tmp_path / 'no' / 'model'}': no such directory"),
                           (["--model", str(tmp_path)], f"model '{tmp_path}': not a model directory (a Hugging Face"),
                           (["--model", str(good)], f"model '{good}': not a model directory")):
        assert main(["train", "--train", str(good), "--out", str(tmp_path / "r"), *flags]) == 2
        assert message in capsys.readouterr().err
    for flags, message in ((["--min-new-tokens", "50", "--max-new-tokens", "5"], "--min-new-tokens 50 is more than --max-new-tokens 5"),
                           (["--task", "xsum", "--max-new-tokens", "5"], "--min-new-tokens 10 (the xsum default) is more than"),
                           (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be >= 0, got -1"),
                           (["--temperature", "0.5"], "add --do-sample")):  # each was silently ignored
        assert main(["generate", "--input", str(good), "--out", str(tmp_path / "o.txt"), *flags]) == 2
        assert message in capsys.readouterr().err
    for flag in ("--max-examples", "--threads"):  # 0 examples used to mean all of them; -1 threads, a torch traceback
        with pytest.raises(SystemExit) as e:
            main(["generate", "--input", str(good), "--out", str(tmp_path / "o.txt"), flag, "-1"])
        assert e.value.code == 2 and f"argument {flag}: must be >= 1, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("grad_accum", 0), ("max_steps", 0), ("epochs", 0.0),
                                         ("epochs", float("nan")), ("lr", 0.0), ("lr", -1e-4), ("warmup_steps", -1),
                                         ("eval_every", -1), ("patience", -1), ("weight_decay", -0.1)])
def test_train_config_refuses_settings_that_would_crash_or_train_nothing(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})
    TrainConfig(**{field: {"epochs": 0.5, "lr": 1e-4, "weight_decay": 0.0}.get(field, 1)})  # a valid value passes


def test_help_explains(capsys):
    for cmd in ("train", "generate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    # every command's --help shows the defaults that say something, each once, and no empty ones
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "generate", "evaluate", "experiment", "serve", "train-many", "import-peft",
                             "export-peft"}
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for empty in ("(default: None)", "(default: False)", "(default: [])"):
            assert empty not in text, (name, empty)
        assert not re.search(r"\(default[^)]*\) \(default:", text), name  # a help text stating its default gets no second
    assert "--batch-size BATCH_SIZE rows per generate call (per process) (default: 16)" in " ".join(
        commands["generate"].format_help().split())


def test_cli_named_tasks(tmp_path, tokenizer):
    """train/generate read the named datasets from the data directory (tiny model, a few steps)."""
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for task in ("webnlg", "dialogsum"):
        run = tmp_path / task
        assert main(["train", "--model", str(model_dir), "--task", task, "--out", str(run), "--max-train-examples", "8",
                     "--max-dev-examples", "4", "--max-steps", "2", "--batch-size", "4", "--length", "3"]) == 0
        assert (run / "prefix.safetensors").is_file()
    out = tmp_path / "dart.txt"
    assert main(["generate", "--model", str(model_dir), "--task", "dart", "--split", "dev", "--max-examples", "3",
                 "--prefix", str(tmp_path / "webnlg" / "prefix.safetensors"), "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    mine = tmp_path / "mine.jsonl"  # --input with a named task: the file's sources (it once decoded E2E test)
    mine.write_text('{"source": "name : A"}\n{"source": "name : B"}\n')
    assert main(["generate", "--model", str(model_dir), "--task", "e2e", "--input", str(mine), "--num-beams", "1",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    # DART has no training split: a clear error, not a crash
    assert main(["train", "--model", str(model_dir), "--task", "dart", "--out", str(tmp_path / "d")]) == 2


def test_length_bucketing_keeps_every_row_once_and_cuts_padding(tmp_path, tokenizer):
    # 61 rows of varied lengths: 16 batches of 4 per epoch, the last one of 1 row
    rows = [Example(" | ".join(f"field{j} : value {j}" for j in range(1 + i % 7)), "word " * (1 + i * 5 % 11))
            for i in range(61)]

    def trainer(bucket, name="run"):
        return Trainer(tiny_model("llama-gqa"), tokenizer, rows, None, pt.PrefixConfig(length=2, mlp_hidden=8),
                       TrainConfig(batch_size=4, bucket=bucket, seed=3), tmp_path / name, progress=False)

    def padding(t):  # padded fraction of the token slots of one epoch's micro-batches
        masks = [collate_train(t.model, [t.train_set[j] for j in t.micro_batch_rows(i)], t.pad)["attention_mask"]
                 for i in range(t.batches_per_epoch)]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    plain, bucketed = trainer(0), trainer(5)
    for epoch in range(3):
        batches = bucketed.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(61))
        assert sorted(len(b) for b in batches) == [1] + [4] * 15
    assert bucketed.epoch_batches(0) != bucketed.epoch_batches(1)
    # deterministic in (seed, epoch): a fresh trainer (as after a resume) forms the same batches
    assert trainer(5).epoch_batches(1) == bucketed.epoch_batches(1)
    # bucket=0: the plain shuffled batches, as before bucketing existed
    order = torch.randperm(61, generator=torch.Generator().manual_seed(3 * 1000003 + 2)).tolist()
    assert plain.epoch_batches(2) == [order[i : i + 4] for i in range(0, 61, 4)]
    assert padding(bucketed) < padding(plain) / 2, (padding(bucketed), padding(plain))  # 0.09 vs 0.31
    # a run directory from before the option existed ran without bucketing: it resumes with bucket=0 only
    plain._check_run_config()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    del info["train"]["bucket"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    plain._check_run_config()
    with pytest.raises(ValueError, match=r"other settings \(train\.bucket: 0 -> 5\)"):
        bucketed._check_run_config()
    with pytest.raises(ValueError, match="bucket must be >= 0"):
        trainer(-1)


def _dropout_trainer(tmp_path, tokenizer, name, max_steps=8):
    """GPT-2 (dropout 0.1 in the model) and prefix dropout: every step consumes random numbers."""
    model = tiny_model("gpt2", init_range=0.2)
    assert model.config.resid_pdrop > 0
    return Trainer(model, tokenizer, PAIRS, PAIRS[:4], pt.PrefixConfig(length=3, mlp_hidden=16, dropout=0.1),
                   TrainConfig(max_steps=max_steps, batch_size=4, grad_accum=2, lr=5e-2, warmup_steps=2,
                               eval_every=3, seed=1), tmp_path / name, progress=False)


def _interrupt_at(trainer, micro_batch: int, hard: bool):
    """Ctrl-C during the given training micro-batch (counted from 1): a SIGINT as a user's first
    Ctrl-C sends it, or (hard) a KeyboardInterrupt raised right there, as a second Ctrl-C does."""
    import os
    import signal

    seen = []

    def hook(module, args):
        if module.training:  # (the dev loss runs in eval mode)
            seen.append(1)
            if len(seen) == micro_batch:
                if hard:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)

    # the input embeddings run once per forward, whichever route (full model or body + LM head)
    return trainer.model.get_input_embeddings().register_forward_pre_hook(hook)


@pytest.mark.parametrize("hard", [False, True])
def test_interrupt_in_the_middle_of_a_step_resumes_exactly(tmp_path, tokenizer, hard):
    """Dropout on (GPT-2's own and the prefix's): an interrupted run resumed ends exactly where an
    uninterrupted one does, and logs the same train losses."""
    straight = _dropout_trainer(tmp_path, tokenizer, "straight")
    straight.fit()
    first = _dropout_trainer(tmp_path, tokenizer, "resumed")
    _interrupt_at(first, micro_batch=10, hard=hard)  # the 2nd micro-batch of step 5 (eval_every 3)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    # a first Ctrl-C finishes step 5 and saves it; a second stops at once, the step-3 checkpoint stays
    assert state["step"] == (3 if hard else 5)
    second = _dropout_trainer(tmp_path, tokenizer, "resumed")
    second.fit()
    for (n, a), b in zip(straight.tuner.named_parameters(), second.tuner.parameters()):
        assert torch.equal(a, b), n
    logs = [[(e["step"], e["train_loss"], e["dev_loss"]) for e in map(json.loads, (tmp_path / d / "log.jsonl").open())]
            for d in ("straight", "resumed")]
    assert logs[0] == logs[1]


@pytest.mark.parametrize("loss", ["token_mean", "sequence_sum"])
def test_gradient_accumulation_is_a_memory_knob(tmp_path, tokenizer, loss):
    """Batch 8, 2 x 4 accumulated and 4 x 2 accumulated give the same gradient (targets of uneven
    lengths, so a mean per micro-batch would weigh tokens differently) and the same steps."""
    pairs = [Example(f"name : Place{i}", " ".join(["word"] * (1 + 3 * i % 11))) for i in range(16)]
    grads, params = [], []
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        trainer = Trainer(tiny_model("llama-gqa", init_range=0.2), tokenizer, pairs, None,
                          pt.PrefixConfig(length=3, mlp_hidden=16, loss=loss),
                          TrainConfig(max_steps=4, batch_size=batch, grad_accum=accum, lr=5e-2, max_grad_norm=1e9,
                                      seed=0), tmp_path / f"{loss}-{batch}", progress=False)
        start = torch.cat([p.detach().flatten() for p in trainer.tuner.parameters()])
        trainer._train_step()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.tuner.parameters()]))
        trainer.step = 1
        trainer.fit()
        params.append(torch.cat([p.detach().flatten() for p in trainer.tuner.parameters()]))
    assert (params[0] - start).abs().max() > 1e-2  # the steps moved the prefix
    # float32 sums in another order differ by a few ulps of the largest gradient, also on an element that is
    # small by cancellation (on an AMD EPYC one of 2,800 elements exceeded atol 1e-7 + rtol 1e-5); a wrong
    # weighting of micro-batches moves gradients by percents
    scale = grads[0].abs().max().item()
    for g, p in zip(grads[1:], params[1:]):
        assert torch.allclose(grads[0], g, atol=1e-6 * scale, rtol=1e-5), (grads[0] - g).abs().max()
        assert torch.allclose(params[0], p, atol=1e-3), (params[0] - p).abs().max()  # Adam amplifies rounding


def test_compiled_training_equals_eager(tmp_path, tokenizer):
    """TrainConfig.compile: the same steps (within float rounding of fused kernels), lengths varying,
    from one graph compiled once: no graph break, no recompiling for a new length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = []
    for compile_ in (False, True):
        trainer = Trainer(tiny_model("llama-gqa", init_range=0.2), tokenizer, PAIRS, None,
                          pt.PrefixConfig(length=3, mlp_hidden=16),
                          TrainConfig(max_steps=3, batch_size=4, lr=5e-2, seed=0, compile=compile_),
                          tmp_path / f"c{compile_}", progress=False)
        trainer.fit()
        params.append(torch.cat([p.detach().flatten() for p in trainer.tuner.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-4, rtol=1e-4), (params[0] - params[1]).abs().max()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_cpu_time_is_counted_per_evaluation_and_across_a_resume(tmp_path, tokenizer):
    """Each evaluation records the CPU seconds of its training steps and of itself, so a run's CPU time
    over all its sessions is known (wall time counts pauses and other load); a run resumed from a
    checkpoint written before that was counted reports none rather than a partial sum."""
    from prefixtune.experiments.runs import counted_cpu

    straight = make_trainer(tmp_path, tokenizer, max_steps=8, name="straight")
    history = straight.fit()["history"]
    assert history[0]["cpu_seconds_per_step"] is None and history[0]["eval_cpu_seconds"] > 0
    assert all(h["cpu_seconds_per_step"] > 0 and h["eval_cpu_seconds"] > 0 for h in history[1:])
    steps, evals = counted_cpu(history)
    assert steps == pytest.approx(sum(h["cpu_seconds_per_step"] * n for h, n in zip(history[1:], (3, 3, 2))))
    assert evals == pytest.approx(sum(h["eval_cpu_seconds"] for h in history))
    # resumed from an older checkpoint (no CPU fields, one step pending since its last evaluation)
    first = make_trainer(tmp_path, tokenizer, max_steps=8, name="old")
    first.total_steps = 3
    first.fit()
    state = tmp_path / "old" / "checkpoint" / "state.json"
    info = json.loads(state.read_text())
    for h in info["history"]:
        del h["cpu_seconds_per_step"], h["eval_cpu_seconds"]
    info["pending"] = {"losses": [1.0], "seconds": 2.0}
    state.write_text(json.dumps(info))
    second = make_trainer(tmp_path, tokenizer, max_steps=8, name="old")
    history = second.fit()["history"]
    assert [h["step"] for h in history] == [0, 3, 6, 8]
    assert history[2]["cpu_seconds_per_step"] is None and history[3]["cpu_seconds_per_step"] > 0
    assert counted_cpu(history) is None
