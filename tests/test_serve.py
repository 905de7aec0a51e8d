"""`prefixtune serve`: a real server on 127.0.0.1 (subprocess), a tiny random Llama (GQA) saved with the
SmolLM2 tokenizer, prefixes exported for it. Equality with single-request decoding, tenant isolation,
bad input, hot add/remove under load, restart and graceful shutdown."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import random_prefix, tiny_model

import prefixtune as pt

KEY_A, KEY_B = "key-alice-123", "key-bob-456"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
SOURCES = ["name : The Eagle | Type : coffee shop", "hello", "a much longer source sentence with many more words in it"]
LENGTHS = {"p1": 2, "p2": 3, "p3": 5, "p4": 7}
NEW = 6  # max_new_tokens everywhere: keeps the test fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    def __init__(self, root: Path, tokenizer):
        self.root = root
        self.model_dir = root / "tiny-llama"
        model = tiny_model("llama-gqa")
        model.save_pretrained(self.model_dir)
        tokenizer.save_pretrained(self.model_dir)
        self.files = {}
        for i, (name, length) in enumerate(LENGTHS.items()):
            path = root / f"{name}.safetensors"
            random_prefix(model, length, seed=10 + i, scale=3.0).save(path)
            self.files[name] = path.read_bytes()
        # wrong shapes (another architecture) and same shapes but other weights
        random_prefix(tiny_model("qwen2"), 3, seed=1).save(root / "qwen2.safetensors")
        random_prefix(tiny_model("llama-gqa", seed=1), 3, seed=1).save(root / "other.safetensors")
        self.registry = root / "registry"
        self.keys = root / "keys.json"
        self.keys.write_text(json.dumps({KEY_A: "alice", KEY_B: "bob"}))
        # references: the same saved model, each request decoded alone in-process
        self.model, self.tokenizer = pt.load_base_model(str(self.model_dir))
        self.prefixes = {name: pt.Prefix.load(root / f"{name}.safetensors") for name in LENGTHS}
        self._ref = {}
        self.proc = None
        self.url = None

    def prompt(self, source):
        return pt.template.encode(self.model, self.tokenizer, source).prompt

    def ref(self, name, source, beams=1):
        key = (name, source, beams)
        if key not in self._ref:
            p = None if name is None else self.prefixes[name]
            self._ref[key] = pt.generate(self.model, self.tokenizer, [source], prefixes=[p], num_beams=beams,
                                         max_new_tokens=NEW)[0]
        return self._ref[key]

    def launch(self, registry, extra=()):
        """A server process on a free port with this registry; returns (process, url, log file)."""
        port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PREFIXTUNE_API_KEYS", None)
        cmd = [sys.executable, "-m", "prefixtune.cli", "serve", "--model", str(self.model_dir),
               "--registry", str(registry), "--keys", str(self.keys), "--port", str(port),
               "--threads", "1", "--batch-wait-ms", "30", "--max-batch-rows", "32", "--max-queue", "256",
               "--max-input-tokens", "64", "--max-new-tokens-limit", "32", "--max-upload-mb", "0.1",
               "--request-timeout-s", "60", *extra]
        log = open(self.root / f"server-{port}.log", "w")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), f"http://127.0.0.1:{port}", log

    @staticmethod
    def wait_healthy(proc, url, log):
        deadline = time.time() + 90
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + Path(log.name).read_text())
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def start(self):
        self.proc, self.url, self.log = self.launch(self.registry, ["--max-prefixes-in-memory", "2"])
        self.wait_healthy(self.proc, self.url, self.log)

    def stop(self, timeout=60):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.log.close()

    def client(self, headers=None):
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer):
    e = Env(tmp_path_factory.mktemp("serve"), tokenizer)
    e.start()
    with e.client(A) as c:
        for name, data in e.files.items():
            r = c.put(f"/v1/prefixes/{name}", content=data, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
    yield e
    e.stop()


def metric(env, name) -> float:
    return metric_at(env.url, name)


def test_equality_concurrent_mixed(env):
    jobs = [(name, src, beams) for name in [None, *LENGTHS] for src in SOURCES[:2] for beams in (1, 2)]
    jobs += [(name, SOURCES[2], 1) for name in LENGTHS]
    expected = {job: env.ref(*job) for job in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def worker(i):
        with env.client(A) as c:
            barrier.wait()
            for job in jobs[i::8]:
                name, src, beams = job
                r = c.post("/v1/generate", json={"prefix": name, "inputs": [src], "num_beams": beams,
                                                 "max_new_tokens": NEW})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    results[job] = r.json()["outputs"][0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == expected
    # a multi-input request with a prefix and the OpenAI-shaped endpoint agree with the references too
    with env.client(A) as c:
        r = c.post("/v1/generate", json={"prefix": "p3", "inputs": SOURCES, "max_new_tokens": NEW})
        assert r.json() == {"outputs": [env.ref("p3", s) for s in SOURCES], "prefix": "p3"}
        r = c.post("/v1/completions", json={"model": "p2", "prompt": SOURCES[:2], "max_tokens": NEW})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "p2"
        assert [ch["text"] for ch in body["choices"]] == [env.ref("p2", s) for s in SOURCES[:2]]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        r = c.post("/v1/completions", json={"model": "base", "prompt": SOURCES[0], "max_tokens": NEW})
        assert r.json()["choices"][0]["text"] == env.ref(None, SOURCES[0])
        # sampling with a seed runs in a batch of its own: the same request gives the same outputs
        body = {"prefix": "p1", "inputs": SOURCES[:2], "max_new_tokens": NEW, "do_sample": True, "seed": 7,
                "temperature": 1.5}
        assert c.post("/v1/generate", json=body).json() == c.post("/v1/generate", json=body).json()
    assert metric(env, "prefixtune_mixed_batches_total") >= 1  # rows of different prefixes shared a batch
    assert metric(env, "prefixtune_batch_prefixes_max") > 1
    assert metric(env, "prefixtune_prefix_loads_total") >= 1  # LRU of 2 with 4 prefixes: reloaded from disk


def test_tenant_isolation(env):
    with env.client(A) as a, env.client(B) as b:
        assert b.put("/v1/prefixes/bonly", content=env.files["p2"]).status_code == 201
        assert b.put("/v1/prefixes/p1", content=env.files["p4"]).status_code == 201  # B's own "p1"
        # list: own only
        assert {p["name"] for p in a.get("/v1/prefixes").json()["prefixes"]} == set(LENGTHS)
        assert {p["name"] for p in b.get("/v1/prefixes").json()["prefixes"]} == {"bonly", "p1"}
        # use: another tenant's name is "not found", with the same message as a name nobody has
        r1 = a.post("/v1/generate", json={"prefix": "bonly", "inputs": ["x"], "max_new_tokens": 2})
        r2 = a.post("/v1/generate", json={"prefix": "nobody-has-this", "inputs": ["x"], "max_new_tokens": 2})
        assert r1.status_code == r2.status_code == 404
        assert r1.json()["detail"].replace("bonly", "N") == r2.json()["detail"].replace("nobody-has-this", "N")
        # same name, different tenants, different prefixes
        ra = a.post("/v1/generate", json={"prefix": "p1", "inputs": [SOURCES[0]], "max_new_tokens": NEW}).json()
        rb = b.post("/v1/generate", json={"prefix": "p1", "inputs": [SOURCES[0]], "max_new_tokens": NEW}).json()
        assert ra["outputs"] == [env.ref("p1", SOURCES[0])] and rb["outputs"] == [env.ref("p4", SOURCES[0])]
        # delete: another tenant's name is 404 and stays
        assert a.delete("/v1/prefixes/bonly").status_code == 404
        # overwrite: A's PUT of "bonly" creates A's own entry; B's is untouched
        assert a.put("/v1/prefixes/bonly", content=env.files["p3"]).status_code == 201
        rb = b.post("/v1/generate", json={"prefix": "bonly", "inputs": [SOURCES[0]], "max_new_tokens": NEW}).json()
        assert rb["outputs"] == [env.ref("p2", SOURCES[0])]
        assert a.put("/v1/prefixes/bonly", content=env.files["p3"]).status_code == 200  # replace own
        assert a.delete("/v1/prefixes/bonly").status_code == 200
        assert {p["name"] for p in b.get("/v1/prefixes").json()["prefixes"]} == {"bonly", "p1"}
        for name in ("bonly", "p1"):
            assert b.delete(f"/v1/prefixes/{name}").status_code == 200
        # auth
        with env.client() as anon, env.client({"Authorization": "Bearer wrong"}) as bad:
            assert anon.get("/v1/prefixes").status_code == 401
            assert bad.post("/v1/generate", json={"inputs": ["x"]}).status_code == 401
            assert bad.put("/v1/prefixes/zz", content=env.files["p1"]).status_code == 401
    assert KEY_A not in httpx.get(env.url + "/metrics").text


def test_bad_input(env):
    big_src = "word " * 200
    valid = env.files["p1"]
    with env.client(A) as c:
        post = lambda body: c.post("/v1/generate", json=body).status_code
        assert c.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
        assert post({"inputs": "not a list"}) == 422
        assert post({"inputs": [1, 2]}) == 422
        assert post({"inputs": []}) == 422
        assert post({"inputs": ["x"] * 65}) == 422
        assert post({"inputs": ["x"], "max_new_tokens": "ten"}) == 422
        assert post({"inputs": ["x"], "max_new_tokens": 0}) == 422
        assert post({"inputs": ["x"], "max_new_tokens": 1000}) == 422  # over --max-new-tokens-limit
        assert post({"inputs": ["x"], "num_beams": -1}) == 422
        assert post({"inputs": ["x"], "unknown_field": 1}) == 422
        assert post({"inputs": [big_src]}) in (413, 422)  # over --max-input-tokens
        assert c.post("/v1/completions", json={"model": "base", "prompt": "x", "n": 65}).status_code == 422
        assert c.post("/v1/completions", json={"model": "base", "prompt": ["x"] * 8, "n": 9}).status_code == 422
        for unsupported in ({"presence_penalty": 0.5}, {"logit_bias": {"1": 2}}, {"echo": True}, {"best_of": 3},
                            {"logprobs": 6}, {"stop": ["a"] * 9}, {"tools": []}):
            r = c.post("/v1/completions", json={"model": "base", "prompt": "x", **unsupported})
            assert r.status_code == 422, unsupported
        put = lambda name, data: c.put(f"/v1/prefixes/{name}", content=data).status_code
        assert put("junk", b"this is not a safetensors file at all") == 422
        assert put("truncated", valid[: len(valid) // 2]) == 422
        assert put("corrupt", valid[:8] + b"\xff" * 40 + valid[48:]) == 422
        assert put("empty", b"") == 422
        assert put("wrongshape", (env.root / "qwen2.safetensors").read_bytes()) == 422
        r = c.put("/v1/prefixes/othermodel", content=(env.root / "other.safetensors").read_bytes())
        assert r.status_code == 422 and "base model" in r.json()["detail"]
        assert put("toolarge", os.urandom(200_000)) == 413  # --max-upload-mb 0.1
        assert put("bad name!", valid) in (404, 422)
        assert put("x" * 65, valid) == 422
        assert put("base", valid) == 422  # reserved: the base model's name in the OpenAI routes
        assert {p["name"] for p in c.get("/v1/prefixes").json()["prefixes"]} == set(LENGTHS)
    assert httpx.get(env.url + "/healthz").json()["status"] == "ok"
    assert not list(env.registry.rglob("*.tmp"))


def test_kill_9_during_upload_leaves_no_corrupt_entry(env):
    """A real SIGKILL while an upload (a replacement of p1 and a new name) is half sent: after a
    restart p1 is the old prefix, the new name does not exist, and nothing partial is left."""
    with env.client(A) as c:
        before = c.get("/v1/prefixes").json()["prefixes"]
    port = int(env.url.rsplit(":", 1)[1])
    new_data = env.files["p2"]  # a valid prefix for this model, uploaded as p1 and as "fresh"
    socks = []
    for name in ("p1", "fresh"):
        sock = socket.create_connection(("127.0.0.1", port))
        head = (f"PUT /v1/prefixes/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(new_data)}\r\n\r\n")
        sock.sendall(head.encode() + new_data[: len(new_data) // 2])
        socks.append(sock)
    time.sleep(0.5)  # the server is now reading both bodies
    env.proc.kill()
    env.proc.wait(30)
    for sock in socks:
        sock.close()
    env.log.close()
    env.start()
    with env.client(A) as c:
        assert c.get("/v1/prefixes").json()["prefixes"] == before
        r = c.post("/v1/generate", json={"prefix": "p1", "inputs": [SOURCES[0]], "max_new_tokens": NEW})
        assert r.json()["outputs"] == [env.ref("p1", SOURCES[0])]
        assert c.post("/v1/generate", json={"prefix": "fresh", "inputs": ["x"], "max_new_tokens": NEW}).status_code == 404
    assert not list(env.registry.rglob("*.tmp"))


def test_hot_add_remove_under_load(env):
    expected = [env.ref("p1", s) for s in SOURCES[:2]]
    stop, failures, count = threading.Event(), [], [0]

    def worker():
        with env.client(A) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json={"prefix": "p1", "inputs": SOURCES[:2], "max_new_tokens": NEW})
                if r.status_code != 200 or r.json()["outputs"] != expected:
                    failures.append((r.status_code, r.text))
                count[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with env.client(A) as c:
            for i in range(5):
                assert c.put("/v1/prefixes/hot", content=env.files["p3" if i % 2 else "p4"]).status_code == 201
                r = c.post("/v1/generate", json={"prefix": "hot", "inputs": [SOURCES[0]], "max_new_tokens": NEW})
                assert r.json()["outputs"] == [env.ref("p3" if i % 2 else "p4", SOURCES[0])]
                assert c.delete("/v1/prefixes/hot").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures and count[0] >= 3


def test_graceful_shutdown_and_restart(env):
    with env.client(A) as c:
        before = c.get("/v1/prefixes").json()["prefixes"]
    accepted = metric(env, "prefixtune_requests_total")
    results = []

    def worker(i):
        with env.client(A) as c:
            r = c.post("/v1/generate", json={"prefix": f"p{i + 1}", "inputs": SOURCES, "max_new_tokens": 24,
                                             "num_beams": 2})
            results.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while metric(env, "prefixtune_requests_total") < accepted + 4 and time.time() < deadline:
        time.sleep(0.01)
    env.proc.send_signal(signal.SIGTERM)  # all 4 accepted: every one must still be answered
    for t in threads:
        t.join()
    env.proc.wait(60)
    assert results == [200] * 4
    # a kill -9 during an upload leaves a *.tmp file behind: it must be ignored, and removed once it
    # is old (a young one may be another replica's upload in progress)
    tenant_dir = next(d for d in env.registry.iterdir() if d.is_dir())
    old = time.time() - 3600
    (tenant_dir / ".deadbeef.tmp").write_bytes(env.files["p1"][:100])
    (tenant_dir / "half.safetensors.tmp").write_bytes(b"garbage")
    (tenant_dir / ".inflight.tmp").write_bytes(env.files["p1"][:100])
    for name in (".deadbeef.tmp", "half.safetensors.tmp"):
        os.utime(tenant_dir / name, (old, old))
    env.log.close()
    env.start()
    with env.client(A) as c:
        assert c.get("/v1/prefixes").json()["prefixes"] == before
        r = c.post("/v1/generate", json={"prefix": "p4", "inputs": [SOURCES[1]], "max_new_tokens": NEW})
        assert r.json()["outputs"] == [env.ref("p4", SOURCES[1])]
    assert [p.name for p in env.registry.rglob("*.tmp")] == [".inflight.tmp"]
    (tenant_dir / ".inflight.tmp").unlink()


@pytest.mark.parametrize("batching", ["continuous", "mixed", "single-prefix"])
def test_scheduler_batching_modes(env, batching):
    """In-process: single-prefix batching never mixes prefixes; every mode gives the single-request results."""
    from prefixtune.serve.metrics import Metrics
    from prefixtune.serve.scheduler import Job, Scheduler

    metrics = Metrics()
    sched = Scheduler(env.model, env.tokenizer, metrics, batching=batching, max_batch_rows=8, batch_wait_ms=0)
    assert sched.batching == batching
    names = [None, "p1", "p2", "p1", "p3", None]
    settings = {"max_new_tokens": NEW, "num_beams": 1, "do_sample": False}
    jobs = [sched.submit(Job("alice", n, None if n is None else env.prefixes[n], [env.prompt(SOURCES[i % 2])],
                             dict(settings))) for i, n in enumerate(names)]
    sched.start()  # everything is queued before the worker starts: batches are formed from all six
    sched.stop(timeout=60)
    assert all(j.done.is_set() and j.error is None for j in jobs)
    assert [j.streams[0].text for j in jobs] == [env.ref(n, SOURCES[i % 2]) for i, n in enumerate(names)]
    if batching == "single-prefix":
        assert metrics.max_prefixes_in_batch == 1 and metrics.batches == 4
    elif batching == "mixed":
        assert metrics.max_prefixes_in_batch == 4 and metrics.batches == 1
    else:  # one decoding step per token, all six rows together (the first token comes from each prefill)
        assert metrics.max_prefixes_in_batch == 4 and metrics.batches == NEW - 1


@pytest.mark.parametrize("batching", ["continuous", "mixed"])
def test_rows_of_different_lengths_share_batches(env, batching):
    """Rows with different max_new_tokens (and EOS ignored or not) batch together; each gets exactly
    its own length's output."""
    from prefixtune.serve.metrics import Metrics
    from prefixtune.serve.scheduler import Job, Scheduler

    metrics = Metrics()
    sched = Scheduler(env.model, env.tokenizer, metrics, batching=batching, max_batch_rows=8, batch_wait_ms=0)
    lengths = [2, 7, 4, 12]
    jobs = [sched.submit(Job("alice", "p2", env.prefixes["p2"], [env.prompt(SOURCES[i % 3])],
                             {"max_new_tokens": n, "num_beams": 1, "do_sample": False}, ignore_eos=ignore))
            for ignore in (False, True) for i, n in enumerate(lengths)]
    sched.start()
    sched.stop(timeout=60)
    for j, (ignore, (i, n)) in zip(jobs, [(x, y) for x in (False, True) for y in enumerate(lengths)]):
        want = pt.generate(env.model, env.tokenizer, [SOURCES[i % 3]], prefixes=[env.prefixes["p2"]], max_new_tokens=n,
                           return_tokens=True, **({"eos_token_id": -1} if ignore else {}))[0].tokens
        assert j.error is None and j.streams[0].tokens == want
        assert len(want) == n or not ignore
    if batching == "mixed":
        assert metrics.batches == 2  # one per ignore_eos setting, whatever the lengths


