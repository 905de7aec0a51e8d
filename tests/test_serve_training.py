"""Training through the server (prefixtune/serve/training.py): a job trained by the server ends with
the prefix `Trainer` gives alone and is served under its name; jobs are tenant-scoped, limited,
cancellable, keep no data unless asked, and survive kill -9 (resumed from their checkpoint)."""

import json
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient

import prefixtune as pt
from conftest import tiny_model
from prefixtune.data import Example
from prefixtune.serve import ServeConfig, create_app
from prefixtune.serve.registry import tenant_dir_name
from prefixtune.train import TrainConfig, Trainer
from test_serve import Env
from test_train_many import pairs

KEYS = {"key-a": "alice", "key-b": "bob"}
A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
SETTINGS = {  # tenant -> (examples, settings)
    "alice": (pairs(0, 12), dict(length=2, mlp_hidden=16, lr=5e-2, max_steps=6, batch_size=4, warmup_steps=1,
                                 eval_every=2, seed=3)),
    "bob": (pairs(1, 7), dict(length=3, mlp_hidden=16, lr=2e-2, max_steps=4, batch_size=3, warmup_steps=1,
                              eval_every=2, seed=3)),
}


def body(examples, settings, dev=None, **extra):
    rows = lambda xs: [{"source": e.source, "target": e.target} for e in xs]  # noqa: E731
    return {"examples": rows(examples), "dev": rows(examples[:3] if dev is None else dev), "settings": settings, **extra}


def alone(model, tokenizer, examples, settings, out):
    """The prefix `Trainer` gives for the same job, alone, in this process."""
    s = dict(settings)
    prefix = pt.PrefixConfig(length=s.pop("length"), mlp_hidden=s.pop("mlp_hidden"))
    Trainer(model, tokenizer, examples, examples[:3], prefix, TrainConfig(**s), out, progress=False).fit()
    return pt.Prefix.load(out / "prefix.safetensors")


