"""Issue 16: does the fast bfloat16 training path cost quality? The 80-step check of results/perf.md.

Each variant trains a prefix with ``prefixtune train`` (in this process, same data, seed and
settings: E2E, 500 training pairs, 200 dev pairs, length 10, batch 8, lr 5e-4, 80 steps, dev loss
every 40, the best prefix kept), then every prefix is scored by the **float32** model on the same
200 dev pairs: mean negative log-likelihood per target token (lower is better). Variants:

* ``float32``: everything in float32 (the reference).
* ``bf16_kernel``: the base in bfloat16, the prefixed attention through torch's bfloat16 CPU kernel
  (the path before issue 16: ``attach.CPU_FP32_BACKWARD = False``).
* ``bf16``: the base in bfloat16, the prefixed attention in float32 when gradients are on (now).
* ``bf16_compiled``: ``bf16`` with ``--compile``.

Speed is not measured here (benchmarks/precision.py does that on a quiet machine); this runs in
the background next to other work. Example:
``python benchmarks/bf16_quality.py --threads 1 --seeds 0,1``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {"float32": ("float32", True, False), "bf16_kernel": ("bfloat16", False, False),
            "bf16": ("bfloat16", True, False), "bf16_compiled": ("bfloat16", True, True)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=C.csv_strs, default=list(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", type=C.csv_ints, default=[0], help="training seeds (one run per variant and seed)")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    p.add_argument("--train-examples", type=int, default=500, help="E2E training pairs (the first N)")
    p.add_argument("--dev-examples", type=int, default=200, help="E2E dev pairs for the dev loss and the final score")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded smollm2-135m)")
    p.add_argument("--out", default="results/perf/bf16_quality.json", help="JSON output path")
    args = p.parse_args(argv)
    bad = set(args.variants) - set(VARIANTS)
    if bad:
        p.error(f"unknown --variants {sorted(bad)} (known: {', '.join(VARIANTS)})")
    C.quiet()
    C.setup_threads(args.threads)

    import torch

    import prefixtune as pt
    from prefixtune import attach
    from prefixtune.cli import main as cli
    from prefixtune.data import read_task
    from prefixtune.template import encode

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.variants:
                dtype, fp32_attention, compiled = VARIANTS[name]
                out = Path(tmp) / f"{name}-s{seed}"
                attach.CPU_FP32_BACKWARD = fp32_attention
                cli(["train", "--task", "e2e", "--model", args.model, "--dtype", dtype, "--threads", str(args.threads),
                     "--max-train-examples", str(args.train_examples), "--max-dev-examples", str(args.dev_examples),
                     "--length", "10", "--batch-size", "8", "--lr", "5e-4", "--max-steps", str(args.steps),
                     "--eval-every", str(args.steps // 2), "--seed", str(seed), "--out", str(out)]
                    + (["--compile"] if compiled else []))
                attach.CPU_FP32_BACKWARD = True
                summary = json.loads((out / "summary.json").read_text())
                runs[f"{name}/s{seed}"] = {"variant": name, "seed": seed, "prefix": pt.Prefix.load(out / "prefix.safetensors"),
                                           "train_best_dev_loss": summary["best_dev_loss"],
                                           "seconds_per_step": summary["history"][-1]["seconds_per_step"]}
        model, tok = pt.load_base_model(args.model, dtype=torch.float32)
        dev = read_task("e2e", "dev")[: args.dev_examples]
        sources, targets = [e.source for e in dev], [e.target for e in dev]
        n_tokens = sum(len(encode(model, tok, s, t).target) for s, t in zip(sources, targets))  # what score sums over
        for run in runs.values():
            logp = pt.score(model, tok, sources, targets, prefixes=run.pop("prefix"), batch_size=16)
            run["dev_nll_float32_model"] = -sum(logp) / n_tokens
    by_variant = {v: [r["dev_nll_float32_model"] for r in runs.values() if r["variant"] == v] for v in args.variants}
    summary = {v: {"mean": statistics.mean(x), "values": x} for v, x in by_variant.items()}
    for v, s in summary.items():
        print(f"{v:14s} dev NLL per target token (float32 model): {s['mean']:.4f}  {['%.4f' % x for x in s['values']]}")
    result = {"benchmark": "bf16_quality", "settings": vars(args), "environment": C.environment(args.threads),
              "runs": runs, "summary": summary}
    print(f"wrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
