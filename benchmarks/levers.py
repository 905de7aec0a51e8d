"""Issue 6 levers, one at a time, in one process: what each speed change buys.

Training step (forward + backward + AdamW on the prefix), SmolLM2, one fixed batch of real E2E
training rows (prefix length ``--length``), cumulative levers:

* ``plain``: full logits (LM head on every position), transformers' sdpa (key/value heads
  repeated for grouped-query attention), float32 base: the implementation before issue 6.
* ``+head``: the LM head on target positions only (``return_logits=False``, what training uses).
* ``+gqa``: torch's grouped-query CPU kernel for the prefix-masked attention (``attach.CPU_GQA``).
* ``+bf16``: the frozen base in bfloat16 (prefix parameters and AdamW state stay float32).

Decoding (beam and greedy over E2E test sources, prefix length 10 and 200, every row forced to
``--max-new-tokens``): decode steps with the prefix concatenated to the cache at every layer and
step (``attach.FAST_DECODE = False``, before) vs attended without concatenation (after); and,
for beam 5 at length 200, the grouped-query kernel off (its share is in the prompt pass).

Length bucketing is a property of the data order, not of a step: its effect (padding 28% -> 1.3%
of the token slots at batch 8 on E2E) is measured in tests/test_train.py and reported in
results/perf.md.

Example: ``python benchmarks/levers.py --threads 2``
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="training rows per step")
    p.add_argument("--length", type=int, default=10, help="prefix length for the training cases")
    p.add_argument("--decode-n", type=int, default=16, help="E2E test sources decoded per call (0: skip decoding)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens generated per row")
    C.add_common_args(p, "results/perf/levers.json")
    args = p.parse_args(argv)
    C.fill_defaults(args, normal=dict(repeats=5, warmup=1), quick=dict(repeats=2, warmup=1))
    C.quiet()
    threads = C.setup_threads(args.threads)

    import torch

    import prefixtune as pt
    from prefixtune import attach
    from prefixtune.data import group_references, read_task
    from prefixtune.template import collate_train, encode, special_ids

    models = {dt: C.load_model(args.model, dt) for dt in (torch.float32, torch.bfloat16)}
    model, tok = models[torch.float32]
    rows = random.Random(args.seed).sample(read_task("e2e", "train"), args.batch_size)
    batch = collate_train(model, [encode(model, tok, e.source, e.target) for e in rows], special_ids(tok)[2])

    def train_case(dtype, return_logits, gqa):
        torch.manual_seed(args.seed)
        tuner = pt.PrefixTuner(models[dtype][0], pt.PrefixConfig(length=args.length)).train()
        opt = torch.optim.AdamW(tuner.parameters(), lr=1e-5)

        def step():
            attach.CPU_GQA = gqa
            opt.zero_grad(set_to_none=True)
            tuner(**batch, return_logits=return_logits).loss.backward()
            opt.step()

        return step

    cases = {
        "train/plain": train_case(torch.float32, True, False),
        "train/+head": train_case(torch.float32, False, False),
        "train/+head+gqa": train_case(torch.float32, False, True),
        "train/+head+gqa+bf16": train_case(torch.bfloat16, False, True),
    }
    if args.decode_n:
        sources = [e.source for e in group_references(read_task("e2e", "test"))][: args.decode_n]
        prefixes = {}
        for length in (10, 200):
            torch.manual_seed(args.seed)
            prefixes[length] = pt.PrefixTuner(model, pt.PrefixConfig(length=length)).export()

        def decode_case(length, beams, fast, gqa=True):
            def run():
                attach.FAST_DECODE, attach.CPU_GQA = fast, gqa
                pt.generate(model, tok, sources, prefixes=prefixes[length], batch_size=len(sources), num_beams=beams,
                            max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
            return run

        for beams in (1, 5):
            for length in (10, 200):
                for fast in (False, True):
                    cases[f"decode/beams{beams}/L{length}/{'after' if fast else 'before'}"] = decode_case(length, beams, fast)
        # the grouped-query kernel's share: the prompt pass of beam search (5 copies of each prompt)
        cases["decode/beams5/L200/after-without-gqa"] = decode_case(200, 5, True, gqa=False)

    print(f"levers: {len(cases)} cases, {args.repeats} rounds after {args.warmup} warm-up, {threads} threads", flush=True)
    times = C.interleaved(cases, args.repeats, args.warmup)
    attach.CPU_GQA, attach.FAST_DECODE = True, True
    med = {n: C.summary(t)["median"] for n, t in times.items()}
    rows_out = [{"case": n, "median": med[n], "vs_first": med[n] / med[next(iter(cases))] if n.startswith("train") else None}
                for n in cases]
    for n in cases:
        if n.endswith("/after"):
            before = n.replace("/after", "/before")
            rows_out[list(cases).index(n)]["vs_first"] = med[n] / med[before]
    if "decode/beams5/L200/after-without-gqa" in med:  # time with the kernel / time without it
        rows_out[-1]["vs_first"] = med["decode/beams5/L200/after"] / med["decode/beams5/L200/after-without-gqa"]
    table = C.print_table(rows_out, [("case", "case"), ("median", "median s"),
                                     ("vs_first", "time vs plain (train) / after vs before (decode) / with vs without gqa")],
                          title=f"Levers (median of {args.repeats}), {threads} threads, batch {list(batch['input_ids'].shape)}")
    result = {"benchmark": "levers", "settings": {k: v for k, v in vars(args).items() if k != "memory_case"},
              "environment": C.environment(threads), "cases": {n: C.summary(t) for n, t in times.items()},
              "table": table}
    print(f"\nwrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
