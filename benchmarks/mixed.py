"""Benchmark 3 of issue 6: one batch with many prefixes vs one prefix vs one call per row.

What is measured, on ``--rows`` (default 16) unique E2E test sources (reader order) with their
first reference as target, through the public API only (``prefixtune.score`` and
``prefixtune.generate``, ``batch_size=rows`` so each call is one batch):

* ``mixed``: one call, every row with its own prefix (``prefixes=[p_1, ..., p_16]``).
* ``single``: one call, every row with the same prefix (``prefixes=p``), whose length is the
  longest of the mixed set: the mixed batch pads every row's prefix to that length, so both run
  the same attention FLOPs. This is the physical floor for ``mixed``.
* ``sequential``: ``rows`` calls of one row each, row i with p_i.
* ``none``: one call without any prefix (context only).

Two prefix sets ("scenarios"): ``lengths`` = distinct lengths (default 5, 6, ..., 20) and
``equal`` = all ``--equal-length`` (default 10); every prefix is a distinct random-init
``PrefixTuner(...).export()`` (speed does not depend on what a prefix learned).

Two operations: ``score`` (log p(target | source, prefix), one forward pass) and ``generate``
(greedy; with ``--stop fixed``, the default, ``min_new_tokens = max_new_tokens`` so every row
produces exactly ``max_new_tokens`` tokens and all cases do the same number of decoding steps).

Timing: warm-up, interleaved rounds (every case once per round, order rotated), median seconds
per case. Ratios of medians, same process: mixed/single and mixed/sequential (time; lower is
better), and mixed throughput relative to single (= single time / mixed time; issue 6's target is
>= 0.9). Outside timing, the mixed batch's results are compared with the one-row calls (score:
max |difference|; generate: fraction of identical texts) as a sanity check.

Example (full settings): ``python benchmarks/mixed.py --threads 2``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="A batch with a different prefix per row vs the same batch with one prefix (same FLOPs) vs one "
        "call per row, for scoring and greedy generation.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=None, help="rows (= distinct prefixes) per batch (default 16, --quick 4)")
    p.add_argument("--lengths", type=C.csv_ints, default=None,
                   help="prefix lengths of the 'lengths' scenario, cycled over rows (default 5,6,...,20; --quick 5,6,7,8)")
    p.add_argument("--equal-length", type=int, default=10, help="prefix length of the 'equal' scenario (default 10)")
    p.add_argument("--scenarios", type=C.csv_strs, default=["lengths", "equal"], help="lengths,equal (default both)")
    p.add_argument("--ops", type=C.csv_strs, default=["score", "generate"], help="score,generate (default both)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy generation length (default 60, --quick 4)")
    p.add_argument("--stop", choices=["fixed", "eos"], default="fixed",
                   help="fixed: every row generates exactly max_new_tokens (default); eos: EOS ends rows")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base model dtype")
    C.add_common_args(p, "results/perf/mixed.json")
    args = p.parse_args(argv)
    C.fill_defaults(
        args,
        normal=dict(rows=16, lengths=list(range(5, 21)), max_new_tokens=60, repeats=3, warmup=1),
        quick=dict(rows=4, lengths=[5, 6, 7, 8], max_new_tokens=4, repeats=2, warmup=1),
    )
    if set(args.scenarios) - {"lengths", "equal"} or set(args.ops) - {"score", "generate"}:
        p.error("--scenarios takes lengths,equal and --ops takes score,generate")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.quiet()
    threads = C.setup_threads(args.threads)
    load_start = os.getloadavg()
    import torch

    import prefixtune
    from prefixtune.data import read_task
    from prefixtune.template import special_ids

    t0 = time.perf_counter()
    model, tok = C.load_model(args.model, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    _, eos, pad = special_ids(tok)
    seen, sources, targets = set(), [], []
    for e in read_task("e2e", "test"):
        if e.source not in seen:
            seen.add(e.source)
            sources.append(e.source)
            targets.append(e.target)
    sources, targets = sources[: args.rows], targets[: args.rows]
    n = len(sources)

    scen_lengths = {}
    if "lengths" in args.scenarios:
        scen_lengths["lengths"] = [args.lengths[i % len(args.lengths)] for i in range(n)]
    if "equal" in args.scenarios:
        scen_lengths["equal"] = [args.equal_length] * n
    prefix_sets, floors = {}, {}
    for scen, lengths in scen_lengths.items():
        ps = []
        for i, length in enumerate(lengths):
            torch.manual_seed(args.seed + 1000 * i + length)
            ps.append(prefixtune.PrefixTuner(model, prefixtune.PrefixConfig(length=length)).export())
        prefix_sets[scen] = ps
        floors[scen] = max(ps, key=lambda p: p.length)  # same padded attention width as the mixed batch
    model.eval()
    print(f"mixed: {n} rows, prefixes ready in {time.perf_counter() - t0:.1f}s; {threads} threads", flush=True)

    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.stop == "fixed":
        gen_kw["min_new_tokens"] = args.max_new_tokens

    def call(op, srcs, tgts, prefixes):
        if op == "score":
            return prefixtune.score(model, tok, srcs, tgts, prefixes=prefixes, batch_size=n)
        return prefixtune.generate(model, tok, srcs, prefixes=prefixes, batch_size=n, **gen_kw)

    cases = {}
    for op in args.ops:
        cases[f"{op}/none"] = lambda op=op: call(op, sources, targets, None)
        for scen in scen_lengths:
            ps = prefix_sets[scen]
            cases[f"{op}/{scen}/mixed"] = lambda op=op, ps=ps: call(op, sources, targets, ps)
            cases[f"{op}/{scen}/single"] = lambda op=op, scen=scen: call(op, sources, targets, floors[scen])
            cases[f"{op}/{scen}/sequential"] = lambda op=op, ps=ps: [
                call(op, [s], [t], [p]) for s, t, p in zip(sources, targets, ps)
            ]
    times = C.interleaved(cases, args.repeats, args.warmup)

    # sanity (outside timing): the mixed batch gives what each row gives alone
    checks = {}
    for op in args.ops:
        for scen, ps in prefix_sets.items():
            mixed = call(op, sources, targets, ps)
            alone = [call(op, [s], [t], [p])[0] for s, t, p in zip(sources, targets, ps)]
            if op == "score":
                checks[f"{op}/{scen}"] = {"max_abs_diff_mixed_vs_alone": max(abs(a - b) for a, b in zip(mixed, alone))}
            else:
                checks[f"{op}/{scen}"] = {"identical_text_fraction": sum(a == b for a, b in zip(mixed, alone)) / n}

    results = {name: {"seconds": C.summary(times[name])} for name in cases}

    def med(name):
        return results[name]["seconds"]["median"] if name in results else None

    ratios = []
    for op in args.ops:
        for scen in scen_lengths:
            m, s, q = (f"{op}/{scen}/{k}" for k in ("mixed", "single", "sequential"))
            ratios.append({
                "op": op, "scenario": scen,
                "prefix_lengths": sorted(set(scen_lengths[scen])),
                "floor_length": floors[scen].length,
                "mixed_over_single": C.ratio(med(m), med(s)),
                "mixed_over_sequential": C.ratio(med(m), med(q)),
                "mixed_throughput_over_single": C.ratio(med(s), med(m)),
                "paired_mixed_over_single": C.paired_ratio(times[m], times[s]),
                "paired_mixed_over_sequential": C.paired_ratio(times[m], times[q]),
                "single_over_none": C.ratio(med(s), med(f"{op}/none")),
                "check": checks.get(f"{op}/{scen}"),
            })

    print()
    rows = [{"case": k, "median": v["seconds"]["median"], "min": v["seconds"]["min"], "max": v["seconds"]["max"],
             "per_row": v["seconds"]["median"] / n} for k, v in results.items()]
    stop = f"greedy, exactly {args.max_new_tokens} new tokens per row" if args.stop == "fixed" else \
        f"greedy, up to {args.max_new_tokens} new tokens (EOS ends rows)"
    table = C.print_table(rows, [("case", "case"), ("median", "median s"), ("min", "min"), ("max", "max"),
                                 ("per_row", "s per row")],
                          title=f"{n} rows per batch; generate: {stop}; {threads} threads, median of {args.repeats}")
    print()
    rrows = []
    for r in ratios:
        chk = r["check"] or {}
        lo, hi = min(r["prefix_lengths"]), max(r["prefix_lengths"])
        rrows.append({**r, "lengths": f"{lo}..{hi}" if lo != hi else str(lo),
                      "sanity": chk.get("max_abs_diff_mixed_vs_alone", chk.get("identical_text_fraction"))})
    table += "\n\n" + C.print_table(rrows, [
        ("op", "op"), ("scenario", "scenario"), ("lengths", "lengths"), ("mixed_over_single", "mixed/single"),
        ("mixed_over_sequential", "mixed/sequential"), ("mixed_throughput_over_single", "throughput mixed/single"),
        ("single_over_none", "single/none"), ("sanity", "mixed vs alone (score: max|diff|, gen: same text)"),
    ], title="time ratios (of medians); issue 6 target: throughput mixed/single >= 0.9")

    result = {
        "benchmark": "mixed",
        "settings": vars(args),
        "environment": {**C.environment(threads), "load_average_start": load_start},
        "n_rows": n,
        "scenarios": {s: {"lengths": l, "floor_length": floors[s].length} for s, l in scen_lengths.items()},
        "cases": results,
        "ratios": ratios,
        "table": table,
    }
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