def test_queue_full_timeout_and_draining(env, tmp_path):
    """In-process app whose scheduler is never started: 429 when the queue is full, 504 on timeout, 503 when draining."""
    from fastapi.testclient import TestClient

    from prefixtune.serve import ServeConfig, create_app

    config = ServeConfig(model="tiny", registry=str(tmp_path / "reg"), keys={KEY_A: "alice"}, max_queue=1,
                         request_timeout_s=0.3)
    app = create_app(env.model, env.tokenizer, config)
    c = TestClient(app, headers=A)  # not entered: no lifespan, so nothing is ever generated
    assert c.post("/v1/generate", json={"inputs": ["a", "b"]}).status_code == 429  # 2 rows > --max-queue 1
    r = c.post("/v1/generate", json={"inputs": ["a"]})
    assert r.status_code == 504
    assert c.post("/v1/generate", json={"inputs": ["a"]}).status_code == 429  # the timed-out row still queued
    text = c.get("/metrics").text
    assert 'prefixtune_rejected_total{reason="queue_full"} 2' in text and 'reason="timeout"} 1' in text
    app.state.server.draining = True
    assert c.get("/healthz").status_code == 503 and c.post("/v1/generate", json={"inputs": ["a"]}).status_code == 503


def _zero_length_prefix(env) -> bytes:
    """A valid safetensors prefix file whose tensor and metadata both say length 0."""
    good = env.prefixes["p1"]
    path = env.root / "zero.safetensors"
    pt.Prefix(kv={"self": good.kv["self"][:, :, :, :0]}, meta=dict(good.meta, length=0)).save(path)
    return path.read_bytes()


