"""train-many: several prefixes trained in shared batches end as if each had been trained alone."""

import json
import os
import signal

import pytest
import torch

import prefixtune as pt
from prefixtune.cli import main
from prefixtune.data import Example
from prefixtune.train import TrainConfig, Trainer
from prefixtune.train_many import Job, ManyTrainer, read_jobs
from conftest import tiny_model

FOODS = ["Chinese", "Italian", "French", "Indian", "English", "Japanese", "Greek", "Thai"]


def pairs(style: int, n: int, offset: int = 0) -> list[Example]:
    """A user's data: tables rendered in the user's own style (targets of different lengths)."""
    out = []
    for i in range(offset, offset + n):
        food = FOODS[i % len(FOODS)]
        target = [f"Place{i} serves {food} food .", f"{food} at Place{i}", f"At Place{i} you eat {food} , and it is good ."][style]
        out.append(Example(f"name : Place{i} | food : {food}", target))
    return out


JOBS = {  # name -> (data, prefix length, settings)
    "ada": (pairs(0, 12), 2, dict(lr=5e-2, max_steps=6, batch_size=4)),
    "bob": (pairs(1, 7), 3, dict(lr=2e-2, max_steps=4, batch_size=3)),
    "cyd": (pairs(2, 10), 5, dict(lr=3e-2, max_steps=5, batch_size=2, seed=7)),
}


def job(name, data=None):
    d, length, settings = JOBS[name]
    config = TrainConfig(**{"warmup_steps": 1, "eval_every": 2, "seed": 3, **settings})
    return Job(name, data or d, d[:3], pt.PrefixConfig(length=length, mlp_hidden=16), config)


def model():
    return tiny_model("llama-gqa", init_range=0.2)  # no dropout: isolation is exact up to rounding


def prefixes(out_dir, names):
    return {n: pt.Prefix.load(out_dir / "jobs" / n / "prefix.safetensors").kv["self"] for n in names}


def alone(tmp_path, tokenizer, name):
    j = job(name)
    Trainer(model(), tokenizer, j.train, j.dev, j.prefix, j.train_config, tmp_path / "alone" / "jobs" / name,
            progress=False).fit()
    return pt.Prefix.load(tmp_path / "alone" / "jobs" / name / "prefix.safetensors").kv["self"]


def logged(run_dir):
    return [(e["step"], e["train_loss"], e["dev_loss"]) for e in map(json.loads, (run_dir / "log.jsonl").open())]


def test_jobs_trained_together_end_as_trained_alone(tmp_path, tokenizer):
    together = ManyTrainer(model(), tokenizer, [job(n) for n in JOBS], tmp_path / "together", rows_per_round=16,
                           progress=False)
    result = together.fit()
    assert {n: r["steps"] for n, r in result.items()} == {"ada": 6, "bob": 4, "cyd": 5}
    got = prefixes(tmp_path / "together", JOBS)
    for name in JOBS:
        want = alone(tmp_path, tokenizer, name)
        assert torch.allclose(got[name], want, atol=1e-5, rtol=1e-4), (name, (got[name] - want).abs().max())
        for (s1, t1, d1), (s2, t2, d2) in zip(logged(tmp_path / "together" / "jobs" / name),
                                             logged(tmp_path / "alone" / "jobs" / name)):
            assert s1 == s2 and (t1 is None or abs(t1 - t2) < 1e-4) and abs(d1 - d2) < 1e-4
    summary = json.loads((tmp_path / "together" / "train-many.json").read_text())
    assert set(summary["jobs"]) == set(JOBS)


def test_other_jobs_data_cannot_change_a_job(tmp_path, tokenizer):
    """Ada's prefix is the same whether Bob's data changes, Cyd joins, or Ada trains with Bob only."""
    runs = {
        "all": [job("ada"), job("bob"), job("cyd")],
        "bob-changed": [job("ada"), job("bob", data=pairs(0, 9, offset=40)), job("cyd")],
        "without-cyd": [job("ada"), job("bob")],
    }
    ada = {}
    for tag, jobs in runs.items():
        ManyTrainer(model(), tokenizer, jobs, tmp_path / tag, rows_per_round=12, progress=False).fit()
        ada[tag] = prefixes(tmp_path / tag, ["ada"])["ada"]
    assert torch.allclose(ada["all"], ada["bob-changed"], atol=1e-5, rtol=1e-4)
    assert torch.allclose(ada["all"], ada["without-cyd"], atol=1e-5, rtol=1e-4)
    bob = prefixes(tmp_path / "all", ["bob"])["bob"], prefixes(tmp_path / "bob-changed", ["bob"])["bob"]
    assert (bob[0] - bob[1]).abs().max() > 1e-3  # Bob's own data does change Bob's prefix


