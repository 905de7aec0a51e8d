"""Beam search with final rows retired (prefixtune/beam.py) vs transformers' beam search loop.

What is measured: the E2E test decoding of the experiments (prefixtune/experiments/runs.py): a
random sample of ``--n`` test tables (seed ``--seed``), the task's decoding (beam 5, up to 80 new
tokens, rows end at EOS), batches of ``--batch-size`` (48, the experiments' decode batch), the
base model in ``--dtype`` (bfloat16, as the experiments decode), with the prefix ``--prefix`` (a
prefix file, e.g. a trained run's ``prefix.safetensors``; default: none, the base model). The cases
(``--cases``, default all), interleaved: ``transformers`` (``generate.RETIRE_ROWS = False``),
``retire`` (the default), ``retire-cat`` (rows retired, but the cache reordered at once and grown by
torch.cat as transformers does: ``beam.GATHER_ON_UPDATE = False``) and ``retire-fresh`` (rows
retired, but each step's float32 scores in fresh tensors: ``beam.REUSE_SCORE_BUFFERS = False``).

Reported: seconds per case (``--clock``: wall time, or the process's CPU time, which other load on
the machine disturbs less), each case's ratio to ``retire`` (of medians, and the median of per-round
ratios), how many of its outputs differ from ``retire``'s and from transformers', its BLEU (the
paper's E2E scorer; in bfloat16 the batch shape changes matmul rounding, so near-ties can resolve
differently), and the share of row-steps that the transformers loop spends on rows whose result is
already final (counted from the retiring run's batch sizes).

Example: ``python benchmarks/beam_rows.py --threads 1 --prefix runs/e2e/prefix.safetensors``
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# case: (RETIRE_ROWS, GATHER_ON_UPDATE, REUSE_SCORE_BUFFERS)
CASES = {"transformers": (False, True, True), "retire": (True, True, True), "retire-cat": (True, False, True),
         "retire-fresh": (True, True, False)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="E2E test tables decoded per call (default 96, --quick 8)")
    p.add_argument("--batch-size", type=int, default=48, help="tables per generate batch (default 48)")
    p.add_argument("--prefix", default=None, help="a prefix file to decode with (default: none)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the base model's dtype")
    p.add_argument("--cases", type=C.csv_strs, default=list(CASES), help=f"a subset of {','.join(CASES)} (retire is always run)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="time per call: wall or process CPU time")
    C.add_common_args(p, "results/perf/beam_rows.json")
    args = p.parse_args(argv)
    C.fill_defaults(args, normal=dict(repeats=3, warmup=0, n=96), quick=dict(repeats=1, warmup=0, n=8))
    bad = set(args.cases) - set(CASES)
    if bad:
        p.error(f"unknown --cases {sorted(bad)}; choose from {','.join(CASES)}")
    names = ["retire", *(n for n in CASES if n in args.cases and n != "retire")]
    C.quiet()
    threads = C.setup_threads(args.threads)

    import torch

    import prefixtune as pt
    from prefixtune.data import DECODING, group_references, read_task
    from prefixtune.metrics import e2e

    from prefixtune import beam

    generate_module = importlib.import_module("prefixtune.generate")
    model, tok = C.load_model(args.model, getattr(torch, args.dtype))
    prefix = pt.Prefix.load(args.prefix) if args.prefix else None
    groups = random.Random(args.seed).sample(group_references(read_task("e2e", "test")), args.n)
    sources = [g.source for g in groups]
    rows, outputs = [], {}

    def record(module, a, kw):  # batch size of each decoding step; None where a batch's prompt pass starts
        rows.append(kw["input_ids"].shape[0] if kw["input_ids"].shape[1] == 1 else None)

    def case(name: str):
        def run():
            generate_module.RETIRE_ROWS, beam.GATHER_ON_UPDATE, beam.REUSE_SCORE_BUFFERS = CASES[name]
            rows.clear()
            hook = model.register_forward_pre_hook(record, with_kwargs=True)
            try:
                outputs[name] = pt.generate(model, tok, sources, prefixes=prefix, batch_size=args.batch_size,
                                            **DECODING["e2e"])
            finally:
                hook.remove()
                generate_module.RETIRE_ROWS, beam.GATHER_ON_UPDATE, beam.REUSE_SCORE_BUFFERS = CASES["retire"]
            if name == "retire":
                outputs["rows"] = list(rows)
        return run

    print(f"beam_rows: {len(sources)} tables, cases {names}, {args.repeats} rounds, {threads} threads, "
          f"{args.clock} time", flush=True)
    times = C.interleaved({n: case(n) for n in names}, args.repeats, args.warmup,
                          clock=time.process_time if args.clock == "cpu" else time.perf_counter)
    med = {n: C.summary(t)["median"] for n, t in times.items()}
    # row-steps: the transformers loop runs every step of a batch at its first step's size
    batches = []
    for r in outputs["rows"]:
        if r is None:
            batches.append([])
        else:
            batches[-1].append(r)
    batches = [b for b in batches if b]
    steps, full = sum(sum(b) for b in batches), sum(b[0] * len(b) for b in batches)
    refs = [g.references for g in groups]

    def differing(a: str, b: str) -> int | None:
        return sum(x != y for x, y in zip(outputs[a], outputs[b])) if b in outputs else None

    compared = {n: {"vs_retire": med[n] / med["retire"], "paired_vs_retire": C.paired_ratio(times[n], times["retire"]),
                    "differing_outputs_vs_retire": differing(n, "retire"),
                    "differing_outputs_vs_transformers": differing(n, "transformers"),
                    "bleu": 100 * e2e.pymteval_bleu_nist(outputs[n], refs)[0]} for n in names}
    rows_out = [{"case": n, "median": med[n], **compared[n]} for n in names]
    table = C.print_table(rows_out, [("case", "case"), ("median", f"median s ({args.clock})"), ("vs_retire", "vs retire"),
                                     ("paired_vs_retire", "paired"), ("differing_outputs_vs_retire", "outputs != retire"),
                                     ("bleu", "BLEU")],
                          title=f"Beam 5 on {len(sources)} E2E test tables, batch {args.batch_size}, {args.dtype}, "
                                f"prefix {args.prefix or 'none'}, {threads} threads")
    result = {
        "benchmark": "beam_rows", "settings": {k: v for k, v in vars(args).items() if k != "memory_case"},
        "environment": C.environment(threads), "cases": {n: C.summary(t) for n, t in times.items()},
        "compared": compared,
        "row_steps_final_share": 1 - steps / full if full and "transformers" in names else None,
        "table": table,
    }
    if "transformers" in names:
        print(f"share of the transformers loop's row-steps on final rows: {result['row_steps_final_share']:.3f}")
    print(f"\nwrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
