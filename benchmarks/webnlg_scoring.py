"""Scoring a WebNLG test decoding's S / U / A columns: one ``webnlg.score`` per column (TER's edit
search runs twice per entry: in its S or U column and in A) against ``webnlg.score_columns`` (once per
entry). Both on the same outputs, in the same process, interleaved; the scores must be equal.

    python benchmarks/webnlg_scoring.py results/ledger/8ab55e22df34 --data ../shared/data

Writes results/perf/webnlg_scoring.json (CPU seconds per case, their ratio, both score tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", help="a ledger entry of a WebNLG run (results/ledger/<key>) with a test decoding")
    parser.add_argument("--data", default=None, help="data directory (default: $PREFIXTUNE_DATA or ../shared/data)")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (starts a JVM per column in both cases)")
    C.add_common_args(parser, "results/perf/webnlg_scoring.json")
    args = C.fill_defaults(parser.parse_args(argv), {"repeats": 1, "warmup": 0}, {})
    C.quiet()
    from prefixtune.data import group_references
    from prefixtune.experiments.runs import Eval, read_task, seen_categories
    from prefixtune.metrics import webnlg

    entry = Path(args.entry)
    result = json.loads((entry / "result.json").read_text())
    key, ev = next((k, e) for k, e in result["evals"].items() if e["eval"]["task"] == "webnlg")
    assert Eval(**ev["eval"]).n >= ev["n"], "a sampled evaluation: score its own items"
    outputs = (entry / ev["outputs_file"]).read_text().splitlines()
    groups = group_references(read_task("webnlg", "test", args.data))
    assert len(groups) == len(outputs), f"{len(outputs)} outputs for {len(groups)} test entries"
    refs, seen = [g.references for g in groups], seen_categories(args.data)
    columns = webnlg.columns([g.category for g in groups], seen)
    scores = {}

    def per_column():
        scores["per column"] = {c: webnlg.score([outputs[i] for i in idx], [refs[i] for i in idx], meteor=args.meteor)
                                for c, idx in columns.items()}

    def together():
        scores["columns together"] = webnlg.score_columns(outputs, refs, columns, meteor=args.meteor)

    cases = {"per column": per_column, "columns together": together}
    times = C.interleaved(cases, args.repeats, args.warmup, clock=time.process_time)
    same = scores["per column"] == scores["columns together"]
    medians = {name: C.summary(t)["median"] for name, t in times.items()}
    result = {
        "benchmark": "webnlg_scoring",
        "settings": {**vars(args), "entry": str(entry), "evaluation": key, "entries": len(outputs)},
        "environment": C.environment(1),
        "cpu_seconds": {name: C.summary(t) for name, t in times.items()},
        "ratio_together_over_per_column": C.ratio(medians["columns together"], medians["per column"]),
        "same_scores": same,
        "scores": scores,
    }
    C.print_table([{"case": n, "cpu_s": medians[n]} for n in cases], [("case", "case"), ("cpu_s", "CPU s")],
                  title=f"WebNLG scoring of {len(outputs)} outputs (S/U/A); same scores: {same}")
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    if not same:
        raise SystemExit("the two ways gave different scores")
    return result


if __name__ == "__main__":
    main()