def test_regressions_of_the_five_500s(env):
    """Issue 13's black-box findings, each once: all were 500 before."""
    with env.client(A) as c:
        r = c.put("/v1/prefixes/zero", content=_zero_length_prefix(env))
        assert r.status_code == 422 and "prefix length 0" in r.json()["detail"]
        raw = lambda body: c.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
        for bad in ('"max_new_tokens": 1e400', '"max_new_tokens": NaN', '"temperature": 1e400, "do_sample": true',
                    '"temperature": NaN, "do_sample": true', '"top_p": -Infinity'):
            r = raw('{"inputs": ["x"], ' + bad + "}")
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["detail"][0]["loc"][1] in ("max_new_tokens", "temperature", "top_p")
        r = raw('{"inputs": ["\\ud800x"], "max_new_tokens": 2}')
        assert r.status_code == 422 and "lone surrogate" in r.text
        assert raw('{"model": "base", "prompt": "\\udfff", "max_tokens": 2}').status_code == 422
        assert c.post("/v1/completions", content='{"model": "base", "prompt": "\\udfff"}',
                      headers={"Content-Type": "application/json"}).status_code == 422
        r = c.post("/v1/generate", json={"inputs": ["x"], "do_sample": True, "seed": 2**70, "max_new_tokens": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]
        assert c.post("/v1/generate", json={"inputs": ["x"], "do_sample": True, "seed": -1}).status_code == 422
        # below the temperature floor, sampling is greedy decoding (documented), whatever the seed
        for temperature in (1e-300, 0.001):
            r = c.post("/v1/generate", json={"prefix": "p2", "inputs": [SOURCES[0]], "do_sample": True, "seed": 3,
                                             "temperature": temperature, "max_new_tokens": NEW})
            assert r.status_code == 200 and r.json()["outputs"] == [env.ref("p2", SOURCES[0])]


@pytest.mark.parametrize("batching", ["mixed", "continuous"])
def test_scheduler_fails_only_the_failing_row(env, batching):
    """A row that raises shares a batch with another tenant's rows, which get exactly their
    single-request outputs; only its request fails. mixed: a length-0 prefix (slipped past
    validation) with base-model rows makes the whole generate call raise, as in issue 13;
    continuous: a prefix of NaN makes its row's sampling fail."""
    from prefixtune.serve.metrics import Metrics
    from prefixtune.serve.scheduler import Job, Scheduler

    good = env.prefixes["p1"]
    metrics = Metrics()
    sched = Scheduler(env.model, env.tokenizer, metrics, batching=batching, max_batch_rows=8, batch_wait_ms=0)
    settings = {"max_new_tokens": NEW, "num_beams": 1, "do_sample": False}
    if batching == "mixed":
        zero = pt.Prefix(kv={"self": good.kv["self"][:, :, :, :0]}, meta=dict(good.meta, length=0))
        bad = sched.submit(Job("mallory", "zero", zero, [env.prompt(SOURCES[0])], dict(settings)))
    else:
        nan = pt.Prefix(kv={"self": torch.full_like(good.kv["self"], float("nan"))}, meta=good.meta)
        bad = sched.submit(Job("mallory", "nan", nan, [env.prompt(SOURCES[0])],
                               dict(settings, do_sample=True, temperature=1.0, top_p=1.0), seed=1))
    names = [None, None] if batching == "mixed" else [None, "p2"]
    jobs = [sched.submit(Job("bob", n, n and env.prefixes[n], [env.prompt(SOURCES[1]), env.prompt(SOURCES[0])],
                             dict(settings))) for n in names]
    sched.start()  # all queued first: the bad row and the four good ones run together
    sched.stop(timeout=60)
    assert metrics.failed_rows == 1 and (metrics.batches == 1 or batching == "continuous")
    assert bad.done.is_set() and isinstance(bad.error, IndexError if batching == "mixed" else ValueError)
    for job in jobs:
        assert job.error is None
        assert [s.text for s in job.streams] == [env.ref(job.prefix_name, SOURCES[1]), env.ref(job.prefix_name, SOURCES[0])]


# values a careless or hostile client may put in any field (raw JSON text)
FUZZ_VALUES = ["1e400", "-1e400", "NaN", "Infinity", "-0", "0", "1", "-1", "2", "32", "33", str(2**64), str(2**70),
               "1e-300", "0.5", "1.0", "true", "false", "null", '""', '"x"', '"\\ud800x"', '["\\udfff"]', "[]", "{}",
               "[1]", '["x", "y"]', "[null]", '"' + "word " * 100 + '"', "9" * 500, '"p1"', '"base"', '"../p1"',
               '"p1\\u0000"', '[' * 50 + ']' * 50, '{"a": {"b": [1e400]}}']
GENERATE_FIELDS = ["prefix", "inputs", "max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "seed", "bogus"]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stream", "stop", "logprobs"]
TRAIN_FIELDS = ["examples", "dev", "settings", "keep_data", "length", "lr", "max_steps", "epochs", "batch_size", "seed",
                "init", "patience", "bogus"]  # the last ones inside "settings"


def _fuzz_requests(env, rng: random.Random, n: int) -> list[tuple]:
    """``n`` malformed (and some accidentally valid) requests: (method, path, body bytes, headers)."""
    valid = env.files["p1"]
    header_len = int.from_bytes(valid[:8], "little")
    nan_prefix = pt.Prefix(kv={"self": env.prefixes["p1"].kv["self"].clone()}, meta=env.prefixes["p1"].meta)
    nan_prefix.kv["self"][0, 0, 0, 0, 0] = float("nan")
    nan_prefix.save(env.root / "nan.safetensors")
    uploads = [_zero_length_prefix(env), (env.root / "nan.safetensors").read_bytes(), b"", b"\x00" * 9,
               (env.root / "qwen2.safetensors").read_bytes(), valid[: len(valid) // 3],
               (2**62).to_bytes(8, "little") + valid[8:], (10).to_bytes(8, "little") + b"{" * 10 + valid[18:]]
    json_ct = {"Content-Type": "application/json"}
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:  # a body of the right shape with 1-3 fields replaced by hostile values
            path, fields = rng.choice([("/v1/generate", GENERATE_FIELDS), ("/v1/completions", COMPLETION_FIELDS)])
            body = ({"prefix": '"p1"', "inputs": '["x"]', "max_new_tokens": "2"} if path == "/v1/generate"
                    else {"model": '"p1"', "prompt": '"x"', "max_tokens": "2"})
            for field in rng.sample(fields, rng.randint(1, 3)):
                body[field] = rng.choice(FUZZ_VALUES)
            text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in body.items()) + "}"
            out.append(("POST", path, text.encode(), json_ct))
        elif kind < 0.6:  # training requests (a few valid ones train while the others are served)
            body = {"examples": '[{"source": "name : x", "target": "x"}]', "settings": {"max_steps": "2"}}
            for field in rng.sample(TRAIN_FIELDS, rng.randint(0, 2)):  # 0: a valid request
                if field in ("examples", "dev", "settings", "keep_data"):
                    body[field] = rng.choice(FUZZ_VALUES)
                elif isinstance(body["settings"], dict):
                    body["settings"][field] = rng.choice(FUZZ_VALUES)
            render = lambda v: v if isinstance(v, str) else "{" + ", ".join(  # noqa: E731
                f"{json.dumps(k)}: {render(x)}" for k, x in v.items()) + "}"
            jsonl = rng.random() < 0.3
            data = (b'{"source": "a", "target": "b"}\n' + rng.choice(FUZZ_VALUES).encode()) if jsonl else render(body).encode()
            out.append(("POST", f"/v1/prefixes/{rng.choice(['fz0', 'base', 'x' * 70])}/train", data,
                        {"Content-Type": "application/jsonl"} if jsonl else json_ct))
        elif kind < 0.7:  # not JSON, or not an object
            junk = rng.choice([b"{not json", b"[1, 2", b"[" * 100_000, b'"just a string"', b"null", b"\xff\xfe\x00",
                               os.urandom(rng.randint(1, 200)), b'{"inputs": ["x"]' + b" " * 1000])
            out.append(("POST", rng.choice(["/v1/generate", "/v1/completions"]), junk,
                        rng.choice([json_ct, {"Content-Type": "text/plain"}, {}])))
        elif kind < 0.9:  # uploads: broken, hostile, or valid files with random bytes flipped
            if rng.random() < 0.5:
                data = rng.choice(uploads)
            else:
                data = bytearray(valid)
                for _ in range(rng.randint(1, 8)):  # mostly in the tensor data, sometimes in the header
                    i = rng.randrange(8 + header_len, len(data)) if rng.random() < 0.8 else rng.randrange(len(data))
                    data[i] = rng.randrange(256)
                data = bytes(data)
            out.append(("PUT", f"/v1/prefixes/fz{rng.randrange(3)}", data, {"Content-Type": "application/octet-stream"}))
        else:  # routes, names, methods and keys that do not exist
            out.append(rng.choice([("GET", "/v1/prefixes/p1", b"", {}), ("DELETE", "/v1/prefixes/nope", b"", {}),
                                   ("PUT", "/v1/prefixes/" + "x" * 300, valid, {}), ("PUT", "/v1/prefixes/%00", valid, {}),
                                   ("POST", "/v1/prefixes", b"{}", json_ct), ("GET", "/v1/generate", b"", {}),
                                   ("POST", "/v1/generate", b'{"inputs": ["x"]}', {"Authorization": "Bearer \u00e9t\u00e9".encode()}),
                                   ("POST", "/v1/generate", b'{"inputs": ["x"]}', {"Authorization": "Basic abc"})]))
    return out


def test_fuzz_no_5xx_and_other_tenants_unharmed(env):
    """Hundreds of malformed requests and uploads from one tenant, while another tenant's valid requests
    (batched with them) keep getting exactly their single-request outputs. Nothing may answer 5xx."""
    fuzz = _fuzz_requests(env, random.Random(13), 400)
    with env.client(B) as b:
        for name in ("p2", "p3"):
            assert b.put(f"/v1/prefixes/q-{name}", content=env.files[name]).status_code == 201
    expected = {(n, s): env.ref(n, s) for n in (None, "p2", "p3") for s in SOURCES[:2]}
    stop, wrong, statuses, served = threading.Event(), [], [], [0]

    def tenant_b():
        with env.client(B) as b:
            i = 0
            while not stop.is_set():
                name, src = list(expected)[i % len(expected)]
                r = b.post("/v1/generate", json={"prefix": name and f"q-{name}", "inputs": [src], "max_new_tokens": NEW})
                if r.status_code != 200 or r.json()["outputs"] != [expected[(name, src)]]:
                    wrong.append((name, src, r.status_code, r.text))
                served[0] += 1
                i += 1

    def tenant_a(part):
        with env.client(A) as a:
            for method, path, body, headers in part:
                r = a.request(method, path, content=body, headers=headers)
                statuses.append((r.status_code, method, path, body[:200], r.text[:200]))

    t0 = time.time()
    threads = [threading.Thread(target=tenant_b) for _ in range(2)]
    threads += [threading.Thread(target=tenant_a, args=(fuzz[i::3],)) for i in range(3)]
    for t in threads[2:]:
        t.start()
    for t in threads[:2]:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert len(statuses) == len(fuzz)
    assert [s for s in statuses if s[0] >= 500] == []
    assert not wrong and served[0] >= 10
    codes = {s[0] for s in statuses}
    assert {200, 202, 401, 404, 405, 413, 422} <= codes  # every kind of answer, generation and training included
    assert time.time() - t0 < 120
    with env.client(A) as a, env.client(B) as b:
        for job in a.get("/v1/jobs").json()["jobs"]:  # training jobs some fuzz requests started
            assert a.delete(f"/v1/jobs/{job['id']}").status_code == 200
        deadline = time.time() + 60  # a running job ends (cancelled, or done just before) within a round
        while any(j["state"] in ("queued", "running") for j in a.get("/v1/jobs").json()["jobs"]):
            assert time.time() < deadline, a.get("/v1/jobs").json()
            time.sleep(0.05)
        for name in ("fz0", "fz1", "fz2"):
            a.delete(f"/v1/prefixes/{name}")
        for name in ("p2", "p3"):
            assert b.delete(f"/v1/prefixes/q-{name}").status_code == 200
        assert {p["name"] for p in a.get("/v1/prefixes").json()["prefixes"]} == set(LENGTHS)


def _tokens_and_logprobs(env, name, prompt, max_new_tokens=NEW):
    """Greedy tokens for an encoded prompt, alone, and their log-probabilities from one plain forward
    pass of the model with the prefix (independent of the generation code)."""
    import torch

    from prefixtune.batch import make_batch

    prefix = None if name is None else env.prefixes[name]
    gen = pt.generate(env.model, env.tokenizer, [prompt], prefixes=[prefix], max_new_tokens=max_new_tokens,
                      return_tokens=True)[0]
    ids = torch.tensor([prompt + gen.tokens])
    with torch.no_grad():
        logits = env.model(input_ids=ids, prefix_batch=make_batch([prefix]), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, ids[0, len(prompt):, None])[:, 0]
    return gen.tokens, logp.tolist()


def test_text_stream_stops_holds_and_adds_up(tokenizer):
    from prefixtune.serve.output import TextStream

    text = " Hello world, this is a stream. It ends here!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for stop, expected, reason in [((), text.strip(), "length"), (("is a",), "Hello world, this", "stop"),
                                   ((". It", "zzz"), "Hello world, this is a stream", "stop"),
                                   (("here!",), "Hello world, this is a stream. It ends", "stop")]:
        stream = TextStream(tokenizer, eos=2, max_new_tokens=len(ids), stop=stop)
        deltas = []
        for t in ids:
            deltas.append(stream.add(t))
            if stream.finish_reason:
                break
        assert "".join(d.text for d in deltas) == expected == stream.text
        assert deltas[-1].finish_reason == reason and len(stream.tokens) == len(deltas)
    stream = TextStream(tokenizer, eos=2, max_new_tokens=len(ids), stop=("is a",))
    for t in ids:  # " is" may start the stop sequence: it is held back until the next token says otherwise
        stream.add(t)
        if stream.raw.endswith("this is"):
            break
    assert stream.text == "Hello world, this"
    stream = TextStream(tokenizer, eos=2, max_new_tokens=50)
    assert stream.add(ids[0]).text == "Hello" and stream.add(2).finish_reason == "stop" and stream.tokens == [ids[0], 2]
    # a multi-byte character split over byte tokens is never sent half
    ids = tokenizer("été 😀", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, eos=2, max_new_tokens=len(ids))
    assert all("\ufffd" not in stream.add(t).text for t in ids) and stream.text == "été 😀"


