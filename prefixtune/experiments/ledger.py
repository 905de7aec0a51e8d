"""The run ledger: what every finished run trained and scored, as small text files under results/.

One directory per run, named by the hash of its training settings (``Run.key()``)::

    results/ledger/<key>/result.json          settings, training summary (dev curve, steps to best,
                                              timings, parameter counts) and every evaluation's scores
    results/ledger/<key>/outputs-<eval>.txt   the test outputs, one line per test item
    results/ledger/<key>/items-<eval>.jsonl   per test item, the metrics' sufficient statistics
                                              (for bootstrap intervals without the data or a model)
    results/ledger/<key>/unfinished.json      a run stopped before it finished (Ctrl-C, end of a
                                              session): the CPU hours it had taken, per attempt
                                              (removed once the run is done)

It is written as soon as a training finishes and again after each evaluation, atomically (temp
file + rename), and holds no weights: the training scratch (checkpoints, trained weights, the lock)
stays under ``runs/`` (git-ignored). Reports are regenerated from the ledger alone
(``prefixtune experiment NAME --report-only``); a fresh clone runs only the runs it lacks.

Several processes may work on the same runs: a run is trained by whoever holds its lock, an
``flock`` on ``runs/<key>.lock``, which the operating system releases when the process ends (also
on a crash or kill), so a dead process never blocks a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from pathlib import Path

from ..files import write_atomic

RESULT = "result.json"
UNFINISHED = "unfinished.json"


def entry(ledger: str | Path, key: str) -> Path:
    return Path(ledger) / key


def eval_tag(ev) -> str:
    """File tag of an evaluation: readable name + hash of its settings (two settings never collide)."""
    return f"{ev.name}-{ev.key()[:8]}"


def read(ledger: str | Path, key: str, items: bool = True) -> dict | None:
    """The ledger's result of run ``key`` (None if absent); ``items``: load the per-item statistics."""
    path = entry(ledger, key) / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if items:
        for ev in result.get("evals", {}).values():
            f = entry(ledger, key) / ev.get("items_file", "")
            if ev.get("items_file") and f.is_file():
                rows = [json.loads(line) for line in f.read_text().splitlines() if line]
                ev["items"] = {name: [r[name] for r in rows] for name in (rows[0] if rows else {})}
    return result


def write(ledger: str | Path, key: str, result: dict) -> Path:
    """Write result.json (without in-memory per-item statistics, which live in their own files)."""
    slim = {**result, "evals": {k: {n: v for n, v in ev.items() if n != "items"} for k, ev in result.get("evals", {}).items()}}
    return write_atomic(entry(ledger, key) / RESULT, json.dumps(slim, indent=1, sort_keys=True) + "\n")


