"""The benchmark scripts' helpers (benchmarks/_common.py, token counting) and their --help.

The benchmarks themselves are not run here (minutes each); these checks take a few seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import decode  # noqa: E402


def test_interleaved_rotates_order_and_times_every_case():
    calls = []
    cases = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = C.interleaved(cases, repeats=3, warmup=1, log=None)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_summary_and_ratios():
    s = C.summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert C.ratio(1.0, 2.0) == 0.5 and C.ratio(None, 1.0) is None and C.ratio(1.0, 0) is None
    assert C.paired_ratio([1.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_measure_peak_sees_a_large_allocation_that_is_freed():
    def allocate():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
        del t

    m = C.measure_peak(allocate)
    assert m["peak_growth_mb"] >= 50, m


def test_strip_memory_flag():
    argv = ["--quick", C.MEMORY_FLAG, "ours/b8/L10", "--threads", "1", f"{C.MEMORY_FLAG}=x"]
    assert C.strip_memory_flag(argv) == ["--quick", "--threads", "1"]


def test_count_new_tokens_stops_at_first_eos():
    eos = 2
    out = torch.tensor([[9, 9, 5, 6, 2, 2, 2], [9, 9, 5, 6, 7, 8, 3], [9, 9, 2, 2, 2, 2, 2]])
    assert decode.count_new_tokens(out, prompt_width=2, eos=eos) == [3, 5, 1]


@pytest.mark.parametrize("script", ["train_step.py", "decode.py", "mixed.py", "precision.py", "train_many.py", "beam_rows.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--repeats" in proc.stdout


def test_serve_benchmark_load_and_summary():
    """The open-loop load: Poisson arrivals at the rate, lengths in range, the same schedule for every
    system; the summary's throughput window runs from the first arrival to the last answer."""
    import argparse

    import serve

    args = argparse.Namespace(seed=0, requests=2000, min_new=8, max_new=64)
    sources = ["a", "b", "c"]
    reqs = serve.make_requests(args, sources, 4.0, {s: [1] for s in sources})
    gaps = [b["arrival"] - a["arrival"] for a, b in zip(reqs, reqs[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.02  # mean gap 1/rate
    assert sorted(gaps)[len(gaps) // 2] < 0.2  # exponential: median ln2/rate = 0.17, not 0.25
    assert {r["max_new"] for r in reqs} == set(range(8, 65))
    assert reqs == serve.make_requests(args, sources, 4.0, {s: [1] for s in sources})
    results = [{"arrival": 0.0, "finish": 2.0, "ttft": 0.5, "latency": 2.0, "tokens": 10},
               {"arrival": 1.0, "finish": 5.0, "ttft": 1.0, "latency": 4.0, "tokens": 30}, {"arrival": 2.0, "error": "x"}]
    s = serve.summarise(results)
    assert (s["completed"], s["errors"], s["tokens_per_s"], s["latency_p95_s"]) == (2, 1, 8.0, 4.0)


def test_serve_benchmark_help():
    proc = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--rates" in proc.stdout and "Poisson" in proc.stdout


def test_attention_kernels_benchmark_runs_and_checks_errors(tmp_path):
    out = tmp_path / "attn.json"
    proc = subprocess.run([sys.executable, str(BENCH / "attention_kernels.py"), "--batch", "2", "--length", "3",
                           "--tokens", "4", "--repeats", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"flash_fp32", "flash_bf16", "split_fp32", "split_bf16"}
    # every implementation computes the same attention: errors against float64 are bf16-input rounding
    assert all(r["err_output"] < 0.05 and r["err_grad_q"] < 0.05 for r in rows.values()), rows


def test_bf16_quality_help():
    proc = subprocess.run([sys.executable, str(BENCH / "bf16_quality.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--variants" in proc.stdout and "scored by the" in proc.stdout


def test_run_costs_help_and_bad_cases():
    proc = subprocess.run([sys.executable, str(BENCH / "run_costs.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cases" in proc.stdout and "CPU seconds" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, str(BENCH / "run_costs.py"), "--cases", "webnlg:dance"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--cases" in proc.stderr and "dance" in proc.stderr, proc.stderr