def wait(client, job_id, headers, states=("succeeded", "failed", "cancelled"), timeout=120, until=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if record.get("state") in states or (until is not None and until(record)):
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {record}")


@pytest.fixture
def server(tmp_path, tokenizer):
    model = tiny_model("llama-gqa", init_range=0.2)
    config = ServeConfig(registry=str(tmp_path / "registry"), keys=KEYS, max_train_jobs=2, max_train_examples=40,
                         max_train_steps=500, max_train_prefix_length=8, max_new_tokens_limit=16, max_input_tokens=64)
    with TestClient(create_app(model, tokenizer, config)) as client:
        yield client, model, tmp_path / "registry"


def test_jobs_of_two_tenants_end_as_trained_alone_and_are_served(server, tokenizer, tmp_path):
    client, model, registry = server
    ids = {}
    for tenant, headers in (("alice", A), ("bob", B)):
        examples, settings = SETTINGS[tenant]
        r = client.post("/v1/prefixes/mine/train", json=body(examples, settings), headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "queued" and r.json()["total_steps"] == settings["max_steps"]
        ids[tenant] = r.json()["id"]
    for tenant, headers in (("alice", A), ("bob", B)):
        examples, settings = SETTINGS[tenant]
        record = wait(client, ids[tenant], headers)
        assert record["state"] == "succeeded", record
        assert record["step"] == settings["max_steps"] and record["best_dev_loss"] is not None
        d = registry / tenant_dir_name(tenant) / "jobs" / ids[tenant]
        assert sorted(p.name for p in d.iterdir()) == ["job.json", "lock"]  # examples and run directory gone
        served = pt.Prefix.load(registry / tenant_dir_name(tenant) / "mine.safetensors")
        want = alone(tiny_model("llama-gqa", init_range=0.2), tokenizer, examples, settings, tmp_path / tenant)
        diff = (served.kv["self"] - want.kv["self"]).abs().max()
        assert diff < 1e-5, (tenant, diff)  # the two jobs shared batches: isolation up to rounding
        out = client.post("/v1/generate", json={"prefix": "mine", "inputs": [examples[0].source], "max_new_tokens": 8},
                          headers=headers)
        assert out.status_code == 200
        assert out.json()["outputs"] == pt.generate(model, tokenizer, [examples[0].source], prefixes=[served],
                                                    max_new_tokens=8)
    # tenant scoping: each sees its own job only; the other's id is 404 for reading and cancelling
    assert [j["id"] for j in client.get("/v1/jobs", headers=A).json()["jobs"]] == [ids["alice"]]
    assert client.get(f"/v1/jobs/{ids['bob']}", headers=A).status_code == 404
    assert client.delete(f"/v1/jobs/{ids['bob']}", headers=A).status_code == 404
    assert client.get(f"/v1/jobs/{ids['bob']}", headers=B).json()["state"] == "succeeded"
    # deleting an ended job removes its record
    assert client.delete(f"/v1/jobs/{ids['bob']}", headers=B).json()["deleted"] is True
    assert client.get(f"/v1/jobs/{ids['bob']}", headers=B).status_code == 404


def test_bad_training_requests_get_4xx_naming_the_problem(server):
    client, _, registry = server
    examples, settings = SETTINGS["alice"]
    ok = body(examples, settings)

    def post(json_body=None, headers=A, name="p", **kw):
        return client.post(f"/v1/prefixes/{name}/train", json=json_body, headers=headers, **kw)

    cases = [
        (post(ok, headers={}), 401, "API key"),
        (post(ok, name="base"), 422, "reserved"),
        (post({**ok, "settings": {**settings, "length": 9}}), 422, "max-train-prefix-length"),
        (post({**ok, "settings": {**settings, "max_steps": 501}}), 422, "max-train-steps"),
        (post({**ok, "settings": {**settings, "max_steps": None, "epochs": 500.0}}), 422, "max-train-steps"),
        (post({**ok, "settings": {**settings, "dropout": 0.5}}), 422, "extra"),
        (post({**ok, "settings": {**settings, "lr": -1}}), 422, "greater than"),
        (post({**ok, "settings": {**settings, "init": "words"}}), 422, "init_text"),
        (post({**ok, "settings": {**settings, "init_text": "x"}}), 422, "['init_text'] would change nothing"),
        (post({**ok, "dev": [], "settings": {**settings, "patience": 2}}), 422, "settings.patience stops on the dev loss"),
        (post({**ok, "examples": []}), 422, "at least 1"),
        (post({**ok, "examples": [{"source": "x", "target": ""}]}), 422, "at least 1 character"),
        (post(content=json.dumps({**ok, "examples": [{"source": "\ud800x", "target": "y"}]}).encode(),
              headers={**A, "Content-Type": "application/json"}), 422, "json"),  # pydantic refuses lone surrogates
        (post(content=b'{"source": "\\ud800x", "target": "y"}\n', headers={**A, "Content-Type": "application/jsonl"}),
         422, "line 1"),
        (post({**ok, "examples": ok["examples"] * 4}), 413, "max-train-examples"),
        (post({**ok, "examples": [{"source": "word " * 80, "target": "y"}]}), 413, "examples[0]"),
        (post({**ok, "unknown": 1}), 422, "extra"),
        (post(content=b"{not json", headers={**A, "Content-Type": "application/json"}), 422, "json"),
        (post(content=b'{"source": "a", "target": "b"}\n[1]\n', headers={**A, "Content-Type": "application/jsonl"}),
         422, "line 2"),
        (post(content=b'{"source": "a", "target": "b", "split": "test"}\n',
              headers={**A, "Content-Type": "application/jsonl"}), 422, "split"),
        (post(content=b'{"source": "a"}\n', headers={**A, "Content-Type": "application/jsonl"}), 422, "line 1"),
        (client.get("/v1/jobs/job-0123", headers=A), 422, "pattern"),
        (client.get("/v1/jobs/job-" + "0" * 20, headers=A), 404, "not found"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words.lower() in r.text.lower(), (status, words, r.status_code, r.text)
    assert client.get("/v1/jobs", headers=A).json()["jobs"] == []  # nothing was queued by any of them
    # JSONL body, settings in the query, kept data
    lines = "".join(json.dumps({"source": e.source, "target": e.target, **({"split": "dev"} if i < 3 else {})}) + "\n"
                    for i, e in enumerate(examples))
    r = client.post("/v1/prefixes/p/train", content=lines.encode(), params={"settings": json.dumps(settings),
                    "keep_data": "true"}, headers={**A, "Content-Type": "application/jsonl"})
    assert r.status_code == 202 and (r.json()["n_train"], r.json()["n_dev"]) == (9, 3), r.text
    record = wait(client, r.json()["id"], A)
    assert record["state"] == "succeeded"
    kept = registry / tenant_dir_name("alice") / "jobs" / record["id"]
    assert len((kept / "train.jsonl").read_text().splitlines()) == 9 and not (kept / "run").exists()


def test_job_limit_and_cancel(server):
    client, _, registry = server
    examples, settings = SETTINGS["alice"]
    long = {**settings, "max_steps": 500, "eval_every": 50}
    first = client.post("/v1/prefixes/long/train", json=body(examples, long), headers=A).json()
    second = client.post("/v1/prefixes/long2/train", json=body(examples, long), headers=A).json()
    third = client.post("/v1/prefixes/long3/train", json=body(examples, long), headers=A)
    assert third.status_code == 429 and "max-train-jobs" in third.text
    assert client.post("/v1/prefixes/b/train", json=body(examples, settings), headers=B).status_code == 202  # bob's own
    wait(client, first["id"], A, until=lambda r: r["step"] > 0)
    for job in (first, second):  # one running, one running or queued
        assert client.delete(f"/v1/jobs/{job['id']}", headers=A).status_code == 200
        record = wait(client, job["id"], A)
        assert record["state"] == "cancelled" and record["step"] < 500
        d = registry / tenant_dir_name("alice") / "jobs" / job["id"]
        assert not (d / "train.jsonl").exists() and not (d / "run").exists()
    assert client.get("/v1/prefixes", headers=A).json()["prefixes"] == []  # a cancelled job registers nothing
    assert client.post("/v1/prefixes/again/train", json=body(examples, settings), headers=A).status_code == 202


def test_a_cancel_during_the_last_round_registers_nothing(server, monkeypatch):
    """A DELETE that lands while the job takes its last step: the job ends cancelled, not succeeded,
    and its prefix never appears (so a client that cancels, then lists its prefixes, sees no late one)."""
    client, _, _ = server
    jobs = client.app.state.server.jobs
    original = type(jobs)._round

    def round_then_cancel(self):  # the DELETE arrives after the last step, before the job is finished
        stepped = original(self)
        for job_id in stepped:
            if self._many.trainers[job_id].finished():
                (self._mine[job_id]["dir"] / "cancel").touch()
        return stepped

    monkeypatch.setattr(type(jobs), "_round", round_then_cancel)
    examples, settings = SETTINGS["bob"]
    job = client.post("/v1/prefixes/late/train", json=body(examples, settings), headers=B).json()
    record = wait(client, job["id"], B)
    assert record["state"] == "cancelled" and record["step"] == settings["max_steps"]
    assert client.get("/v1/prefixes", headers=B).json()["prefixes"] == []


def test_kill_9_during_training_then_resume(tmp_path, tokenizer):
    """A real server process is killed (SIGKILL) mid-job; a new one resumes the job from its last
    checkpoint and ends with the prefix of an uninterrupted run."""
    env = Env(tmp_path, tokenizer)
    examples, settings = pairs(0, 16), dict(length=3, mlp_hidden=16, lr=3e-2, max_steps=300, batch_size=4,
                                            warmup_steps=1, eval_every=25, seed=5)
    registry = tmp_path / "registry"
    proc, url, log = env.launch(registry)
    env.wait_healthy(proc, url, log)
    key = {"Authorization": "Bearer key-alice-123"}
    with httpx.Client(base_url=url, timeout=60) as c:
        job_id = c.post("/v1/prefixes/mine/train", json=body(examples, settings), headers=key).json()["id"]
        wait(c, job_id, key, until=lambda r: r["step"] >= 60, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    log.close()
    d = registry / tenant_dir_name("alice") / "jobs" / job_id
    record = json.loads((d / "job.json").read_text())
    assert record["state"] == "running" and record["step"] < 300
    saved = json.loads((d / "run" / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= 50 and saved % 25 == 0

    proc, url, log = env.launch(registry)
    try:
        env.wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, timeout=60) as c:
            record = wait(c, job_id, key, timeout=300)
            assert record["state"] == "succeeded", record
            assert c.get("/v1/prefixes", headers=key).json()["prefixes"][0]["name"] == "mine"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert f"resumed at step {saved} of 300" in Path(log.name).read_text()
    served = pt.Prefix.load(registry / tenant_dir_name("alice") / "mine.safetensors")
    model, tok = pt.load_base_model(str(env.model_dir))
    want = alone(model, tok, [Example(e.source, e.target) for e in examples], settings, tmp_path / "alone")
    assert torch.allclose(served.kv["self"], want.kv["self"], atol=1e-4, rtol=1e-3), \
        (served.kv["self"] - want.kv["self"]).abs().max()
