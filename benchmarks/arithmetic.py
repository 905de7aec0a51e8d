"""What bfloat16 buys for the experiments (issue 11): seconds per training step and per decoded table.

Every method of the experiments trains through ``prefixtune.methods.build`` and the Trainer, so the
cases below are exactly those wrappers, on a fixed batch of real E2E training pairs:

* ``prefix/float32``, ``finetune/float32``, ``adapter/float32``: everything in float32.
* ``prefix/bf16``: the frozen base loaded in bfloat16 (``--dtype bfloat16``), the prefix, its MLP,
  gradients and AdamW state in float32 (what ``prefixtune train --dtype bfloat16`` does).
* ``prefix/autocast``, ``finetune/autocast``, ``adapter/autocast``: float32 weights (the master copy
  that AdamW updates) and ``torch.autocast("cpu", torch.bfloat16)`` around the forward: matmuls in
  bfloat16, reductions and the loss in float32: the standard mixed-precision recipe
  (``TrainConfig.autocast``), run as the Trainer runs it (``prefixtune.train.frozen_casts``): the
  frozen weights' bfloat16 copies kept across steps (``FrozenCasts``), or, on a CPU without bfloat16
  kernels, the products in float32 on bfloat16-rounded operands (``prefixtune/cpu_bf16.py``).
* ``prefix/autocast-bf16-attention``, ``finetune/autocast-bf16-attention``: as ``*/autocast`` but the
  attention by torch's bfloat16 kernel, where the products run in float32 (cpu_bf16.ATTENTION off;
  the same as ``*/autocast`` on a CPU with bfloat16 kernels).
* ``prefix/autocast-recast``: the same with autocast's own kernels and casts, the frozen weights cast
  at every forward (as before FrozenCasts).
* ``decode/float32``, ``decode/bf16``: beam-5 decoding (the paper's table-to-text decoding, at most
  80 new tokens) of the same E2E test tables with a trained-shape prefix, base in float32 / bfloat16
  (run as ``generate`` runs it: see above). ``decode/bf16-native``: bfloat16 with torch's own kernels
  (the same as ``decode/bf16`` on a CPU with bfloat16 kernels).

Timing follows benchmarks/_common.py: warm-up, interleaved rounds, medians, ratios from one process.

``--task dialogsum`` takes the training batch from DialogSum, its sources cut as the experiments cut
them (192 tokens): long sequences, where attention costs most.

Example: ``python benchmarks/arithmetic.py --threads 1``
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TRAIN_CASES = ("prefix/float32", "prefix/bf16", "prefix/autocast", "prefix/autocast-recast", "finetune/float32",
               "finetune/autocast", "adapter/float32", "adapter/autocast", "prefix/autocast-bf16-attention",
               "finetune/autocast-bf16-attention")
DECODE_CASES = ("decode/float32", "decode/bf16", "decode/bf16-native")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Seconds per training step and per decoded E2E table, float32 vs "
                                "bfloat16 (frozen base in bf16, or autocast with float32 master weights).",
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=None, help="training rows per step (default 8, --quick 2)")
    p.add_argument("--decode-tables", type=int, default=None, help="E2E test tables per decode call (default 16, --quick 2)")
    p.add_argument("--task", choices=("e2e", "dialogsum"), default="e2e",
                   help="the training pairs' data set (dialogsum: sources cut as in the experiments)")
    p.add_argument("--cases", type=C.csv_strs, default=list(TRAIN_CASES + DECODE_CASES), help="subset of the cases")
    C.add_common_args(p, "results/perf/arithmetic.json")
    args = p.parse_args(argv)
    C.fill_defaults(args, normal=dict(batch_size=8, decode_tables=16, repeats=5, warmup=1),
                    quick=dict(batch_size=2, decode_tables=2, repeats=2, warmup=1))
    bad = set(args.cases) - set(TRAIN_CASES + DECODE_CASES)
    if bad:
        p.error(f"unknown --cases {sorted(bad)}")
    return args


def build_cases(args):
    import torch

    import prefixtune as pt
    from prefixtune import cpu_bf16
    from prefixtune.data import DECODING, group_references, read_task
    from prefixtune.experiments import Scale
    from prefixtune.experiments.runs import truncate_sources
    from prefixtune.methods import MethodConfig, build
    from prefixtune.template import collate_train, encode, special_ids
    from prefixtune.train import autocast_context, frozen_casts

    models = {}

    def model(dtype):
        if dtype not in models:
            models[dtype] = C.load_model(args.model, dtype)
        return models[dtype]

    rows = random.Random(args.seed).sample(read_task(args.task, "train"), args.batch_size)
    tables = [g.source for g in group_references(read_task("e2e", "test"))[: args.decode_tables]]
    cases, info = {}, {}
    for name in args.cases:
        method, mode = name.split("/")
        dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
        if method == "decode":
            m, tok = model(dtype)
            torch.manual_seed(args.seed)
            prefix = pt.PrefixTuner(m, pt.PrefixConfig(length=10)).export()
            decoding = dict(DECODING["e2e"])

            def step(m=m, tok=tok, prefix=prefix, decoding=decoding, native=mode == "bf16-native"):
                was, cpu_bf16.FLOAT32_PRODUCTS = cpu_bf16.FLOAT32_PRODUCTS, cpu_bf16.FLOAT32_PRODUCTS and not native
                try:
                    return pt.generate(m, tok, tables, prefixes=prefix, batch_size=16, **decoding)
                finally:
                    cpu_bf16.FLOAT32_PRODUCTS = was

            cases[name], info[name] = step, {"tables": len(tables), **decoding}
            continue
        # a fresh model per trained-weight case (fine-tuning and adapters change it)
        m, tok = (C.load_model(args.model, dtype) if method != "prefix" else model(dtype))
        if args.task == "dialogsum":
            rows = truncate_sources(rows, tok, Scale().max_source_tokens)
        pad = special_ids(tok)[2]
        batch = collate_train(m, [encode(m, tok, e.source, e.target) for e in rows], pad)
        torch.manual_seed(args.seed)
        tuner = build(MethodConfig(method, size=0.03), m, pt.PrefixConfig(length=10))
        tuner.train()
        opt = torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=1e-5)

        def step(tuner=tuner, opt=opt, batch=batch, auto=mode.startswith("autocast"),
                 casts=frozen_casts("cpu") if mode.startswith("autocast") and mode != "autocast-recast" else None,
                 attention=mode != "autocast-bf16-attention"):
            was, cpu_bf16.ATTENTION = cpu_bf16.ATTENTION, attention
            try:
                opt.zero_grad(set_to_none=True)
                with autocast_context(auto, "cpu", casts):
                    loss = tuner(**batch, return_logits=False).loss
                loss.backward()
                opt.step()
                return float(loss)
            finally:
                cpu_bf16.ATTENTION = was

        cases[name] = step
        info[name] = {"trainable_parameters": sum(p.numel() for p in tuner.parameters()),
                      "master_dtype": str(next(tuner.parameters()).dtype).replace("torch.", ""),
                      "batch_shape": list(batch["input_ids"].shape)}
    return cases, info


def main(argv=None) -> int:
    args = parse_args(argv)
    C.quiet()
    threads = C.setup_threads(args.threads)
    cases, info = build_cases(args)
    times = C.interleaved(cases, args.repeats, args.warmup)
    med = {n: C.summary(t)["median"] for n, t in times.items()}
    ratios = {}
    for a, b in (("prefix/bf16", "prefix/float32"), ("prefix/autocast", "prefix/float32"),
                 ("prefix/autocast", "prefix/autocast-recast"),
                 ("finetune/autocast", "finetune/float32"), ("adapter/autocast", "adapter/float32"),
                 ("decode/bf16", "decode/float32"), ("decode/bf16", "decode/bf16-native"), ("finetune/float32", "prefix/float32"),
                 ("finetune/autocast", "prefix/bf16"), ("prefix/autocast", "prefix/autocast-bf16-attention"),
                 ("finetune/autocast", "finetune/autocast-bf16-attention")):
        if a in times and b in times:
            ratios[f"{a} / {b}"] = {"ratio_of_medians": C.ratio(med[a], med[b]), "paired": C.paired_ratio(times[a], times[b])}
    rows = [{"case": n, "seconds": med[n], **{k: v for k, v in info[n].items() if k in ("trainable_parameters", "master_dtype")}}
            for n in times]
    table = C.print_table(rows, [("case", "case"), ("seconds", "s/call (median)"), ("trainable_parameters", "trainable"),
                                 ("master_dtype", "master weights")], title=f"arithmetic, {threads} thread(s)")
    for k, v in ratios.items():
        print(f"{k}: {v['ratio_of_medians']:.3f} (paired {v['paired']:.3f})")
    C.write_json(args.out, {"benchmark": "arithmetic", "settings": vars(args), "environment": C.environment(threads),
                            "cases": {n: {**info[n], "seconds": C.summary(times[n])} for n in times},
                            "ratios": ratios, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
