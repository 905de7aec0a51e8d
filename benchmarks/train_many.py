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
    p.add_argument("--round-costs", action="store_true",
                   help="instead: time one forward+backward of the same rows_per_round rows as one round of "
                   "rows_per_round/batch_size jobs (a prefix per job), as one batch with a single prefix, and as "
                   "separate per-job steps; and the padding each layout adds")
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
    if args.round_costs:
        return round_costs(args, train, threads)
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


def round_costs(args, train, threads: int) -> dict:
    """Where a train-many round's time goes, against the same rows trained one job at a time."""
    import statistics

    import torch

    import prefixtune as pt
    from prefixtune.batch import stack_prefixes
    from prefixtune.loss import lm_forward
    from prefixtune.template import collate_train, encode, special_ids

    per_job, n_jobs = args.batch_size, args.rows_per_round // args.batch_size
    result = {"benchmark": "train_many_round_costs", "settings": {k: v for k, v in vars(args).items()},
              "environment": C.environment(threads), "dtypes": {}}
    for dtype_name in args.dtypes:
        model, tok = C.load_model(args.model, getattr(torch, dtype_name))
        pad = special_ids(tok)[2]
        tuners = []
        for i in range(n_jobs):
            torch.manual_seed(i)
            tuners.append(pt.PrefixTuner(model, pt.PrefixConfig(length=10, mlp_hidden=args.mlp_hidden)).train())
        rows = [[encode(model, tok, e.source, e.target) for e in train[i * per_job:(i + 1) * per_job]]
                for i in range(n_jobs)]
        head_dims = pt.attach.prefix_shapes(model).head_dims
        everything = collate_train(model, sum(rows, []), pad)

        def step(batch, prefix_batch):
            out = lm_forward(model, "token_mean", return_logits=False, prefix_batch=prefix_batch, **batch)
            out.nll_rows.sum().backward()

        def round_of_jobs():  # what ManyTrainer does: one batch, a prefix per job
            step(everything, stack_prefixes([(t.prefix_kv(), per_job) for t in tuners], head_dims))

        def one_prefix():  # the same rows and padding, all with one job's prefix (broadcast, no slot mask)
            step(everything, stack_prefixes([(tuners[0].prefix_kv(), per_job * n_jobs)], head_dims))

        def jobs_one_by_one():  # what sequential training does: each job's own batch
            for t, r in zip(tuners, rows):
                step(collate_train(model, r, pad), stack_prefixes([(t.prefix_kv(), per_job)], head_dims))

        times = C.interleaved({"round_of_jobs": round_of_jobs, "one_prefix": one_prefix,
                               "jobs_one_by_one": jobs_one_by_one}, repeats=args.repeats, warmup=args.warmup)
        medians = {k: statistics.median(v) for k, v in times.items()}
        real = sum(len(e.prompt) + len(e.target) for r in rows for e in r)
        slots = {"round": everything["input_ids"].numel(),
                 "one_by_one": sum(collate_train(model, r, pad)["input_ids"].numel() for r in rows)}
        result["dtypes"][dtype_name] = {
            "seconds": {k: C.summary(v) for k, v in times.items()},
            "round_over_one_by_one": medians["round_of_jobs"] / medians["jobs_one_by_one"],
            "prefix_per_job_over_one_prefix": medians["round_of_jobs"] / medians["one_prefix"],
            "padding_share": {k: 1 - real / v for k, v in slots.items()}}
        print(dtype_name, {k: round(v, 3) for k, v in medians.items()}, result["dtypes"][dtype_name]["padding_share"],
              flush=True)
        del model
    print(f"wrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