def write_eval_files(ledger: str | Path, key: str, ev, outputs: list[str], items: dict[str, list]) -> dict:
    """Write one evaluation's outputs and per-item statistics; returns the file names to record."""
    tag = eval_tag(ev)
    out = f"outputs-{tag}.txt"
    write_atomic(entry(ledger, key) / out, "".join(o.replace("\n", " ") + "\n" for o in outputs))
    item_file = f"items-{tag}.jsonl"
    n = len(outputs)
    rows = [{name: values[i] for name, values in items.items()} for i in range(n)]
    write_atomic(entry(ledger, key) / item_file, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return {"outputs_file": out, "items_file": item_file}


def note_unfinished(ledger: str | Path, key: str, cpu_hours: float, when: str, resumed: bool = False,
                    progress: tuple[int, int] | None = None) -> Path:
    """Record that run ``key`` was stopped unfinished after ``cpu_hours`` (this attempt; ``resumed``: it
    went on from an earlier attempt's checkpoint; ``progress``: its training's steps done and the fewest
    it can end at, see ``grid.training_progress``): its training scratch may be lost with the machine, but
    what it cost is not, so the grid's estimate of it (``grid.expected_hours``) knows it needs at least that."""
    path = entry(ledger, key) / UNFINISHED
    attempts = json.loads(path.read_text())["attempts"] if path.is_file() else []
    attempt = {"cpu_hours": round(cpu_hours, 3), "stopped": when, "resumed": resumed}
    if progress:
        attempt["steps"], attempt["least_steps"] = progress
    attempts.append(attempt)
    return write_atomic(path, json.dumps({"attempts": attempts}, indent=1) + "\n")


def unfinished_chains(ledger: str | Path, key: str) -> list[tuple[float, dict]]:
    """Run ``key``'s unfinished attempts as chains, each an attempt that started afresh (e.g. on a new
    machine) and those that went on from its checkpoint: (CPU hours of the chain, its last attempt)."""
    path = entry(ledger, key) / UNFINISHED
    chains: list[tuple[float, dict]] = []
    for attempt in json.loads(path.read_text())["attempts"] if path.is_file() else []:
        if attempt.get("resumed") and chains:
            chains[-1] = (chains[-1][0] + attempt["cpu_hours"], attempt)
        else:
            chains.append((attempt["cpu_hours"], attempt))
    return chains


def unfinished_hours(ledger: str | Path, key: str) -> float | None:
    """The most CPU hours that run ``key``'s training was seen to need: the longest chain of unfinished
    attempts (``unfinished_chains``), scaled from the steps its last attempt had done to the fewest its
    training can end at (a run stopped while its dev score still rose needs at least ``patience`` more
    evaluations); None if none was recorded."""
    chains = unfinished_chains(ledger, key)
    if not chains:
        return None
    return max(hours * max(1.0, last.get("least_steps", 1) / max(1, last.get("steps", 1))) for hours, last in chains)


def describe_unfinished(ledger: str | Path, key: str) -> str | None:
    """One line for a report's list of missing runs: how far run ``key``'s latest chain of unfinished
    attempts got (its checkpoint stays on the machine that ran it); None if none was recorded."""
    chains = unfinished_chains(ledger, key)
    if not chains:
        return None
    hours, last = chains[-1]
    where = f" at step {last['steps']} (of {last['least_steps']} or more)" if "steps" in last else ""
    return f"begun: stopped unfinished{where} after {hours:.2f} CPU-h (its checkpoint is on the machine that ran it)"


def hours_behind(ledger: str | Path, key: str, step: int) -> float:
    """The CPU hours of run ``key`` that a training checkpoint at ``step`` holds: those of the (latest)
    chain of unfinished attempts that stopped there, which a resumed training need not spend again; 0
    where none did (a checkpoint no noted attempt left, e.g. of a process that was killed)."""
    return next((hours for hours, last in reversed(unfinished_chains(ledger, key)) if last.get("steps") == step), 0.0)


@contextlib.contextmanager
def lock(runs_dir: str | Path, key: str):
    """Hold run ``key`` for this process: yields True if acquired, False if another live process has it.
    The lock is an flock, released by the kernel when this process ends, whatever the reason."""
    path = Path(runs_dir) / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")  # who holds it, for people looking (the flock is what counts)
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(runs_dir: str | Path, key: str) -> bool:
    """Whether another live process holds run ``key`` now."""
    with lock(runs_dir, key) as got:
        return not got


def holder(runs_dir: str | Path, key: str) -> int | None:
    """The pid that last took run ``key``'s lock (None where unreadable): whether it still holds it is
    ``is_locked``'s to say."""
    try:
        return int((Path(runs_dir) / f"{key}.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def commit(paths: list[Path], message: str, tries: int = 5) -> bool:
    """``git add`` + ``git commit`` of ``paths`` only (other staged changes are left alone); retried
    while another process holds the index lock. Returns False (and says why) if it did not commit."""
    import time

    for attempt in range(tries):
        add = subprocess.run(["git", "add", "--", *map(str, paths)], capture_output=True, text=True)
        if add.returncode == 0 and subprocess.run(["git", "diff", "--cached", "--quiet", "--", *map(str, paths)]).returncode == 0:
            return True  # nothing new to commit
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *map(str, paths)], capture_output=True, text=True).returncode == 0
        if done:
            return True
        time.sleep(2 + 3 * attempt)
    print(f"ledger: could not commit {[str(p) for p in paths]} ({add.stderr.strip()[:200]}); commit it by hand")
    return False
