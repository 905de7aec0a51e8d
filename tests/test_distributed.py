"""Scale-out for real: `prefixtune train/generate` as 2 CPU processes (gloo) under `accelerate launch`.

Two processes must give what one process gives: the same prefix from the same global batches
(up to float summation order), for a fresh run, and for a resumed run with the base sharded by
FSDP; and the same decoded text. Process 0 alone writes the run directory.

`accelerate launch --cpu` starts a single process unless MPI is used, so the test starts the two
local processes the way a multi-GPU node would (`--multi_gpu`, i.e. torchrun); with no GPU,
prefixtune puts them on CPU with the gloo backend.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import prefixtune as pt
from prefixtune.cli import build_parser, main, train_configs
from prefixtune.data import Example
from prefixtune.train import TrainConfig, Trainer
from conftest import random_prefix, tiny_model
from test_train import PAIRS

ROWS = PAIRS + [Example("name : Extra | food : Thai | area : riverside | near : The Bridge",
                        "Extra serves Thai food by the river near The Bridge .")]  # 19 rows: uneven shares
# global micro-batch of 3 rows: shares of 2 and 1 rows; one of the epoch's 7 batches has 1 row (4 steps x 2
# micro-batches cover the epoch), so one process once has no row (it runs a zero-weighted one, in step)
TRAIN = ["--max-steps", "4", "--batch-size", "3", "--grad-accum", "2", "--eval-every", "2", "--lr", "5e-2",
         "--warmup-steps", "1", "--length", "3", "--mlp-hidden", "16", "--bucket", "2"]  # length-bucketed batches
RUN_FILES = ["checkpoint", "checkpoint/state.json", "checkpoint/state.safetensors", "log.jsonl", "prefix.safetensors",
             "run.json", "summary.json"]
# Float tolerance: the processes sum the same per-token terms in another order (per share, then an
# all-reduce) over narrower padded batches; that moves a gradient by ~1e-7 relative, and 4 AdamW
# steps keep it there: measured |difference| <= 8e-7 on prefix values up to 2.5 (~3e-7 relative).
# 1e-5 leaves a >10x margin and is far below what one step changes (lr 5e-2: ~1e-2 per value;
# dropping the global normalisation fails by 1.6).
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# FSDP settings for CPU processes: accelerate's defaults would load the weights in process 0 only and
# look for a GPU to broadcast them from
FSDP = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]


def launch(*args: str, module: str = "prefixtune.cli", mode: list[str] = ["--multi_gpu"]) -> None:
    """``accelerate launch`` 2 local processes running ``python -m module args``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "tiny-llama"
    tiny_model("llama-gqa", init_range=0.2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = "".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in ROWS)
    (root / "train.jsonl").write_text(rows)
    (root / "dev.jsonl").write_text("".join(rows.splitlines(keepends=True)[:5]))
    common = ["--model", str(model_dir), "--train", str(root / "train.jsonl"), "--dev", str(root / "dev.jsonl"), *TRAIN]
    return root, model_dir, common


def files(run) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def assert_same_prefix(a, b):
    pa, pb = pt.Prefix.load(a / "prefix.safetensors"), pt.Prefix.load(b / "prefix.safetensors")
    for name in pa.kv:
        assert torch.allclose(pa.kv[name], pb.kv[name], rtol=0, atol=ATOL), (name, (pa.kv[name] - pb.kv[name]).abs().max())


def test_two_processes_train_like_one(setup):
    root, model_dir, common = setup
    # fresh run, per-sequence loss (normalised by the global row count)
    seq = [*common, "--loss", "sequence_sum"]
    assert main(["train", *seq, "--out", str(root / "one-seq")]) == 0
    launch("train", *seq, "--out", str(root / "two-seq"))
    assert_same_prefix(root / "one-seq", root / "two-seq")
    # token-mean loss (normalised by the global target-token count), and a resume under 2 processes
    # with the frozen base sharded by FSDP: one process stops after step 2 (its checkpoint), two
    # processes finish the run
    assert main(["train", *common, "--out", str(root / "one")]) == 0
    args = build_parser().parse_args(["train", *common, "--out", str(root / "two-resumed")])
    model, tokenizer = pt.load_base_model(str(model_dir))
    first = Trainer(model, tokenizer, ROWS, ROWS[:5], *train_configs(args), args.out, progress=False)
    first.total_steps = 2
    first.fit()
    launch("train", *common, "--out", str(root / "two-resumed"), mode=FSDP)
    assert_same_prefix(root / "one", root / "two-resumed")
    # the fingerprint was taken from the full weights, not a shard: the prefix works with the model
    pt.Prefix.load(root / "two-resumed" / "prefix.safetensors").check_compatible(model)

    for name in ("two-seq", "two-resumed"):
        run = root / name
        # process 0 alone wrote: exactly the run's files, one log line per evaluation, no leftovers
        assert files(run) == RUN_FILES, name
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [2, 4], name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["best_dev_loss"] < summary["history"][0]["dev_loss"]
    one = json.loads((root / "one" / "summary.json").read_text())["history"]
    two = json.loads((root / "two-resumed" / "summary.json").read_text())["history"]
    for a, b in zip(one, two, strict=True):  # dev losses (sharded over the processes) agree too
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-6)
    state = json.loads((root / "two-resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4


def test_two_processes_decode_like_one(setup, tmp_path):
    root, model_dir, _ = setup
    model = tiny_model("llama-gqa", init_range=0.2)  # the weights saved in model_dir
    a, b = random_prefix(model, 3, seed=1).save(tmp_path / "a.safetensors"), random_prefix(model, 2, seed=2).save(tmp_path / "b.safetensors")
    sources = tmp_path / "sources.txt"
    sources.write_text("".join(e.source + "\n" for e in ROWS[::2]))
    # 10 sources x 2 prefixes = 20 rows in mixed-prefix batches of 3: 7 batches, 4 + 3 per process
    args = ["generate", "--model", str(model_dir), "--input", str(sources), "--prefix", str(a), "--prefix", str(b),
            "--batch-size", "3", "--max-new-tokens", "6"]
    assert main([*args, "--out", str(tmp_path / "one.jsonl")]) == 0
    launch(*args, "--out", str(tmp_path / "two.jsonl"), module="prefixtune")  # the `prefixtune` command's module
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 10
    assert not list(tmp_path.glob("*.partial*"))  # each process's partial file goes once the output is written


def test_only_process_zero_can_write(tmp_path, tokenizer):
    model = tiny_model("llama-gqa")
    trainer = Trainer(model, tokenizer, ROWS, None, pt.PrefixConfig(length=2, mlp_hidden=8), TrainConfig(),
                      tmp_path / "run", progress=False)
    trainer.is_main, trainer.rank = False, 1  # as process 1 sees itself
    for write in (trainer._write_run_config, trainer._save_prefix, lambda: trainer._append_log({}),
                  lambda: trainer._write_checkpoint([torch.get_rng_state()])):
        with pytest.raises(RuntimeError, match="only process 0 writes"):
            write()
    assert not (tmp_path / "run").exists()
