"""Issue 14: K users' prefixes trained together (train-many) vs one after another, in one process.

For each K of ``--jobs`` and each base dtype of ``--dtypes``: K jobs, each a user with its own
``--pairs`` E2E training pairs (disjoint slices of E2E train), its own prefix (length 10, MLP
``--mlp-hidden``) and seed, ``--steps`` optimizer steps of ``--batch-size`` rows, no dev set:

* ``sequential``: each job trained alone by ``Trainer.fit`` (what running ``prefixtune train`` K times
  in one process does), one after another;
* ``together``: all K by ``ManyTrainer`` (``prefixtune train-many``), ``--rows-per-round`` rows per
  forward/backward (``rows_per_round / batch_size`` jobs per round).

Both write every job's run directory (checkpoint, prefix) to a temporary directory, as the CLI
does. Reported: seconds, jobs finished per hour, the ratio together / sequential (same process,
the two cases alternating), and the peak resident memory each case added (the base model excluded;
``_common.measure_peak``). The per-job state (P', MLP, AdamW moments: 4 x 6.2M parameters at MLP
width 512 on SmolLM2) is held for every job at once by ``together``, for one job at a time by
``sequential``.

Example: ``python benchmarks/train_many.py --threads 2``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=C.csv_ints, default=None, help="numbers of jobs K (default 1,4,16,64; --quick 1,4)")
    p.add_argument("--dtypes", type=C.csv_strs, default=["float32", "bfloat16"], help="base model dtypes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per job step")
    p.add_argument("--pairs", type=int, default=16, help="training pairs per job")
    p.add_argument("--rows-per-round", type=int, default=32, help="together: rows per forward/backward")
    p.add_argument("--mlp-hidden", type=int, default=512, help="width of each prefix's reparameterisation MLP")
    C.add_common_args(p, "results/perf/train_many.json")
    args = p.parse_args(argv)
    C.fill_defaults(args, normal=dict(jobs=[1, 4, 16, 64], steps=2, repeats=1, warmup=0),
                    quick=dict(jobs=[1, 4], steps=1, repeats=1, warmup=0))
    C.quiet()
    threads = C.setup_threads(args.threads)

    import torch

    import prefixtune as pt
    from prefixtune.data import read_task
    from prefixtune.train import TrainConfig, Trainer
    from prefixtune.train_many import Job, ManyTrainer

    train = read_task("e2e", "train")
    rows_out, cases = [], {}
    for dtype_name in args.dtypes:
        model, tok = C.load_model(args.model, getattr(torch, dtype_name))
        for k in args.jobs:
            jobs = [Job(f"u{i}", train[i * args.pairs:(i + 1) * args.pairs], None,
                        pt.PrefixConfig(length=10, mlp_hidden=args.mlp_hidden),
                        TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=5e-4, eval_every=args.steps,
                                    seed=i)) for i in range(k)]

            def sequential(jobs=jobs, model=model, tok=tok):
                out = Path(tempfile.mkdtemp())
                for j in jobs:
                    Trainer(model, tok, j.train, None, j.prefix, j.train_config, out / j.name, progress=False).fit()
                shutil.rmtree(out)

            def together(jobs=jobs, model=model, tok=tok):
                out = Path(tempfile.mkdtemp())
                ManyTrainer(model, tok, jobs, out, rows_per_round=args.rows_per_round, progress=False).fit()
                shutil.rmtree(out)

            seconds = {}
            for name, fn in ((("sequential", sequential), ("together", together)) if k % 2 else
                             (("together", together), ("sequential", sequential))):
                start = time.perf_counter()
                memory = C.measure_peak(fn)
                seconds[name] = time.perf_counter() - start
                case = f"{dtype_name}/K{k}/{name}"
                cases[case] = {"seconds": seconds[name], "jobs_per_hour": 3600 * k / seconds[name], **memory}
                print(f"  {case}: {seconds[name]:.1f} s, {cases[case]['jobs_per_hour']:.0f} jobs/h, "
                      f"+{memory['peak_growth_mb']:.0f} MB", flush=True)
            for name in ("sequential", "together"):
                c = cases[f"{dtype_name}/K{k}/{name}"]
                rows_out.append({"case": f"{dtype_name}/K{k}/{name}", "seconds": c["seconds"],
                                 "jobs_per_hour": c["jobs_per_hour"], "memory": c["peak_growth_mb"],
                                 "speedup": seconds["sequential"] / seconds[name]})
        del model
    table = C.print_table(rows_out, [("case", "case"), ("seconds", "seconds"), ("jobs_per_hour", "jobs/h"),
                                     ("memory", "peak MB added"), ("speedup", "x sequential speed")],
                          title=f"train-many vs one after another: {args.steps} steps of {args.batch_size} rows per job, "
                          f"{args.rows_per_round} rows per round, {threads} threads")
    result = {"benchmark": "train_many", "settings": {k: v for k, v in vars(args).items() if k != "memory_case"},
              "environment": C.environment(threads), "cases": cases, "table": table}
    print(f"\nwrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
