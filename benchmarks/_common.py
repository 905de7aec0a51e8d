"""Shared helpers for the benchmarks in this directory (train_step.py, decode.py, mixed.py).

Conventions every benchmark follows:

* **Interleaved repeats, median.** :func:`interleaved` runs warm-up calls of every case, then
  ``repeats`` rounds; each round times one call of every case, in an order rotated by one position
  per round (so no case is always first or last). A case's result is the median of its rounds.
  Ratios are computed from those medians, in the same process, so machine-wide drift (other jobs,
  thermal state) hits all cases alike. :func:`paired_ratio` additionally gives the median of the
  per-round ratios, which is robust to drift between rounds.
* **Peak memory (CPU).** tracemalloc does not see torch's allocations, and the process-lifetime
  ``ru_maxrss`` is dominated by model loading, so every measured case runs in a *fresh
  subprocess* (:func:`run_memory_workers`) that loads only what that case needs and then:
  reads all model weights once (:func:`touch`: transformers memory-maps checkpoints, so weights
  become resident only when first read), records its resident set size (VmRSS), resets the kernel's peak-RSS counter (writing ``5`` to
  ``/proc/self/clear_refs``, Linux >= 4.0), runs the case, and reads the peak (VmHWM). Peak
  growth = VmHWM - VmRSS at the reset: the memory the case itself needs on top of the loaded
  model and inputs (activations, gradients, optimizer state, caches). Where the counter cannot
  be reset the worker falls back to ``ru_maxrss`` after - VmRSS before, an upper bound when
  loading peaked higher than the case; the JSON names the method used.
* **Output.** Each script prints a table and writes JSON with all raw timings, medians, ratios,
  settings, versions, thread count, CPU model and the exact command line (:func:`environment`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMORY_FLAG = "--_memory-case"  # hidden option: run one case's memory measurement and print JSON
MEMORY_TAG = "MEMORY_JSON "


# ---------------------------------------------------------------------------------------------
# Arguments


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def csv_strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--repeats", type=int, default=None, help="timed rounds per case (median reported; default 5, --quick 2)")
    g.add_argument("--warmup", type=int, default=None, help="untimed calls per case before timing (default 2, --quick 1)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, normally the number of cores)")
    g.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded smollm2-135m)")
    g.add_argument("--seed", type=int, default=0, help="seed for the data sample and random prefixes")
    g.add_argument("--out", default=out_default, help=f"JSON output path (default {out_default})")
    g.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (explicit options still win)")
    parser.add_argument(MEMORY_FLAG, dest="memory_case", default=None, help=argparse.SUPPRESS)


def fill_defaults(args: argparse.Namespace, normal: dict, quick: dict) -> argparse.Namespace:
    """Options left at None take the --quick value when --quick is given, else the normal one."""
    for key, value in normal.items():
        if getattr(args, key, None) is None:
            setattr(args, key, quick.get(key, value) if args.quick else value)
    return args


def setup_threads(threads: int | None) -> int:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (only possible before any parallel work)
            pass
    return torch.get_num_threads()


def quiet() -> None:
    """Silence progress bars and deprecation chatter that would clutter the tables."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    log: Callable[[str], None] | None = print,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every case (by ``clock``: wall time, or e.g. ``time.process_time``):
    ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Each round calls every case once; the order is rotated by one per round.
    """
    names = list(cases)
    for w in range(warmup):
        for name in names:
            cases[name]()
        if log:
            log(f"  warm-up round {w + 1}/{warmup} done")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            t0 = clock()
            cases[name]()
            times[name].append(clock() - t0)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "n": len(values),
        "raw": list(values),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of a[r] / b[r] (both measured in the same round)."""
    pairs = [x / y for x, y in zip(a, b) if y]
    return statistics.median(pairs) if pairs else None


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the reset really happened


def touch(*modules) -> None:
    """Read every parameter and buffer once so that lazily mapped weights are resident.

    transformers maps safetensors checkpoints into memory; their pages join the RSS only when
    first read, which would otherwise be counted as the first measured step's memory.
    """
    import torch

    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                t.sum()


def measure_peak(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once and return the peak resident memory it added (see the module docstring)."""
    gc.collect()
    before = rss_mb()
    maxrss_before = _maxrss_mb()
    reset = _reset_peak()
    before = rss_mb() if reset else before
    fn()
    if reset:
        peak = _status_kb("VmHWM") / 1024
        method = "VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS at the reset"
    else:
        peak = _maxrss_mb()
        method = "ru_maxrss after minus VmRSS before (upper bound if loading peaked higher)"
    return {
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "peak_growth_mb": None if before is None else max(0.0, peak - before),
        "lifetime_maxrss_before_mb": maxrss_before,
        "method": method,
    }


def run_memory_workers(script: str | Path, names: list[str], argv: list[str], log=print, timeout: float = 900) -> dict:
    """Measure every case in its own fresh ``python script <argv> --_memory-case NAME`` process."""
    results = {}
    for name in names:
        cmd = [sys.executable, str(script), *argv, MEMORY_FLAG, name]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
        lines = [l for l in proc.stdout.splitlines() if l.startswith(MEMORY_TAG)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-2000:]
            results[name] = {"error": f"worker exited {proc.returncode}: {tail}"}
        else:
            results[name] = json.loads(lines[-1][len(MEMORY_TAG):])
        if log:
            r = results[name]
            shown = f"{r['peak_growth_mb']:.0f} MB" if "peak_growth_mb" in r else r["error"][:200]
            log(f"  memory {name}: {shown} ({time.perf_counter() - t0:.0f}s)")
    return results


def strip_memory_flag(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == MEMORY_FLAG:
            skip = True
            continue
        if a.startswith(MEMORY_FLAG + "="):
            continue
        out.append(a)
    return out


def memory_worker_report(result: dict) -> None:
    print(MEMORY_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Environment and output


def cpu_info() -> dict:
    info = {"model": platform.processor() or None, "logical_cpus": os.cpu_count(), "flags_of_interest": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                info["flags_of_interest"] = [w for w in wanted if w in flags]
                break
    except OSError:
        pass
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def environment(threads: int) -> dict:
    import torch
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    try:
        import prefixtune

        pt_version = prefixtune.__version__
    except ImportError:
        pt_version = None
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "prefixtune": pt_version,
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_info(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> str:
    """``columns``: (key, header). Values are formatted with :func:`fmt`. Returns the text printed."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def load_model(name: str, dtype):
    """A fresh copy of the base model (frozen, eval mode) and its tokenizer."""
    import prefixtune

    return prefixtune.load_base_model(name, dtype=dtype)
