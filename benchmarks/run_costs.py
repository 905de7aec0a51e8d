"""What a grid run of each kind costs per unit, for planning the findings grid before any such run has finished.

What is measured, per case ``TASK:METHOD`` (``--cases``): the grid's own code path
(``prefixtune/experiments/runs.py``, the default protocol's run of that kind: WebNLG on its 2,000-pair
subset, XSUM trained on news, DialogSum on 1,000 dialogues, summarization sources cut to 192 tokens)
cut short: ``--steps`` training steps, one evaluation at the end (dev loss; table-to-text also dev BLEU
on ``--dev-items`` dev inputs, decoded as the test set is), then the test decoding of ``--test-items``
test inputs. ``METHOD`` is a grid method (``prefix``, ``finetune``, ``adapter-3``...) or ``prefix-L200``.

Reported, in CPU seconds of this process (one thread by default, as the grid runs): per training step,
for the evaluation, per test input decoded, and the output tokens per test input. After so few steps
outputs tend to run longer than a trained run's, so the decoding costs are upper bounds. A run's cost is
then about steps x step + evaluations x (dev inputs x dev cost + dev loss) + test inputs x test cost,
where steps and evaluations depend on when the run stops (README, 'Cost').

Example: ``python benchmarks/run_costs.py --cases webnlg:prefix,webnlg:finetune,xsum:prefix``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CASES = ("webnlg:prefix", "webnlg:finetune", "webnlg:adapter-3", "xsum:prefix", "xsum:prefix-L200", "xsum:finetune",
         "dialogsum:prefix", "dialogsum:finetune")


def grid_run(scale, case: str, steps: int, dev_items: int, test_items: int):
    """The grid's run of kind ``case``, cut to ``steps`` steps and one evaluation, with a small test sample."""
    from prefixtune.experiments import METHODS, split_name

    task, name = case.split(":")
    method, length = (name.split("-L")[0], int(name.split("-L")[1])) if "-L" in name else (name, None)
    if split_name(method)[0] not in METHODS:
        raise ValueError(f"unknown method {method!r} in {case!r}; methods: {', '.join(METHODS)}")
    summary = task in ("xsum", "dialogsum")
    kw = {"webnlg": dict(train_examples=scale.webnlg_train_examples), "e2e": dict(train_examples=scale.train_size),
          "xsum": dict(train_topic="news"), "dialogsum": dict(train_examples=scale.dialogsum_train_examples)}[task]
    run = scale.run(task, method, summary=summary, evals=(scale.eval(task, summary=summary, n=test_items),), **kw)
    if length:
        run = replace(run, length=length)
    return replace(run, max_epochs=1e-6, min_steps=steps, min_eval_steps=steps, eval_epochs=1e6,
                   dev_score_examples=dev_items, dev_examples=dev_items)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=C.csv_strs, default=list(CASES), help=f"TASK:METHOD, comma-separated (default {','.join(CASES)})")
    p.add_argument("--steps", type=int, default=20, help="training steps per case (default 20)")
    p.add_argument("--dev-items", type=int, default=24, help="dev inputs of the evaluation (default 24)")
    p.add_argument("--test-items", type=int, default=24, help="test inputs decoded (default 24)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the grid runs)")
    p.add_argument("--data", default=None, help="data directory (default: $PREFIXTUNE_DATA, else ../shared/data)")
    p.add_argument("--out", default="results/perf/run_costs.json", help="JSON output path")
    args = p.parse_args(argv)
    C.quiet()
    threads = C.setup_threads(args.threads)
    from prefixtune.experiments import Scale
    from prefixtune.experiments import runs as R

    scale = Scale(lr={"prefix": 1e-4, "finetune": 1e-5, "adapter-3": 1e-4})  # any rate: costs do not depend on it
    try:
        cases = {c: grid_run(scale, c, args.steps, args.dev_items, args.test_items) for c in args.cases}
    except (ValueError, KeyError) as e:
        p.error(f"--cases: {e} (each TASK:METHOD, with TASK one of e2e, webnlg, xsum, dialogsum)")
    results = {}
    for case, run in cases.items():
        out = Path(tempfile.mkdtemp(prefix="run_costs-"))
        train = R.train(run, out / "run", args.data, threads)
        cpu = time.process_time()
        ev = next(iter(R.evaluate(run, list(run.evals), out / "run", out / "ledger", args.data, threads).values()))
        last = train["dev_curve"][-1]
        results[case] = {
            "run": run.label(), "steps": train["steps"], "cpu_s_per_step": last["cpu_seconds_per_step"],
            "eval_cpu_s": last["eval_cpu_seconds"], "dev_items": args.dev_items if run.select == "dev_bleu" else 0,
            "test_items": ev["n"], "test_cpu_s_per_item": ev["decode_cpu_seconds"] / ev["n"],
            "test_tokens_per_item": ev["output_tokens"] / ev["n"], "evaluate_cpu_s": time.process_time() - cpu}
        print(f"{case:20} {results[case]['cpu_s_per_step']:.2f} CPU-s/step  eval {last['eval_cpu_seconds']:.1f} CPU-s  "
              f"test {results[case]['test_cpu_s_per_item']:.2f} CPU-s/item ({results[case]['test_tokens_per_item']:.0f} tokens)",
              flush=True)
    data = {"settings": vars(args), "environment": C.environment(threads), "cases": results}
    C.write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
