"""Issue 13 benchmark: `prefixtune serve` under an open-loop load, continuous vs dynamic batching,
with K distinct prefixes, the base model alone, and transformers' own continuous batching.

Load. For each offered rate in ``--rates`` (requests/s), ``--requests`` requests arrive at
exponentially distributed gaps (a Poisson process, seeded): each is one E2E test source (or an
XSUM document cut to ``--max-prompt-tokens``, ``--task xsum``), greedy, with ``max_tokens``
uniform in ``[--min-new, --max-new]`` and a prefix drawn uniformly from K. Clients do not wait
for each other (open loop): each request is sent at its arrival time from its own thread, as a
streaming ``POST /v1/completions`` (``stream_options.include_usage``). Every system sees the same
arrivals, prompts and lengths. Every completion has exactly its ``max_tokens``: EOS does not end
it (``ignore_eos``, as vLLM's serving benchmark does; the anchor with no EOS token); ``--eos``
lets EOS end them.

Systems, each on a fresh process started once, on 127.0.0.1:
- ``continuous``: ``prefixtune serve --batching continuous`` (the default), K prefixes;
- ``dynamic``: ``prefixtune serve --batching mixed`` (dynamic mixed-prefix batching: a batch runs
  to its longest row's end before new rows start), K prefixes;
- ``base``: the continuous server, requests without a prefix (what prefixes cost);
- ``training``: the continuous server, K prefixes, while a prefix-training job runs on it (200
  E2E pairs, batch 8; ``POST /v1/prefixes/NAME/train``, started before the run and cancelled
  after it): serving latency under training, with the server's ``--train-share``;
- ``anchor``: transformers' continuous batching (``init_continuous_batching``, paged cache, sdpa)
  on the base model, in its own process, fed the same arrivals in-process (no HTTP, no JSON):
  what a user of the base model alone would pick.

Measured per run, at the client (the anchor: in its process): time to first token (TTFT: until
the first streamed text, which is what a client sees; a first token that decodes to whitespace
or a special token shows nothing), end-to-end latency (p50, p95), and throughput: generated
tokens (as counted by the server's usage) per second from the first arrival to the last answer;
at a rate above capacity this is the sustained throughput. K = ``--ks`` at the highest rate; the middle K at
every rate. Runs of one rate are back to back, so drift between systems is small; absolute
numbers on shared CPU cores are noisy, ratios less so.

Targets (issue 13): at the same offered load, continuous p95 latency <= 0.5x dynamic's and
sustained throughput >= 1.5x; 256 distinct prefixes >= 0.9x the base model's throughput.

Example: ``python benchmarks/serve.py --threads 1``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KEY = "benchmark-key"
ANCHOR_FLAG = "--_anchor"  # hidden: run the transformers continuous-batching worker (stdin/stdout JSON lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `prefixtune serve` subprocess on a free local port, with its own registry directory."""

    def __init__(self, args, batching: str, work: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        registry = work / f"registry-{batching}"
        cmd = [sys.executable, "-m", "prefixtune.cli", "serve", "--model", args.model, "--registry", str(registry),
               "--host", "127.0.0.1", "--port", str(self.port), "--batching", batching,
               "--max-batch-rows", str(args.max_batch_rows), "--batch-wait-ms", str(args.batch_wait_ms),
               "--prefill-chunk", str(args.prefill_chunk), "--max-queue", "4096", "--request-timeout-s", "3600",
               "--max-new-tokens-limit", str(args.max_new), "--max-input-tokens", str(args.max_prompt_tokens + 8),
               "--max-prefixes-in-memory", str(max(args.ks) + 8), "--train-share", str(args.train_share)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PREFIXTUNE_API_KEYS": f"{KEY}:bench"}
        self.log = open(work / f"server-{batching}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    health = json.loads(r.read())
                    if health["batching"] != batching:
                        raise RuntimeError(f"asked for {batching} batching, the server runs {health['batching']}")
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError("server did not become healthy in 600 s")

    def upload(self, name: str, path: Path) -> None:
        req = urllib.request.Request(f"{self.url}/v1/prefixes/{name}", data=path.read_bytes(), method="PUT",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status in (200, 201)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def completion(port: int, model: str, prompt: str, max_tokens: int, fixed: bool) -> dict:
    """One streaming /v1/completions request; times relative to its send."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": fixed})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                        "Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"{resp.status} {resp.read()[:200]!r}"}
        ttft, tokens, text = None, None, []
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": str(event["error"])}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    text.append(choice["text"])
                    if ttft is None:
                        ttft = time.perf_counter() - t0
        latency = time.perf_counter() - t0
        return {"ttft": ttft if ttft is not None else latency, "latency": latency, "tokens": tokens,
                "text": "".join(text)}
    finally:
        conn.close()


def run_http(server: Server, requests: list[dict], names: list[str | None], fixed: bool) -> list[dict]:
    """Send every request at its arrival time (open loop); each result gets its arrival and finish."""
    results = [None] * len(requests)
    start = time.perf_counter() + 0.5

    def one(i, r):
        time.sleep(max(0.0, start + r["arrival"] - time.perf_counter()))
        sent = time.perf_counter() - start
        name = names[int(r["u"] * len(names))]
        out = completion(server.port, name or "base", r["prompt"], r["max_new"], fixed)
        out.update(arrival=r["arrival"], sent=sent, finish=time.perf_counter() - start)
        results[i] = out

    threads = [threading.Thread(target=one, args=(i, r), daemon=True) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------------
# The anchor: transformers' continuous batching, in its own process


def anchor_worker(model_name: str, threads: int | None, max_rows: int) -> None:
    """Read schedules (JSON lines) from stdin, answer each with per-request results on stdout."""
    import gc as gc_module

    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import prefixtune as pt

    if threads:
        torch.set_num_threads(threads)
    model, tok = pt.load_base_model(model_name)
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        gc = GenerationConfig(max_new_tokens=max(r["max_new"] for r in job["requests"]), do_sample=False,
                              eos_token_id=job["eos"], pad_token_id=job["eos"])
        # its paged cache: 64 pages of 256 tokens (a page per running request, and room to spare); left
        # to itself it takes 90% of free memory, which on a shared CPU machine means the host's RAM
        manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=ContinuousBatchingConfig(
            max_requests_per_batch=max_rows, num_blocks=64, use_cuda_graph=False))
        manager.start()
        for i in range(2):  # warm-up (its first batch takes long), outside the measured window
            manager.add_request(input_ids=job["requests"][i]["ids"], request_id=f"warm{i}", max_new_tokens=4)
        warm = set()
        while len(warm) < 2:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                warm.add(r.request_id)
        start = time.perf_counter() + 0.5
        results = [dict(arrival=r["arrival"]) for r in job["requests"]]

        def produce():
            for i, r in enumerate(job["requests"]):
                time.sleep(max(0.0, start + r["arrival"] - time.perf_counter()))
                results[i]["sent"] = time.perf_counter() - start
                manager.add_request(input_ids=r["ids"], request_id=f"r{i}", max_new_tokens=r["max_new"], streaming=True,
                                    eos_token_id=-1 if job["fixed"] else job["eos"])

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        done = 0
        while done < len(results):
            r = manager.get_result(timeout=1)
            if r is None or not r.request_id.startswith("r"):
                continue
            now, res = time.perf_counter() - start, results[int(r.request_id[1:])]
            # as the servers' streams: the first text (decoded, stripped), not the first token
            text = tok.decode(r.generated_tokens, skip_special_tokens=True).strip() if r.generated_tokens else ""
            if "ttft" not in res and text:
                res["ttft"] = now - res["sent"]
            if r.is_finished():
                res.update(finish=now, latency=now - res["sent"], tokens=len(r.generated_tokens), text=text)
                res.setdefault("ttft", res["latency"])
                if r.error:
                    res["error"] = str(r.error)
                done += 1
        producer.join()
        manager.stop(block=True)
        del manager
        gc_module.collect()
        print(json.dumps(results), flush=True)


class Anchor:
    def __init__(self, args):
        cmd = [sys.executable, __file__, ANCHOR_FLAG, "--model", args.model, "--max-batch-rows", str(args.max_batch_rows)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":  # loaded before any measured run starts
            raise RuntimeError("the anchor worker did not start")

    def run(self, requests: list[dict], eos: int, fixed: bool) -> list[dict]:
        self.proc.stdin.write(json.dumps({"requests": requests, "eos": eos, "fixed": fixed}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the anchor worker exited")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


# ---------------------------------------------------------------------------------------------


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"completed": 0, "errors": len(results)}
    window = max(r["finish"] for r in ok) - min(r["arrival"] for r in results)
    tokens = sum(r["tokens"] or 0 for r in ok)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"completed": len(ok), "errors": len(results) - len(ok), "tokens": tokens, "window_s": window,
            "tokens_per_s": tokens / window, "requests_per_s": len(ok) / window,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": pct(ttft, 0.95),
            "latency_p50_s": statistics.median(lat), "latency_p95_s": pct(lat, 0.95)}


def make_requests(args, sources: list[str], rate: float, prompts_ids: dict) -> list[dict]:
    rng = random.Random(f"{args.seed}-{rate}")
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(rate)
        src = rng.choice(sources)
        out.append({"arrival": t, "prompt": src, "ids": prompts_ids[src], "max_new": rng.randint(args.min_new, args.max_new),
                    "u": rng.random()})
    return out


def step_costs(args, model, tok, prompts: list[list[int]], prefixes: list) -> dict:
    """What the server's numbers are made of: one decoding step of the engine at 1-32 rows (with a
    prefix per row, or none), and a prefill per prompt (alone, or 32 prompts in one forward)."""
    from prefixtune.serve.engine import Engine, Seq
    from prefixtune.template import special_ids

    eos = special_ids(tok)[1]

    def decoding(rows: int, prefixed: bool):
        engine = Engine(model, eos, max_rows=rows, prefill_chunk=4096)
        for i in range(rows):
            engine.add(Seq(prompts[i], prefixes[i] if prefixed else None, 10**6))
        engine.step()  # the prefill; every later call is one decoding step of all rows
        return engine.step

    def prefill(rows: int):
        def run():
            engine = Engine(model, eos, max_rows=rows, prefill_chunk=4096)
            for i in range(rows):
                engine.add(Seq(prompts[i], prefixes[i], 1))
            engine.step()
        return run

    cases = {f"decode_{n}_rows_{'prefix' if p else 'base'}": decoding(n, p) for n in (1, 4, 8, 16, 32) for p in (False, True)}
    cases.update({"prefill_1_prompt": prefill(1), "prefill_32_prompts": prefill(32)})
    times = C.interleaved(cases, repeats=args.repeats, warmup=1)
    medians = {k: statistics.median(v) for k, v in times.items()}
    table = C.print_table([{"case": k, "median_s": v} for k, v in medians.items()], [("case", "case"), ("median_s", "s")],
                          title=f"engine costs, {args.model}, E2E prompts of {sum(map(len, prompts[:32])) / 32:.1f} tokens")
    ratios = {"prefill_per_prompt_alone_over_in_32": C.ratio(medians["prefill_1_prompt"], medians["prefill_32_prompts"] / 32),
              "decode_32_rows_over_1_row": C.ratio(medians["decode_32_rows_base"], medians["decode_1_rows_base"])}
    ratios.update({f"decode_{n}_rows_prefix_over_base": C.ratio(medians[f"decode_{n}_rows_prefix"],
                                                                 medians[f"decode_{n}_rows_base"]) for n in (1, 4, 8, 16, 32)})
    print(json.dumps(ratios, indent=2))
    return {"benchmark": "serve-step-costs", "settings": vars(args), "times": {k: C.summary(v) for k, v in times.items()},
            "ratios": ratios, "table": table}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0, 4.0],
                   help="offered loads, requests/s (Poisson arrivals)")
    p.add_argument("--ks", type=C.csv_ints, default=[1, 16, 256],
                   help="numbers of distinct prefixes: all at the highest rate, the middle one at every rate")
    p.add_argument("--requests", type=int, default=48, help="requests per run")
    p.add_argument("--min-new", type=int, default=8, help="max_tokens is uniform in [--min-new, --max-new]")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--eos", dest="fixed_lengths", action="store_false",
                   help="let EOS end a completion early (default: every completion has exactly its max_tokens, "
                   "ignore_eos, as serving benchmarks fix output lengths)")
    p.add_argument("--task", choices=["e2e", "xsum"], default="e2e", help="prompts: E2E test sources or XSUM documents")
    p.add_argument("--max-prompt-tokens", type=int, default=400, help="XSUM documents are cut to this many tokens")
    p.add_argument("--length", type=int, default=10, help="prefix length of the K random prefixes")
    p.add_argument("--systems", type=C.csv_strs, default=["continuous", "dynamic", "base", "anchor"],
                   help="which systems to run")
    p.add_argument("--train-share", type=float, default=0.5,
                   help="training: the server's --train-share (largest share of time training takes while serving)")
    p.add_argument("--max-batch-rows", type=int, default=32, help="rows decoded together, every system")
    p.add_argument("--prefill-chunk", type=int, default=256, help="continuous: prompt tokens prefilled per step")
    p.add_argument("--batch-wait-ms", type=int, default=50, help="dynamic: batch wait (the server's default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every server (1 on shared cores)")
    p.add_argument("--model", default="smollm2-135m", help="base model served")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/perf/serve-open-loop.json", help="JSON output path")
    p.add_argument("--step-costs", action="store_true",
                   help="instead of the load: time the engine's decoding step at 1-32 rows and its prefill (in process)")
    p.add_argument("--repeats", type=int, default=5, help="--step-costs: timed rounds (median reported)")
    args = p.parse_args(argv)
    C.quiet()

    import torch

    import prefixtune as pt
    from prefixtune.data import group_references, read_task
    from prefixtune.template import encode, special_ids

    model, tok = pt.load_base_model(args.model)
    if args.task == "e2e":
        sources = [e.source for e in group_references(read_task("e2e", "test"))]
    else:
        sources = [tok.decode(tok(e.source, add_special_tokens=False).input_ids[: args.max_prompt_tokens - 1]).strip()
                   for e in read_task("xsum", "test")[:200]]
    ids = {s: encode(model, tok, s).prompt for s in sources}
    train_pairs = [{"source": e.source, "target": e.target} for e in read_task("e2e", "train")[:200]]
    eos = special_ids(tok)[1]
    work = Path(tempfile.mkdtemp(prefix="prefixtune-serve-bench-"))
    files = []
    for k in range(max(args.ks)):  # random prefixes of the real model: speed does not depend on training
        torch.manual_seed(k)
        files.append(pt.PrefixTuner(model, pt.PrefixConfig(length=args.length)).export().save(work / f"p{k}.safetensors"))
    if args.step_costs:
        if args.threads:
            torch.set_num_threads(args.threads)
        rng = random.Random(args.seed)
        result = step_costs(args, model, tok, [ids[rng.choice(sources)] for _ in range(32)],
                            [pt.Prefix.load(files[i % len(files)]) for i in range(32)])
        result["environment"] = C.environment(args.threads or torch.get_num_threads())
        print(f"wrote {C.write_json(args.out, result)}")
        return result
    del model

    servers, anchor = {}, None
    try:
        for system, batching in (("continuous", "continuous"), ("dynamic", "mixed")):
            if system in args.systems or (system == "continuous" and {"base", "training"} & set(args.systems)):
                servers[system] = srv = Server(args, batching, work)
                for k, path in enumerate(files):
                    srv.upload(f"p{k}", path)
                warm = make_requests(args, sources, 100.0, ids)[:4]
                run_http(srv, [dict(r, max_new=4) for r in warm], [None, "p0"], True)
        if "anchor" in args.systems:
            anchor = Anchor(args)
        runs = []
        top, mid = max(args.rates), sorted(args.ks)[len(args.ks) // 2]
        for rate in sorted(args.rates):
            requests = make_requests(args, sources, rate, ids)
            plan = [(s, mid) for s in ("continuous", "training", "dynamic") if s in args.systems]
            if rate == top:
                plan += [(s, k) for k in args.ks if k != mid for s in ("continuous", "dynamic") if s in args.systems]
            plan += [(s, 0) for s in ("base", "anchor") if s in args.systems]
            for system, k in plan:
                if system == "anchor":
                    results = anchor.run([{k2: r[k2] for k2 in ("arrival", "ids", "max_new")} for r in requests], eos,
                                         args.fixed_lengths)
                    extra = {}
                elif system == "training":
                    srv = servers["continuous"]
                    job = srv.call("POST", "/v1/prefixes/trained/train", {"examples": train_pairs, "settings": {
                        "length": 10, "batch_size": 8, "max_steps": 2000, "lr": 5e-4}})
                    while srv.call("GET", f"/v1/jobs/{job['id']}")["step"] < 2:  # training under way
                        time.sleep(0.5)
                    before = srv.call("GET", f"/v1/jobs/{job['id']}")
                    t0 = time.perf_counter()
                    results = run_http(srv, requests, [f"p{i}" for i in range(k)], args.fixed_lengths)
                    after, seconds = srv.call("GET", f"/v1/jobs/{job['id']}"), time.perf_counter() - t0
                    srv.call("DELETE", f"/v1/jobs/{job['id']}")
                    while srv.call("GET", f"/v1/jobs/{job['id']}")["state"] != "cancelled":
                        time.sleep(0.5)
                    extra = {"training_steps_per_s": (after["step"] - before["step"]) / seconds}
                else:
                    names = [None] if system == "base" else [f"p{i}" for i in range(k)]
                    results = run_http(servers["continuous" if system == "base" else system], requests, names,
                                       args.fixed_lengths)
                    extra = {}
                row = {"system": system, "k": k, "rate": rate, **summarise(results), **extra, "requests": results}
                runs.append(row)
                print(f"  rate {rate:4.2f}/s {system:10s} K={k:3d}: {row.get('tokens_per_s', 0):6.1f} tok/s, "
                      f"TTFT p50 {row.get('ttft_p50_s', 0):6.2f}s p95 {row.get('ttft_p95_s', 0):6.2f}s, latency p50 "
                      f"{row.get('latency_p50_s', 0):6.2f}s p95 {row.get('latency_p95_s', 0):6.2f}s, "
                      f"errors {row['errors']}", flush=True)
    finally:
        for srv in servers.values():
            srv.close()
        if anchor is not None:
            anchor.close()

    def get(system, k, rate, key):
        return next((r.get(key) for r in runs if r["system"] == system and r["k"] == k and r["rate"] == rate), None)

    ratios = {}
    for rate in sorted(args.rates):
        ratios[f"rate{rate}_K{mid}_continuous_over_dynamic_latency_p95"] = C.ratio(
            get("continuous", mid, rate, "latency_p95_s"), get("dynamic", mid, rate, "latency_p95_s"))
        ratios[f"rate{rate}_K{mid}_continuous_over_dynamic_ttft_p95"] = C.ratio(
            get("continuous", mid, rate, "ttft_p95_s"), get("dynamic", mid, rate, "ttft_p95_s"))
        ratios[f"rate{rate}_K{mid}_continuous_over_dynamic_tokens_per_s"] = C.ratio(
            get("continuous", mid, rate, "tokens_per_s"), get("dynamic", mid, rate, "tokens_per_s"))
        ratios[f"rate{rate}_K{mid}_training_over_continuous_latency_p95"] = C.ratio(
            get("training", mid, rate, "latency_p95_s"), get("continuous", mid, rate, "latency_p95_s"))
        ratios[f"rate{rate}_K{mid}_training_over_continuous_tokens_per_s"] = C.ratio(
            get("training", mid, rate, "tokens_per_s"), get("continuous", mid, rate, "tokens_per_s"))
        ratios[f"rate{rate}_base_continuous_over_anchor_tokens_per_s"] = C.ratio(
            get("base", 0, rate, "tokens_per_s"), get("anchor", 0, rate, "tokens_per_s"))
    for k in args.ks:
        ratios[f"rate{top}_K{k}_continuous_over_dynamic_tokens_per_s"] = C.ratio(
            get("continuous", k, top, "tokens_per_s"), get("dynamic", k, top, "tokens_per_s"))
        ratios[f"rate{top}_K{k}_continuous_over_base_tokens_per_s"] = C.ratio(
            get("continuous", k, top, "tokens_per_s"), get("base", 0, top, "tokens_per_s"))
    # greedy everywhere: the same request gives the same text on every system with the same prefix
    same = {}
    for rate in sorted(args.rates):
        a = [r.get("text") for r in next((x["requests"] for x in runs if x["system"] == "base" and x["rate"] == rate), [])]
        b = [r.get("text") for r in next((x["requests"] for x in runs if x["system"] == "anchor" and x["rate"] == rate), [])]
        if a and b:
            same[f"rate{rate}_base_equals_anchor"] = a == b
    for k in args.ks:
        a = [r.get("text") for r in next((x["requests"] for x in runs if x["system"] == "continuous" and x["k"] == k
                                          and x["rate"] == top), [])]
        b = [r.get("text") for r in next((x["requests"] for x in runs if x["system"] == "dynamic" and x["k"] == k
                                          and x["rate"] == top), [])]
        if a and b:
            same[f"K{k}_continuous_equals_dynamic"] = a == b
    table = C.print_table([{k: v for k, v in r.items() if k != "requests"} for r in runs],
                          [("rate", "rate/s"), ("system", "system"), ("k", "K"), ("tokens_per_s", "tok/s"),
                           ("ttft_p50_s", "TTFT p50"), ("ttft_p95_s", "TTFT p95"), ("latency_p50_s", "lat p50"),
                           ("latency_p95_s", "lat p95"), ("training_steps_per_s", "train steps/s"), ("errors", "errors")],
                          title=f"{args.requests} requests per run, {args.task} prompts, max_tokens "
                                f"{args.min_new}-{args.max_new}, greedy")
    print(json.dumps({**ratios, **same}, indent=2))
    for row in runs:  # the texts were for the comparisons above; the JSON keeps timings and counts
        for r in row["requests"]:
            r.pop("text", None)
    result = {"benchmark": "serve-open-loop", "settings": vars(args),
              "environment": C.environment(args.threads or torch.get_num_threads()), "runs": runs,
              "ratios": ratios, "outputs_equal": same, "table": table}
    print(f"wrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    if ANCHOR_FLAG in sys.argv:
        a = argparse.ArgumentParser()
        a.add_argument(ANCHOR_FLAG, action="store_true")
        a.add_argument("--model")
        a.add_argument("--threads", type=int, default=None)
        a.add_argument("--max-batch-rows", type=int, default=32)
        ns = a.parse_args()
        anchor_worker(ns.model, ns.threads, ns.max_batch_rows)
    else:
        main()
