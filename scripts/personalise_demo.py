"""Personalisation demo (issue 14): 8 users, each with a style or task of their own drawn from the
real data in ../shared/data, trained together by `prefixtune train-many` on one frozen model,
uploaded to a `prefixtune serve` process and queried in one mixed batch; then every user's dev
set is scored with their own prefix, every other user's prefix and the base model.

Users (disjoint slices of the data; sources as prefixtune reads them):
  e2e-prose   E2E restaurant tables -> the crowd-sourced descriptions
  e2e-terse   the same kind of tables -> their values joined by " / " ("The Eagle / coffee shop / ...")
  e2e-shout   -> the descriptions in capitals
  e2e-json    -> the table as a JSON object
  webnlg      WebNLG 2017 triples -> text
  topics      DialogSum dialogues (cut to --max-source-chars) -> their topic ("job interview", ...)
  dialogsum   DialogSum dialogues (cut to --max-source-chars) -> summaries
  xsum        XSUM news articles (cut likewise) -> one-sentence summaries

Output: ``OUT/`` (the users' data, train-many's run, the server's registry and log) and, with
``--results``, ``results/personalise.md``, ``results/personalise.json`` and a heatmap
``results/personalise.png`` of the dev NLL matrix.

Example (about 30-60 minutes on 2 CPU cores): ``python scripts/personalise_demo.py --results``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USERS = ["e2e-prose", "e2e-terse", "e2e-shout", "e2e-json", "webnlg", "topics", "dialogsum", "xsum"]
KEY = "demo-key"


def fields(source: str) -> dict:
    """An E2E source as prefixtune reads it ("name : The Eagle | Type : coffee shop") -> its fields."""
    return dict(part.split(" : ", 1) for part in source.split(" | "))


def user_data(n_train: int, n_dev: int, max_chars: int) -> dict[str, tuple[list, list]]:
    from prefixtune.data import read_task

    def cut(pairs):
        return [(s[:max_chars], t) for s, t in pairs]

    def split(pairs, offset=0):
        pairs = pairs[offset : offset + n_train + n_dev]
        return pairs[:n_train], pairs[n_train:]

    e2e = [(e.source, e.target) for e in read_task("e2e", "train")]
    size = n_train + n_dev
    slices = {u: e2e[i * size * 7 : i * size * 7 + size * 7 : 7] for i, u in enumerate(USERS[:4])}  # disjoint
    styles = {
        "e2e-prose": lambda s, t: t,
        "e2e-terse": lambda s, t: " / ".join(fields(s).values()),
        "e2e-shout": lambda s, t: t.upper(),
        "e2e-json": lambda s, t: json.dumps(fields(s)),
    }
    out = {u: split([(s, styles[u](s, t)) for s, t in slices[u]]) for u in USERS[:4]}
    out["webnlg"] = split([(e.source, e.target) for e in read_task("webnlg", "train")[::11]])
    out["topics"] = split(cut([(e.source, e.category) for e in read_task("dialogsum", "train")[6::13]]))
    out["dialogsum"] = split(cut([(e.source, e.target) for e in read_task("dialogsum", "train")[::13]]))
    out["xsum"] = split(cut([(e.source, e.target) for e in read_task("xsum", "train")]))
    return out


def write_jsonl(path: Path, pairs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in pairs))


def http(url: str, method: str = "GET", body: bytes | None = None, content_type: str = "application/json") -> dict:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def serve_and_query(args, out: Path, users: list[str], data: dict) -> dict:
    """Start `prefixtune serve`, upload the 8 prefixes, send one request per user at once (decoded
    together in one running batch); returns each user's source and output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "w")
    cmd = [sys.executable, "-m", "prefixtune.cli", "serve", "--model", args.model, "--registry", str(out / "registry"),
           "--port", str(port), "--dtype", args.dtype, "--max-input-tokens", "1024", "--no-train"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PREFIXTUNE_API_KEYS": f"{KEY}:demo"})
    try:
        for _ in range(600):
            try:
                http(url + "/healthz")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited; see {log.name}")
                time.sleep(0.5)
        for u in users:
            http(f"{url}/v1/prefixes/{u}", "PUT", (out / "run" / "jobs" / u / "prefix.safetensors").read_bytes(),
                 "application/octet-stream")

        def ask(u):
            source = data[u][1][0][0]
            r = http(f"{url}/v1/generate", "POST", json.dumps({"prefix": u, "inputs": [source],
                                                                "max_new_tokens": args.max_new_tokens}).encode())
            return {"source": source, "output": r["outputs"][0]}

        with ThreadPoolExecutor(len(users)) as pool:  # all at once: one running batch of 8 prefixes
            answers = dict(zip(users, pool.map(ask, users)))
        with urllib.request.urlopen(url + "/metrics") as r:
            metrics = r.read().decode()
        most = max((float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("prefixtune_batch_prefixes_max")), default=None)
        return {"answers": answers, "most_prefixes_in_one_step": most}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()


def score_matrix(args, out: Path, users: list[str], data: dict) -> dict:
    """Mean NLL per target token of each user's dev set under each user's prefix and the base model."""
    import torch

    import prefixtune as pt
    from prefixtune.template import encode

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = pt.load_base_model(args.model, dtype=getattr(torch, args.dtype))
    prefixes = {u: pt.Prefix.load(out / "run" / "jobs" / u / "prefix.safetensors") for u in users}
    matrix = {}
    for data_user in users:
        dev = data[data_user][1]
        tokens = sum(len(encode(model, tok, s, t).target) for s, t in dev)
        sources, targets = [s for s, _ in dev], [t for _, t in dev]
        matrix[data_user] = {}
        for prefix_user in [*users, "base"]:
            lp = pt.score(model, tok, sources, targets, prefixes=None if prefix_user == "base" else prefixes[prefix_user])
            matrix[data_user][prefix_user] = -sum(lp) / tokens
        print(f"  {data_user:10s} " + " ".join(f"{matrix[data_user][p]:6.2f}" for p in [*users, "base"]), flush=True)
    return matrix


def training_seconds(run: Path, users: list[str]) -> float:
    """The time train-many's rounds took, from each job's log (its share of every round's time), so
    a resumed run counts the time of the first one too."""
    total = 0.0
    for u in users:
        last = 0
        for entry in map(json.loads, (run / "jobs" / u / "log.jsonl").read_text().splitlines()):
            if entry.get("seconds_per_step") is not None:
                total += entry["seconds_per_step"] * (entry["step"] - last)
            last = entry["step"]
    return total


def report(args, result: dict, users: list[str]) -> str:
    m = result["matrix"]
    lines = ["# Personalisation demo: 8 users' prefixes, trained together, served together", "",
             "```bash", "python scripts/personalise_demo.py --results" + (f" --threads {args.threads}" if args.threads else "")
             + "   # then --report-only --results rewrites this page from runs/personalise-demo/personalise.json", "```", "",
             f"Base model {args.model} ({args.dtype}); {args.n_train} training and {args.n_dev} dev pairs per user; "
             f"one `prefixtune train-many` run: prefix length {args.length}, MLP 512, lr {args.lr}, "
             f"{args.steps} steps of batch {args.batch_size} per user, {args.rows_per_round} rows per round "
             f"(its rounds took {result['train_seconds']:.0f} s of {args.threads or 'all'} CPU thread(s) in all, from the "
             "jobs' logs). Users: see `scripts/personalise_demo.py`. One run (one seed per user), 40 dev pairs per "
             "user: margins of a few hundredths of a nat would be noise; those below are 0.8 nats or more.", "",
             "## Dev NLL per target token (lower is better): rows = whose dev data, columns = whose prefix", "",
             "| data \\ prefix | " + " | ".join(users) + " | base |", "|---|" + "---:|" * (len(users) + 1)]
    for d in users:
        best = min(users, key=lambda p: m[d][p])
        lines.append(f"| {d} | " + " | ".join((f"**{m[d][p]:.2f}**" if p == best else f"{m[d][p]:.2f}")
                                             for p in users) + f" | {m[d]['base']:.2f} |")
    own_best = [d for d in users if min(users, key=lambda p: m[d][p]) == d]
    margins = {d: min(m[d][p] for p in users if p != d) - m[d][d] for d in users}
    lines += ["", f"Each user's own prefix is best on their dev data for **{len(own_best)} of {len(users)}** users"
              + ("" if len(own_best) == len(users) else f" (not: {', '.join(u for u in users if u not in own_best)})")
              + "; margin over the next best prefix (nats per token): "
              + ", ".join(f"{d} {margins[d]:.2f}" for d in users) + ". Every own prefix vs the base model: "
              + ", ".join(f"{d} {m[d]['base'] - m[d][d]:.2f}" for d in users) + " nats per token better.", "",
              "![dev NLL matrix](personalise.png)", "",
              "## One mixed batch through `prefixtune serve`", "",
              f"The 8 prefixes uploaded to one server; one request per user sent at once (continuous batching "
              f"decoded them together: at most {result['served']['most_prefixes_in_one_step']} distinct prefixes "
              "in one decoding step, from `/metrics`). Each user's first dev source, greedy:", "",
              "| user | output |", "|---|---|"]
    for u in users:
        lines.append(f"| {u} | {result['served']['answers'][u]['output'].replace('|', '/')[:160]} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, users: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["matrix"]
    cols = [*users, "base"]
    grid = [[m[d][p] for p in cols] for d in users]
    fig, ax = plt.subplots(figsize=(9, 6))
    im = ax.imshow(grid, cmap="viridis_r")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(users)), users)
    ax.set_xlabel("prefix of user")
    ax.set_ylabel("dev data of user")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v > sum(map(sum, grid)) / 72 else "black",
                    fontsize=8)
    fig.colorbar(im, label="dev NLL per target token")
    ax.set_title("Each user's dev data under every user's prefix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model (embedded SmolLM2, or any HF id / directory)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="base model dtype")
    p.add_argument("--out", default="runs/personalise-demo", help="working directory")
    p.add_argument("--n-train", type=int, default=120, help="training pairs per user")
    p.add_argument("--n-dev", type=int, default=40, help="dev pairs per user")
    p.add_argument("--max-source-chars", type=int, default=800, help="summarization sources are cut to this")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per user")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--length", type=int, default=10)
    p.add_argument("--rows-per-round", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=40, help="the served answers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (training, serving, scoring)")
    p.add_argument("--results", action="store_true", help="write results/personalise.{md,json,png}")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/personalise.json")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.report_only:
        result = json.loads((out / "personalise.json").read_text())
        result["train_seconds"] = training_seconds(out / "run", USERS)
        return write_results(argparse.Namespace(**{**result["settings"], "results": args.results}), out, result)
    data = user_data(args.n_train, args.n_dev, args.max_source_chars)
    jobs = []
    for u in USERS:
        write_jsonl(out / "users" / u / "train.jsonl", data[u][0])
        write_jsonl(out / "users" / u / "dev.jsonl", data[u][1])
        jobs.append({"name": u, "train": f"users/{u}/train.jsonl", "dev": f"users/{u}/dev.jsonl"})
    (out / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))

    print(f"1/3 training {len(USERS)} prefixes together (prefixtune train-many) ...", flush=True)
    cmd = [sys.executable, "-m", "prefixtune.cli", "train-many", "--model", args.model, "--dtype", args.dtype,
           "--jobs", str(out / "jobs.jsonl"), "--out", str(out / "run"), "--rows-per-round", str(args.rows_per_round),
           "--length", str(args.length), "--lr", str(args.lr), "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--eval-every", str(max(1, args.steps // 4)), "--bucket", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    result = {"train_seconds": training_seconds(out / "run", USERS), "settings": vars(args)}
    print("2/3 serving them: one request per user, all at once ...", flush=True)
    result["served"] = serve_and_query(args, out, USERS, data)
    for u, a in result["served"]["answers"].items():
        print(f"  {u:10s} {a['output'][:100]!r}")
    print("3/3 dev NLL per target token: rows = whose data, columns = whose prefix (then base)", flush=True)
    result["matrix"] = score_matrix(args, out, USERS, data)
    return write_results(args, out, result)


def write_results(args, out: Path, result: dict) -> dict:
    text = report(args, result, USERS)
    print(text)
    (out / "personalise.json").write_text(json.dumps(result, indent=1))
    if args.results:
        (ROOT / "results" / "personalise.json").write_text(json.dumps(result, indent=1))
        (ROOT / "results" / "personalise.md").write_text(text)
        plot(result, USERS, ROOT / "results" / "personalise.png")
        print("wrote results/personalise.md, .json, .png")
    return result


if __name__ == "__main__":
    main()
