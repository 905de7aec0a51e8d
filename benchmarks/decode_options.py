"""Decoding options for the experiments' test sets (issue 11): is a wider batch or a bfloat16 base
harmless? Decodes the first N E2E test tables with a trained prefix (the paper's decoding: beam 5, at
most 80 new tokens) three ways: float32 batch 16 (the reference), float32 batch 48, bfloat16 base
batch 16; reports CPU seconds (process time, robust to other load on the machine), BLEU and how
many outputs are identical to the reference.

Example: ``python benchmarks/decode_options.py runs/experiments/<run>/prefix.safetensors --tables 48 --threads 1``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CASES = (("float32-batch16", "float32", 16), ("float32-batch48", "float32", 48), ("bfloat16-batch16", "bfloat16", 16))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="a trained E2E prefix (.safetensors)")
    p.add_argument("--tables", type=int, default=48, help="E2E test tables decoded per case")
    C.add_common_args(p, "results/perf/decode_options.json")
    args = p.parse_args(argv)
    C.quiet()
    threads = C.setup_threads(args.threads)
    import torch

    import prefixtune as pt
    from prefixtune.data import DECODING, group_references, read_task
    from prefixtune.experiments.runs import corpus_bleu

    groups = group_references(read_task("e2e", "test"))[: args.tables]
    sources, refs = [g.source for g in groups], [g.references for g in groups]
    prefix = pt.Prefix.load(args.prefix)
    cases = {}
    for name, dtype, batch in CASES:
        model, tok = C.load_model(args.model, getattr(torch, dtype))
        wall, cpu = time.perf_counter(), time.process_time()
        out = pt.generate(model, tok, sources, prefixes=prefix, batch_size=batch, **DECODING["e2e"])
        cases[name] = {"cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall,
                       "bleu": corpus_bleu("e2e", out, refs), "outputs": out}
    ref = cases["float32-batch16"]
    rows = []
    for name, c in cases.items():
        c["identical_to_reference"] = sum(a == b for a, b in zip(ref["outputs"], c["outputs"]))
        c["cpu_ratio"] = c["cpu_seconds"] / ref["cpu_seconds"]
        rows.append({"case": name, "cpu": c["cpu_seconds"], "ratio": c["cpu_ratio"], "bleu": c["bleu"],
                     "same": f"{c['identical_to_reference']}/{len(sources)}"})
    table = C.print_table(rows, [("case", "case"), ("cpu", "CPU s"), ("ratio", "vs float32-16"), ("bleu", "BLEU"),
                                 ("same", "identical outputs")], title=f"E2E beam 5, {len(sources)} tables, {threads} thread(s)")
    C.write_json(args.out, {"benchmark": "decode_options", "settings": vars(args), "environment": C.environment(threads),
                            "cases": cases, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