def test_generate_streams_server_sent_events(env):
    with env.client(A) as c:
        with c.stream("POST", "/v1/generate", json={"prefix": "p3", "inputs": SOURCES[:2], "max_new_tokens": NEW,
                                                    "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        for i, src in enumerate(SOURCES[:2]):
            mine = [e for e in events if e["index"] == i]
            assert "".join(e["text"] for e in mine) == env.ref("p3", src)
            assert [e["finish_reason"] is not None for e in mine][-1] and mine[-1]["finish_reason"] in ("stop", "length")
        # continuous batching (the server's default) streams text as tokens are made, not at the end
        assert httpx.get(env.url + "/healthz").json()["batching"] == "continuous"
        assert max(len([e for e in events if e["index"] == i]) for i in range(2)) >= 3
        assert c.post("/v1/generate", json={"inputs": ["x"], "stream": True, "num_beams": 2}).status_code == 422


def test_openai_client(env):
    """The real `openai` package against the server: models, completions, chat, streaming, n, seed,
    stop, logprobs, usage, and errors."""
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url=env.url + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"base", *LENGTHS}
    assert client.models.retrieve("p2").id == "p2"

    src = SOURCES[0]
    prompt = pt.template.encode(env.model, env.tokenizer, src).prompt
    tokens, logps = _tokens_and_logprobs(env, "p2", prompt)
    r = client.completions.create(model="p2", prompt=src, max_tokens=NEW, logprobs=1)
    choice = r.choices[0]
    assert choice.text == env.ref("p2", src)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(tokens)
    assert r.usage.total_tokens == len(prompt) + len(tokens)
    assert choice.finish_reason == ("stop" if tokens[-1] == 2 else "length")
    listed = [t for t in tokens if t != 2]  # the EOS is counted in usage, not listed
    assert len(choice.logprobs.token_logprobs) == len(listed)
    assert choice.logprobs.token_logprobs == pytest.approx(logps[: len(listed)], abs=1e-4)
    for tok, lp, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert top == {tok: lp}  # greedy: the chosen token is the most likely one
    # ignore_eos (vLLM's extension): exactly max_tokens, EOS or not
    r = client.completions.create(model="base", prompt=SOURCES[1], max_tokens=NEW, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == NEW and r.choices[0].finish_reason == "length"
    # min_tokens (vLLM's extension): EOS cannot end the text earlier
    r = client.completions.create(model="base", prompt=SOURCES[1], max_tokens=NEW, extra_body={"min_tokens": NEW})
    assert r.usage.completion_tokens == NEW and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == pt.generate(env.model, env.tokenizer, [SOURCES[1]], max_new_tokens=NEW,
                                            min_new_tokens=NEW)[0]
    # streaming: the chunks add up to the same text; the last one says why it ended
    chunks = list(client.completions.create(model="p2", prompt=src, max_tokens=NEW, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)
    # stop: the text ends before the stop sequence, streamed or not
    stop = choice.text.split()[1] if len(choice.text.split()) > 1 else choice.text[1:3]
    cut = choice.text[: choice.text.find(stop)].strip()
    r = client.completions.create(model="p2", prompt=src, max_tokens=NEW, stop=[stop, "\n\n\n"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="p2", prompt=src, max_tokens=NEW, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    # n and seed: n choices per prompt, prompt-major; the same seeded request gives the same choices
    ask = dict(model="p1", prompt=SOURCES[:2], max_tokens=NEW, n=3, temperature=1.5, seed=11)
    a, b = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in a.choices] == list(range(6)) and [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices[:3]}) > 1  # sampled, not three greedy copies
    assert a.usage.prompt_tokens == sum(len(pt.template.encode(env.model, env.tokenizer, s).prompt) for s in SOURCES[:2])

    # chat: the tokenizer's chat template, the prefix as usual
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": src}]
    text = env.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = env.tokenizer(text, add_special_tokens=False).input_ids
    expected = pt.generate(env.model, env.tokenizer, [chat_ids], prefixes=[env.prefixes["p4"]], max_new_tokens=NEW)[0]
    r = client.chat.completions.create(model="p4", messages=messages, max_tokens=NEW)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model="p4", messages=messages, max_completion_tokens=NEW,
                                                 stream=True, logprobs=True, top_logprobs=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
                           for e in entries)
    base = client.chat.completions.create(model="base", messages=messages, max_tokens=NEW)
    assert base.choices[0].message.content == pt.generate(env.model, env.tokenizer, [chat_ids], max_new_tokens=NEW)[0]

    # errors come back as the client's exception types, with the server's reason
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="nobody-has-this", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
        client.completions.create(model="base", prompt="x", presence_penalty=1.0)
    with pytest.raises(openai.UnprocessableEntityError, match="over the limit"):
        client.chat.completions.create(model="base", messages=messages, max_tokens=1000)
    with pytest.raises(openai.UnprocessableEntityError, match="role"):
        client.chat.completions.create(model="base", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=env.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_three_replicas_share_one_registry(env, tmp_path):
    """Three servers on one registry directory: what one replica writes (uploads, replaces, deletes)
    is what the others serve from their next request; concurrent writes of one name leave one
    complete file, the last one."""
    import hashlib

    registry = tmp_path / "shared-registry"
    servers = [env.launch(registry) for _ in range(3)]
    try:
        for proc, url, log in servers:
            env.wait_healthy(proc, url, log)
        clients = [httpx.Client(base_url=url, headers=A, timeout=60) for _, url, _ in servers]
        gen = lambda c: c.post("/v1/generate", json={"prefix": "shared", "inputs": [SOURCES[0]], "max_new_tokens": NEW})
        assert clients[0].put("/v1/prefixes/shared", content=env.files["p1"]).status_code == 201
        for c in clients:  # every replica, right after the writer's 2xx
            assert gen(c).json()["outputs"] == [env.ref("p1", SOURCES[0])]
        loads = metric_at(servers[2][1], "prefixtune_prefix_loads_total")
        for _ in range(3):
            gen(clients[2])
        assert metric_at(servers[2][1], "prefixtune_prefix_loads_total") == loads  # unchanged file: served from memory
        assert clients[1].put("/v1/prefixes/shared", content=env.files["p3"]).status_code == 200
        for c in clients:  # replicas 0 and 2 held the old version in memory
            assert gen(c).json()["outputs"] == [env.ref("p3", SOURCES[0])]
        assert clients[2].delete("/v1/prefixes/shared").status_code == 200
        for c in clients:
            assert gen(c).status_code == 404 and c.get("/v1/prefixes").json()["prefixes"] == []
            assert c.delete("/v1/prefixes/shared").status_code == 404

        # concurrent writes of one name through different replicas: last rename wins, never a torn file
        names = ["p1", "p2", "p3", "p4"]
        digests = {hashlib.sha256(env.files[n]).hexdigest(): n for n in names}
        for round_ in range(4):
            barrier, codes = threading.Barrier(4), []

            def write(i):
                barrier.wait()
                codes.append(clients[i % 3].put("/v1/prefixes/raced", content=env.files[names[(i + round_) % 4]]).status_code)

            threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(codes) <= {200, 201} and (201 in codes) == (round_ == 0)
            files = list(registry.rglob("raced.safetensors"))
            assert len(files) == 1 and not list(registry.rglob("*.tmp"))
            winner = digests[hashlib.sha256(files[0].read_bytes()).hexdigest()]  # a complete upload
            for c in clients:
                r = c.post("/v1/generate", json={"prefix": "raced", "inputs": [SOURCES[1]], "max_new_tokens": NEW})
                assert r.json()["outputs"] == [env.ref(winner, SOURCES[1])]
                assert [p["length"] for p in c.get("/v1/prefixes").json()["prefixes"]] == [LENGTHS[winner]]
        for c in clients:
            c.close()
    finally:
        for proc, _, log in servers:
            proc.send_signal(signal.SIGTERM)
        for proc, _, log in servers:
            proc.wait(60)
            log.close()


def metric_at(url, name) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_upload_a_peft_checkpoint_as_a_zip(env):
    """PUT with Content-Type application/zip: a PEFT prefix-tuning checkpoint (adapter_config.json +
    adapter_model.safetensors) is converted and served like the prefix it came from; bad zips are 4xx."""
    import io
    import zipfile

    peft_dir = env.prefixes["p3"].to_peft(env.model, env.root / "peft-p3")

    def zipped(names, folder=""):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name in names:
                path = peft_dir / name
                z.writestr(folder + name, path.read_bytes() if path.exists() else b"\x80\x04pickle")
        return buf.getvalue()

    ct = {"Content-Type": "application/zip"}
    with env.client(A) as a:
        r = a.put("/v1/prefixes/from-peft", content=zipped(["adapter_config.json", "adapter_model.safetensors"], "ckpt/"),
                  headers=ct)
        assert r.status_code == 201 and r.json()["length"] == LENGTHS["p3"], r.text
        out = a.post("/v1/generate", json={"prefix": "from-peft", "inputs": SOURCES, "max_new_tokens": NEW})
        assert out.json()["outputs"] == [env.ref("p3", s) for s in SOURCES]
        for body, words in [(b"not a zip", "not a usable PEFT"), (zipped(["adapter_config.json"]), "no adapter_model"),
                            (zipped(["adapter_config.json", "adapter_model.bin"]), "pickle")]:
            r = a.put("/v1/prefixes/bad-peft", content=body, headers=ct)
            assert r.status_code == 422 and words in r.text, r.text
        assert a.delete("/v1/prefixes/from-peft").status_code == 200


@pytest.mark.parametrize("option,value,message", [("max_batch_rows", 0, "max_batch_rows must be >= 1, got 0 (--max-batch-rows)"),
                                                  ("max_queue", 0, "max_queue must be >= 1, got 0 (--max-queue)"),
                                                  ("threads", -1, "threads must be >= 1, got -1 (--threads)"),
                                                  ("request_timeout_s", 0.0, "request_timeout_s must be a positive number"),
                                                  ("port", 70000, "port must be a TCP port (0-65535), got 70000")])
def test_server_settings_that_would_crash_or_refuse_everything_are_refused_at_start(option, value, message):
    from prefixtune.cli import main
    from prefixtune.serve import ServeConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        ServeConfig(**{option: value})
    assert main(["serve", f"--{option.replace('_', '-')}", str(value)]) == 2  # before loading any model


def test_an_address_in_use_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import socket

    from prefixtune.cli import main

    monkeypatch.setenv("PREFIXTUNE_API_KEYS", "k1:alice")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model path does not exist: a refusal about the port shows that nothing was loaded first
        assert main(["serve", "--port", str(port), "--model", str(tmp_path / "no-model")]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (--host, --port)" in capsys.readouterr().err
    assert main(["serve", "--host", "192.0.2.1", "--model", str(tmp_path / "no-model")]) == 2
    assert "cannot listen on 192.0.2.1:8000: Cannot assign requested address" in capsys.readouterr().err


def test_a_bad_keys_file_is_refused_naming_it(tmp_path):
    from prefixtune.serve.app import load_keys

    with pytest.raises(FileNotFoundError, match="keys file not found: .*nokeys.json"):
        load_keys(str(tmp_path / "nokeys.json"))
    for text, message in (("{not json", "not valid JSON"), ("[1, 2]", "keys file must be a JSON object")):
        (tmp_path / "keys.json").write_text(text)
        with pytest.raises(ValueError, match=rf"keys.json: {message}"):
            load_keys(str(tmp_path / "keys.json"))
    (tmp_path / "keys.json").write_text('{"k1": "alice"}')
    assert load_keys(str(tmp_path / "keys.json"), "k2:bob") == {"k1": "alice", "k2": "bob"}