def test_interrupted_train_many_resumes_every_job(tmp_path, tokenizer):
    straight = ManyTrainer(model(), tokenizer, [job(n) for n in JOBS], tmp_path / "straight", rows_per_round=8,
                           progress=False)
    straight.fit()
    first = ManyTrainer(model(), tokenizer, [job(n) for n in JOBS], tmp_path / "resumed", rows_per_round=8,
                        progress=False)
    calls = []

    def hook(module, args):  # a Ctrl-C during the 4th training forward
        if module.training:
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGINT)

    handle = first.model.get_input_embeddings().register_forward_pre_hook(hook)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    handle.remove()
    assert 0 < sum(t.step for t in first.trainers.values()) < 15
    ManyTrainer(model(), tokenizer, [job(n) for n in JOBS], tmp_path / "resumed", rows_per_round=8,
                progress=False).fit()
    want, got = prefixes(tmp_path / "straight", JOBS), prefixes(tmp_path / "resumed", JOBS)
    for name in JOBS:
        assert torch.equal(want[name], got[name]), name
        assert logged(tmp_path / "straight" / "jobs" / name) == logged(tmp_path / "resumed" / "jobs" / name)


def test_jobs_file_errors_name_the_line(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"source": "x", "target": "y"}) + "\n")
    defaults = pt.PrefixConfig(), TrainConfig()

    def check(lines, message):
        path = tmp_path / "jobs.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=message):
            read_jobs(path, *defaults)

    ok = json.dumps({"name": "a", "train": "a.jsonl"})
    check([ok, "{not json"], r"jobs.jsonl:2: not valid JSON")
    check([ok, json.dumps({"name": "a", "train": "a.jsonl"})], r":2: job name 'a' is used twice")
    check([json.dumps({"name": "a b", "train": "a.jsonl"})], r":1: expected \"name\"")
    check([json.dumps({"name": "a"})], r":1: expected \"train\"")
    check([json.dumps({"name": "a", "train": "a.jsonl", "lenght": 3})], r":1: unknown setting\(s\) \['lenght'\]")
    check([json.dumps({"name": "a", "train": "a.jsonl", "lr": "fast"})], r":1: 'lr' must be int or float")
    check([json.dumps({"name": "a", "train": "a.jsonl", "length": 0})], r":1: PrefixConfig.length must be >= 1")
    check([json.dumps({"name": "a", "train": "a.jsonl", "patience": 3})], r":1: 'patience' stops on the dev loss")
    check([json.dumps({"name": "a", "train": "a.jsonl", "init_text": "x"})],
          r":1: \['init_text'\] would change nothing with method 'prefix', init 'random'")  # was a random start, silently
    check([ok, json.dumps({"name": "b", "train": "a.jsonl", "dev": "b.jsonl"})],
          r"jobs.jsonl:2 \(job 'b'\): JSONL file not found: .*b.jsonl")  # a job's file, with the job's line
    (tmp_path / "bad.jsonl").write_text('{"source": "x"}\n')
    check([json.dumps({"name": "a", "train": "bad.jsonl"})], r"jobs.jsonl:1 \(job 'a'\): .*bad.jsonl:1: no \"target\"")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"name": "a", "train": "a.jsonl", "length": 4, "lr": 1}) + "\n")
    jobs = read_jobs(tmp_path / "jobs.jsonl", *defaults)
    assert jobs[0].prefix.length == 4 and jobs[0].train_config.lr == 1 and jobs[0].dev is None


def test_cli_train_many(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = []
    for name, (data, length, settings) in JOBS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n"
                                                       for e in data))
        lines.append(json.dumps({"name": name, "train": f"{name}.jsonl", "dev": f"{name}.jsonl", "length": length,
                                 **settings}))
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["train-many", "--model", str(model_dir), "--jobs", str(tmp_path / "jobs.jsonl"), "--out", str(out),
                 "--mlp-hidden", "16", "--rows-per-round", "9", "--eval-every", "2"]) == 0
    for name in JOBS:
        prefix = pt.Prefix.load(out / "jobs" / name / "prefix.safetensors")
        assert prefix.length == JOBS[name][1]
    assert main(["train-many", "--jobs", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_personalise_demo_runs_end_to_end(tmp_path, tokenizer):
    """scripts/personalise_demo.py on a tiny model: 8 users' data from ../shared/data, train-many,
    a server queried with all 8 prefixes at once, the 8 x 9 dev NLL matrix."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "tiny"
    m = tiny_model("llama-gqa")
    m.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    script = Path(__file__).resolve().parent.parent / "scripts" / "personalise_demo.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(model_dir), "--dtype", "float32", "--out",
                           str(tmp_path / "demo"), "--n-train", "4", "--n-dev", "2", "--steps", "1", "--batch-size", "2",
                           "--max-new-tokens", "3", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "personalise.json").read_text())
    users = ["e2e-prose", "e2e-terse", "e2e-shout", "e2e-json", "webnlg", "topics", "dialogsum", "xsum"]
    assert list(result["matrix"]) == users and all(len(row) == 9 for row in result["matrix"].values())
    assert all(0 < v < 50 for row in result["matrix"].values() for v in row.values())
    assert set(result["served"]["answers"]) == set(users)
    assert "Each user's own prefix is best" in proc.stdout
