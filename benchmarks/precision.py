"""Issue 16: a bfloat16 training step near its two-forward floor, and faster decoding, on CPU.

One process, cases interleaved (every case once per round), median seconds, SmolLM2 and real E2E rows:

Training (forward + backward + AdamW on the prefix, MLP reparameterisation, ``--batch-sizes`` x
``--lengths``), the frozen base in bfloat16 unless said:

* ``forward_bf16``: a no-grad forward of the same batch (the floor the goal is stated against);
  ``forward_fp32`` the same in float32; ``L{n}/forward_bf16_prefixed``: the no-grad forward with
  the prefix (attention over n more keys per query: the step's own forward).
* ``step_bf16_kernel``: the prefixed attention in bfloat16 through torch's CPU kernel (before issue 16,
  ``attach.CPU_FP32_BACKWARD = False``).
* ``step_bf16``: the prefixed attention in float32 (the default now): the CPU kernel's bfloat16
  backward is ~3x slower than its float32 one.
* ``step_bf16_compiled`` (``--compile``): the same step compiled as the Trainer compiles it
  (``TrainConfig.compile``, ``prefixtune.train.training_forward``); compile time is reported
  separately and excluded.
* ``step_fp32``: everything float32, for reference.

Decoding (``--decode-n`` E2E test sources, greedy, batch 16, every row forced to
``--max-new-tokens``; tokens/s): ``decode_fp32``, ``decode_bf16_before`` (bfloat16 without the
contiguous LM-head input: generate's first step then copies the head weight once per row) and
``decode_bf16`` (now); ``decode_*_static``: the same with transformers' static KV cache
(``cache_implementation="static"``: preallocated keys/values, no concatenation per step). Outputs
of float32 decoding are unchanged by this work (tested).

``--profile``: after the timing, one more call of every training case (and the bfloat16 forward) of
the first batch size and length runs under ``torch.profiler``; the JSON keeps each one's top operators
by self CPU time (where the step's time goes, before and after).

Example: ``python benchmarks/precision.py --threads 2 --compile --profile``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=C.csv_ints, default=[8, 16], help="training rows per step")
    p.add_argument("--lengths", type=C.csv_ints, default=[10, 200], help="prefix lengths for the training cases")
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd step (minutes of compiling)")
    p.add_argument("--profile", action="store_true",
                   help="top operators (torch.profiler, self CPU time) of every training case at the first batch size and length")
    p.add_argument("--decode-n", type=int, default=48, help="E2E test sources decoded per call (0: skip decoding)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per row")
    C.add_common_args(p, "results/perf/precision.json")
    args = p.parse_args(argv)
    C.fill_defaults(args, normal=dict(repeats=5, warmup=1), quick=dict(repeats=2, warmup=1))
    C.quiet()
    threads = C.setup_threads(args.threads)

    import torch

    import prefixtune as pt
    from prefixtune import attach
    from prefixtune.data import group_references, read_task
    generate_module = sys.modules["prefixtune.generate"]  # (prefixtune.generate is also the function)
    from prefixtune.template import collate_train, encode, special_ids
    from prefixtune.train import training_forward

    models = {dt: C.load_model(args.model, dt) for dt in (torch.float32, torch.bfloat16)}
    _, tok = models[torch.float32]
    train_rows = random.Random(args.seed).sample(read_task("e2e", "train"), max(args.batch_sizes))
    cases, compile_seconds = {}, {}

    def batch_of(model, b):
        return collate_train(model, [encode(model, tok, e.source, e.target) for e in train_rows[:b]], special_ids(tok)[2])

    for b in args.batch_sizes:
        for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            model = models[dtype][0]
            batch = batch_of(model, b)

            def forward(model=model, batch=batch):
                with torch.no_grad():
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

            cases[f"b{b}/forward_{tag}"] = forward
        for length in args.lengths:
            for dtype, tag, fp32_attention, compiled in (
                    (torch.bfloat16, "bf16_kernel", False, False), (torch.bfloat16, "bf16", True, False),
                    (torch.float32, "fp32", True, False)) + (((torch.bfloat16, "bf16_compiled", True, True),)
                                                             if args.compile else ()):
                model = models[dtype][0]
                batch = batch_of(model, b)
                torch.manual_seed(args.seed)
                tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=length)).train()
                opt = torch.optim.AdamW(tuner.parameters(), lr=1e-5)
                loss_of = training_forward(tuner, compile=compiled)

                def step(opt=opt, loss_of=loss_of, batch=batch, fp32_attention=fp32_attention):
                    attach.CPU_FP32_BACKWARD = fp32_attention
                    opt.zero_grad(set_to_none=True)
                    loss_of(**batch).loss.backward()
                    opt.step()

                name = f"b{b}/L{length}/step_{tag}"
                if tag == "bf16":  # the same forward with this prefix (the step's own forward, no gradients)

                    def prefixed_forward(tuner=tuner, batch=batch):
                        with torch.no_grad():
                            tuner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

                    cases[f"b{b}/L{length}/forward_bf16_prefixed"] = prefixed_forward
                if compiled:
                    start = time.perf_counter()
                    step()
                    compile_seconds[name] = time.perf_counter() - start
                cases[name] = step
    if args.decode_n:
        sources = [e.source for e in group_references(read_task("e2e", "test"))][: args.decode_n]
        prefixes = {}
        for dtype in models:
            torch.manual_seed(args.seed)
            prefixes[dtype] = pt.PrefixTuner(models[dtype][0], pt.PrefixConfig(length=10)).export()

        def decode(dtype, contiguous=True, **generate_kwargs):
            model = models[dtype][0]

            def run():
                generate_module.CONTIGUOUS_LM_HEAD = contiguous
                pt.generate(model, tok, sources, prefixes=prefixes[dtype], batch_size=16,
                            max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, **generate_kwargs)
            return run

        cases["decode_fp32"] = decode(torch.float32)
        cases["decode_fp32_static"] = decode(torch.float32, cache_implementation="static")
        cases["decode_bf16_before"] = decode(torch.bfloat16, contiguous=False)
        cases["decode_bf16"] = decode(torch.bfloat16)
        cases["decode_bf16_static"] = decode(torch.bfloat16, cache_implementation="static")

    print(f"precision: {len(cases)} cases, {args.repeats} rounds after {args.warmup} warm-up, {threads} threads", flush=True)
    times = C.interleaved(cases, args.repeats, args.warmup)
    profiles = {}
    if args.profile:
        first = f"b{args.batch_sizes[0]}/"
        for n in [n for n in cases if n.startswith(first) and ("/step_" in n and f"/L{args.lengths[0]}/" in n
                                                              or n.endswith("forward_bf16"))]:
            profiles[n] = top_operators(cases[n])
            print(f"\n{n}: top operators by self CPU time\n" + "\n".join(
                f"  {r['self_s']:8.3f} s {r['share']:6.1%} {r['calls']:6d}  {r['op']}" for r in profiles[n][:12]))
    attach.CPU_FP32_BACKWARD, generate_module.CONTIGUOUS_LM_HEAD = True, True
    med = {n: C.summary(t)["median"] for n, t in times.items()}
    rows = []
    for n in cases:
        row = {"case": n, "median": med[n], "ratio": None, "what": ""}
        if "/step_" in n:
            b, length = n.split("/")[:2]
            row["ratio"], row["what"] = med[n] / med[f"{b}/forward_bf16"], "x bf16 forward"
            row["ratio_prefixed"] = med[n] / med[f"{b}/{length}/forward_bf16_prefixed"]
        elif n.startswith("decode"):
            row["tokens_per_s"] = args.decode_n * args.max_new_tokens / med[n]
            row["ratio"], row["what"] = med["decode_fp32"] / med[n], "x fp32 decode speed"
        rows.append(row)
    table = C.print_table(rows, [("case", "case"), ("median", "median s"), ("ratio", "ratio"), ("what", "of"),
                                 ("ratio_prefixed", "x bf16 forward with the prefix")],
                          title=f"bfloat16 training and decoding (median of {args.repeats}), {threads} threads")
    result = {"benchmark": "precision", "settings": {k: v for k, v in vars(args).items() if k != "memory_case"},
              "environment": C.environment(threads), "cases": {n: C.summary(t) for n, t in times.items()},
              "compile_seconds": compile_seconds, "profiles": profiles, "rows": rows, "table": table}
    print(f"\nwrote {C.write_json(args.out, result)}")
    return result


def top_operators(fn, n: int = 20) -> list[dict]:
    """One call of ``fn`` under torch.profiler: the ``n`` operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in top]


if __name__ == "__main__":
    main()
