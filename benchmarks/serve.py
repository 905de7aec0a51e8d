"""Issue 5 benchmark: throughput and latency of `prefixtune serve` with K distinct prefixes under
concurrent load, mixed-prefix batching vs one-prefix-at-a-time batching, in one run.

For each K in ``--ks`` (default 1, 4, 16) and each batching mode (``mixed``: a batch holds
requests for any prefixes; ``single-prefix``: a batch only ever holds one prefix's requests, what
single-active-adapter serving does), a fresh server process is started on 127.0.0.1 with the
embedded SmolLM2, K random prefixes are uploaded, and ``--clients`` threads send
``--requests`` generate requests in total (one input each, prefixes assigned round-robin, E2E
test sources, greedy, ``--max-new-tokens``). Client-side latency of every request (p50, p95) and
throughput (requests/s and generated tokens/s, tokens counted with the model's tokenizer) over the
wall time from the first send to the last answer.

Goals (issue 5): mixed batching keeps >= 90% of its K=1 throughput at K=16, and beats
single-prefix batching at K=16 by >= 4x.

Example: ``python benchmarks/serve.py --threads 2``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KEY = "benchmark-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(method: str, url: str, body: bytes | None = None, content_type: str = "application/json", timeout=600):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


class Server:
    """A `prefixtune serve` subprocess on a free local port, with its own registry directory."""

    def __init__(self, args, batching: str, registry: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "prefixtune.cli", "serve", "--model", args.model, "--registry", str(registry),
               "--host", "127.0.0.1", "--port", str(self.port), "--batching", batching,
               "--max-batch-rows", str(args.max_batch_rows), "--batch-wait-ms", str(args.batch_wait_ms)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PREFIXTUNE_API_KEYS": f"{KEY}:bench"}
        self.log = open(registry.parent / f"server-{batching}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError("server did not become healthy in 300 s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_load(server: Server, names: list[str], sources: list[str], n: int, args) -> dict:
    """``n`` requests from ``args.clients`` threads, prefixes round-robin."""
    jobs = [(names[i % len(names)], sources[i % len(sources)]) for i in range(n)]

    def one(job):
        name, source = job
        body = json.dumps({"prefix": name, "inputs": [source], "max_new_tokens": args.max_new_tokens,
                           "num_beams": 1}).encode()
        t0 = time.perf_counter()
        status, data = _request("POST", server.url + "/v1/generate", body)
        return time.perf_counter() - t0, json.loads(data)["outputs"][0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": [r[0] for r in results], "outputs": [r[1] for r in results]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=C.csv_ints, default=[1, 4, 16], help="numbers of distinct prefixes")
    p.add_argument("--requests", type=int, default=128, help="requests per (K, mode) run")
    p.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request (greedy)")
    p.add_argument("--length", type=int, default=10, help="prefix length of the K prefixes")
    p.add_argument("--max-batch-rows", type=int, default=32, help="server --max-batch-rows")
    p.add_argument("--batch-wait-ms", type=int, default=50, help="server --batch-wait-ms")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--model", default="smollm2-135m", help="base model served")
    p.add_argument("--out", default="results/perf/serve.json", help="JSON output path")
    args = p.parse_args(argv)
    C.quiet()

    import torch

    import prefixtune as pt
    from prefixtune.data import group_references, read_task

    model, tok = pt.load_base_model(args.model)
    sources = [e.source for e in group_references(read_task("e2e", "test"))][: args.requests]
    work = Path(tempfile.mkdtemp(prefix="prefixtune-serve-bench-"))
    files = []
    for k in range(max(args.ks)):  # random prefixes of the real model: speed does not depend on training
        torch.manual_seed(k)
        path = work / f"p{k}.safetensors"
        pt.PrefixTuner(model, pt.PrefixConfig(length=args.length)).export().save(path)
        files.append(path)

    runs = []
    for mode in ("mixed", "single-prefix"):
        for k in args.ks:
            registry = work / f"registry-{mode}-{k}"
            registry.mkdir()
            server = Server(args, mode, registry)
            try:
                names = [f"p{i}" for i in range(k)]
                for name, path in zip(names, files):
                    _request("PUT", f"{server.url}/v1/prefixes/{name}", path.read_bytes(), "application/octet-stream")
                run_load(server, names, sources, args.clients, args)  # warm-up
                r = run_load(server, names, sources, args.requests, args)
            finally:
                server.close()
            tokens = sum(len(tok(o, add_special_tokens=False).input_ids) for o in r["outputs"])
            lat = sorted(r["latencies"])
            row = {"mode": mode, "k": k, "requests": args.requests, "wall_s": r["wall_s"],
                   "requests_per_s": args.requests / r["wall_s"], "tokens": tokens, "tokens_per_s": tokens / r["wall_s"],
                   "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
                   "latencies": r["latencies"]}
            runs.append(row)
            print(f"  {mode:13s} K={k:2d}: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s, "
                  f"p50 {row['p50_s']:.2f}s p95 {row['p95_s']:.2f}s", flush=True)

    def get(mode, k, key):
        return next((r[key] for r in runs if r["mode"] == mode and r["k"] == k), None)

    ratios = {}
    kmax = max(args.ks)
    for key in ("requests_per_s", "tokens_per_s"):
        ratios[f"mixed_K{kmax}_over_mixed_K1_{key}"] = C.ratio(get("mixed", kmax, key), get("mixed", 1, key))
        ratios[f"mixed_over_single_prefix_K{kmax}_{key}"] = C.ratio(get("mixed", kmax, key), get("single-prefix", kmax, key))
    table = C.print_table(runs, [("mode", "batching"), ("k", "K"), ("requests_per_s", "req/s"),
                                 ("tokens_per_s", "tok/s"), ("p50_s", "p50 s"), ("p95_s", "p95 s"), ("wall_s", "wall s")],
                          title=f"{args.requests} requests, {args.clients} clients, {args.max_new_tokens} new tokens, greedy")
    print(json.dumps(ratios, indent=2))
    result = {"benchmark": "serve", "settings": vars(args), "environment": C.environment(args.threads or torch.get_num_threads()),
              "runs": runs, "ratios": ratios, "table": table}
    print(f"wrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
