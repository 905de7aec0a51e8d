"""``prefixtune experiment grid``: every experiment's runs, in an order that makes a partial grid useful,
shared safely by several processes (one per core), resumable across sessions.

Order (``order``), breadth first, so that a grid stopped at any point has a first verdict for as many
findings as it can: the learning-rate grid of prefix-tuning and fine-tuning; the first (sampling,
seed) round of the low-data experiment (one prefix / fine-tuning pair per size); the rest of the
learning-rate grid; the first round of each experiment of ``LATER`` (the main table and
extrapolation, the paper's headline claims with low data, then initialisation, prefix length and
summarization); then the other rounds: low-data (and its arithmetic check), then ``LATER`` in the
same order. Runs whose method has no learning rate yet wait; the order is recomputed after every
run, as rates get chosen.

Each process takes the first run that is neither in the ledger nor held by another process (its
lock dies with its process), trains and scores it, records it in the ledger (and commits it with
``--commit``), rewrites every report from the ledger (committed every 10 runs and at the end), and goes on. Stopping a process (Ctrl-C,
kill, end of session) loses at most the run in progress, which resumes from its last checkpoint (or
test decoding batch), if the training scratch (``runs/``) is still there. A session on a machine that is not kept loses it: with a
``deadline``, a process starts only runs expected to end before it (``fits``), taking a later, shorter run
when the next one would not, and stops when none fits. A run stopped by Ctrl-C (SIGINT) notes in the
ledger the CPU hours it had taken (``unfinished.json``), so that it is not expected to fit where it did not.
A process that stops at its deadline hands its threads to the processes still running (``hand_over_cores``),
so that their runs end sooner instead of a core idling until the session ends. With ``carry_over`` (for a
machine whose ``runs/`` is kept) it instead trains one run until the deadline and stops it there with an
exact checkpoint, for a later session to resume (``to_carry_over``): runs longer than any session
(WebNLG fine-tuning, ~4 h on one thread) then finish over several sessions.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
import traceback
from pathlib import Path

import torch

from . import NAMES, Scale, module, resolve_lrs, write_report
from . import ledger as ledger_mod
from . import runs as runs_mod
from ..files import write_atomic
from .runs import Run, complete, failed, merge, run_one, training_seconds


LATER = ("table-to-text", "extrapolation", "initialisation", "prefix-length", "summarization")


def order(scale: Scale, names: tuple[str, ...] = NAMES) -> list[Run]:
    """Every run of the experiments ``names`` (all by default), deduplicated (evaluations merged), in the
    order they are worked on."""
    grid = module("lr-grid").plan(scale)
    first = [r for r in grid if r.method in ("prefix", "finetune")]
    low = module("low-data").plan(scale) if "low-data" in names else []
    later = [module(n).plan(scale) for n in LATER if n in names]
    parts = [first, _first_round(low), grid, *map(_first_round, later), low, *later]
    return merge([r for part in parts for r in part])


def _first_round(runs: list[Run]) -> list[Run]:
    """The runs of the first training subset and seed: one run per cell."""
    return [r for r in runs if (r.sampling, r.seed) == (0, 0)]


def status(scale: Scale, runs_dir: str | Path, ledger_dir: str | Path, names: tuple[str, ...] = NAMES) -> dict[str, list[Run]]:
    """The grid's runs by state: done, running (held by a live process), todo, waiting (no learning rate yet)."""
    scale = resolve_lrs(scale, ledger_dir)
    out: dict[str, list[Run]] = {"done": [], "running": [], "todo": [], "waiting": []}
    for run in order(scale, names):
        if run.lr is None:
            out["waiting"].append(run)
        elif complete(run, ledger_mod.read(ledger_dir, run.key(), items=False)):
            out["done"].append(run)
        elif ledger_mod.is_locked(runs_dir, run.key()):
            out["running"].append(run)
        else:
            out["todo"].append(run)
    return out


def train_hours(result: dict) -> float:
    """CPU hours of a finished run's training with its dev evaluations (one thread; CPU time where
    recorded, else wall time). ``cpu_seconds`` covers a run's last session only: its evaluation
    intervals' CPU time (all sessions) counts where larger; for runs from before that was counted, the
    intervals' wall time where a resumed run's exceed its last session's wall time."""
    t = result["train"]
    train, intervals = t.get("cpu_seconds", t["wall_seconds"]), training_seconds(t)
    if t.get("train_cpu_seconds") is not None or intervals > t["wall_seconds"]:  # CPU counted, or resumed
        train = max(train, intervals)
    return train / 3600


def decode_hours(evaluation: dict) -> float:
    """CPU hours of one test decoding (CPU time where recorded, else wall time)."""
    return evaluation.get("decode_cpu_seconds", evaluation.get("decode_seconds", 0)) / 3600


def hours(result: dict) -> float:
    """CPU hours of a finished run: training, plus each test decoding."""
    return train_hours(result) + sum(decode_hours(e) for e in result["evals"].values())


def training_progress(out: Path) -> tuple[int, int] | None:
    """(Steps done, the fewest steps it can end at) of the training in ``out``, from its checkpoint: early
    stopping needs ``patience`` evaluations without a better selection score (dev score where the
    evaluations have one, else dev loss) after the best so far, and the cap ends it at ``max_steps``. None
    without a checkpoint; patience 0 (no early stopping) ends only at the cap."""
    from ..train import checkpoint_progress

    p = checkpoint_progress(out)
    if p is None:
        return None
    if not p["patience"] or not p["eval_every"]:  # (the grid's runs evaluate every eval_every steps)
        return p["step"], p["max_steps"]
    last_evaluation = p["step"] // p["eval_every"] * p["eval_every"]
    still = 0 if p["stopped_early"] else p["patience"] - p["evaluations_since_best"]
    return p["step"], min(p["max_steps"], max(p["step"], last_evaluation + still * p["eval_every"]))


def trained_here(key: str, runs_dir: str | Path, ledger_dir: str | Path) -> dict | None:
    """The ledger's result of run ``key`` if its training is done and its weights are in ``runs_dir`` (this
    machine): only test decodings can be left of it. None otherwise."""
    result = runs_mod.has_weights(Path(runs_dir) / key) and ledger_mod.read(ledger_dir, key, items=False)
    return result if result and "train" in result else None


def _timed_by_the_clock(train: dict) -> bool:
    """Whether a run's training hours come from wall-clock intervals: a run resumed before its CPU time
    was counted. Those include any pause (a grid stopped with SIGSTOP while CI ran) and the load of other
    work: the first E2E-50 prefix run's read 1.15 h for 120 steps, where E2E-100's 150 took 0.46 h in one
    session."""
    return train.get("train_cpu_seconds") is None and training_seconds(train) > train["wall_seconds"]


def _likeness(run: Run) -> tuple[tuple, ...]:
    """The tags of runs like ``run``, most alike first: same task, method, training size and learning
    rate (a higher rate tends to stop sooner); task, method and size; task and method; task."""
    return ((run.task, run.method, run.train_examples, run.lr), (run.task, run.method, run.train_examples),
            (run.task, run.method), (run.task,))


def expected_hours(state: dict[str, list[Run]], ledger_dir: str | Path, runs_dir: str | Path | None = None
                   ) -> tuple[dict[str, float], dict[str, float | None]]:
    """(CPU hours of each finished run, expected hours of one thread for each other run). A run is expected
    to take the mean training of the finished runs most like it (``_likeness``), plus each of its test
    decodings as that decoding took on the finished runs most like it that did it, each in one thread's
    hours (``one_thread``): a whole-run mean would mix runs with a test decoding and runs without one (the
    learning-rate grid's) and so under-count the first. A run stopped unfinished trains for at least what
    its attempts were seen to need (``unfinished_hours``, CPU hours as noted: on 2 threads an over-count,
    the safe side for a lower bound). A resumed run from before CPU time was counted
    (``_timed_by_the_clock``) does not count for training. None where no like run trained or did one of
    its decodings.

    With ``runs_dir`` (this machine's training scratch), a run counts only what is left of it here: its
    test decodings if its trained weights are here, less what its training checkpoint holds
    (``ledger.hours_behind``) if one is. Without it, or on another machine, a run left half done is
    trained again with all its decodings (the ledger keeps no weights)."""
    results = {r.key(): ledger_mod.read(ledger_dir, r.key(), items=False) for r in state["done"]}
    spent = {k: hours(result) for k, result in results.items()}
    by = {}  # (likeness tag, "train" or a test decoding's key) -> hours of the finished runs
    for r in state["done"]:
        result = results[r.key()]
        parts = {k: one_thread(decode_hours(e), e.get("threads")) for k, e in result["evals"].items()}
        if not _timed_by_the_clock(result["train"]):
            parts["train"] = one_thread(train_hours(result), result["train"].get("threads"))
        for tag in _likeness(r):
            for part, h in parts.items():
                by.setdefault((tag, part), []).append(h)

    def like(run: Run, part: str) -> float | None:
        found = next((by[tag, part] for tag in _likeness(run) if (tag, part) in by), None)
        return sum(found) / len(found) if found else None

    guess = {}
    for r in state["running"] + state["todo"] + state["waiting"]:
        train, decodings = like(r, "train"), {ev.key(): like(r, ev.key()) for ev in r.evals}
        stopped = ledger_mod.unfinished_hours(ledger_dir, r.key())
        if stopped is not None and train is not None:  # at least what it was seen to need; not more (a larger
            train = max(train, stopped)  # guess could keep a run that fits in a session from ever starting)
        out = None if runs_dir is None else Path(runs_dir) / r.key()
        trained = None if runs_dir is None else trained_here(r.key(), runs_dir, ledger_dir)
        if trained:  # its missing decodings are left
            train, decodings = 0.0, {k: h for k, h in decodings.items() if k not in trained["evals"]}
        elif out is not None and train is not None and (progress := training_progress(out)) is not None:
            train = max(0.0, train - ledger_mod.hours_behind(ledger_dir, r.key(), progress[0]))
        if train is None or None in decodings.values():
            guess[r.key()] = None if stopped is None else max(UNKNOWN_HOURS, stopped)
        else:
            guess[r.key()] = train + sum(decodings.values())
    return spent, guess


# With a deadline, a run starts only if SLACK x its expected CPU hours fit in the wall-clock hours left
# (a niced process shares its core; the same kind of run varies with early stopping), a run of a kind
# that has never finished counting as UNKNOWN_HOURS: about what a WebNLG prefix or a summarization run
# should take (README, 'Cost'), and small enough that such a run can start in a 3-hour session (a larger
# guess would keep a new kind from ever starting).
SLACK = 1.25
UNKNOWN_HOURS = 1.5


def speedup(threads: int) -> float:
    """How much sooner a run ends with ``threads`` threads than with one (expected hours are of one
    thread): 1.65x with 2, measured on a WebNLG prefix run's training steps (2026-12-01, AMD EPYC, 3.2
    against 5.2 s per step); more threads are assumed to add as much each."""
    return 1 + 0.65 * (max(1, threads) - 1)


def one_thread(cpu_hours: float, threads: int | None) -> float:
    """The hours one thread needs for work that took ``cpu_hours`` of CPU time on ``threads`` threads: those
    keep every thread busy (CPU time is about threads x wall time; a waiting thread spins) but end only
    ``speedup(threads)`` times sooner, so a 2-thread run's CPU hours are 1.2x one thread's for the same work."""
    threads = max(1, threads or 1)
    return cpu_hours * speedup(threads) / threads


def fits(todo: list[Run], expected: dict[str, float | None], hours_left: float, threads: int = 1) -> list[Run]:
    """The runs of ``todo`` (in order) expected to end within ``hours_left`` on ``threads`` threads."""
    return [r for r in todo if SLACK * (expected.get(r.key()) or UNKNOWN_HOURS) / speedup(threads) <= hours_left]


# A carried-over run starts only with this much time left: loading the model and (on a fresh start) the
# dev loss before training take a few minutes of a one-thread run.
CARRY_OVER_MIN_HOURS = 0.1


def to_carry_over(todo: list[Run], expected: dict[str, float | None], runs_dir: str | Path, ledger_dir: str | Path) -> Run:
    """The run to train until the deadline when none of ``todo`` fits: one already begun on this machine
    (a training checkpoint, or trained weights with test decodings left), the one with the least left, so
    that the hours put in go to as few runs as possible and each finishes sooner; else the one expected to
    take longest (the first of equals), since shorter runs fit in a session of their own."""
    def left(r: Run) -> float:
        return expected.get(r.key()) or UNKNOWN_HOURS

    def begun(r: Run) -> bool:
        return (Path(runs_dir) / r.key() / "checkpoint").is_dir() or trained_here(r.key(), runs_dir, ledger_dir) is not None

    started = [r for r in todo if begun(r)]
    return min(started, key=left) if started else max(todo, key=left)


class StopAtDeadline:
    """SIGINT to this process at ``deadline`` (a ``time.time()`` value), as Ctrl-C: a training then stops at
    the end of its step with an exact checkpoint (``train.StopAtStepEnd``), anything else at once (a test
    decoding keeps its finished batches). ``fired`` tells the deadline's SIGINT from another one."""

    def __init__(self, deadline: float):
        self.deadline, self.fired, self._previous = deadline, False, None

    def _handle(self, signum, frame):
        self.fired = True
        signal.raise_signal(signal.SIGINT)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGALRM, self._handle)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.deadline - time.time()))
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        return False


def parse_deadline(text: str, now: datetime.datetime | None = None) -> float:
    """``HH:MM`` (the next such local time) or ``+MINUTES`` (from now), as a ``time.time()`` value."""
    now = now or datetime.datetime.now()
    try:
        if text.startswith("+"):
            return (now + datetime.timedelta(minutes=float(text[1:]))).timestamp()
        clock = datetime.datetime.strptime(text, "%H:%M").time()
    except ValueError:
        raise ValueError(f"deadline {text!r}: expected HH:MM (e.g. 17:30) or +MINUTES (e.g. +150)") from None
    at = datetime.datetime.combine(now.date(), clock)
    return (at if at > now else at + datetime.timedelta(days=1)).timestamp()


def estimate(state: dict[str, list[Run]], ledger_dir: str | Path, scale: Scale | None = None,
             runs_dir: str | Path | None = None) -> dict:
    """Hours spent on the finished runs, and an estimate for the others from the finished runs most like
    them, per run under "expected" (``expected_hours``: what is left of them, with ``runs_dir``). With
    ``scale``, also per experiment ("experiments"): a run shared by several counts under the first of them
    in the grid's order."""
    spent, guess = expected_hours(state, ledger_dir, runs_dir)

    def total(keys) -> dict:
        left = [guess[k] for k in keys if k in guess]
        return {"done": sum(k in spent for k in keys), "left": len(left), "done_hours": sum(spent.get(k, 0) for k in keys),
                "left_hours": sum(h for h in left if h is not None), "left_unknown_runs": sum(h is None for h in left)}

    out = {**total(list(spent) + list(guess)), "expected": guess}
    if scale is not None:
        scale, owned = resolve_lrs(scale, ledger_dir), set()
        out["experiments"] = {}
        for name in ("lr-grid", "low-data", *LATER):
            keys = [k for k in dict.fromkeys(r.key() for r in module(name).plan(scale)) if k not in owned]
            owned.update(keys)
            out["experiments"][name] = total(keys)
    return out


# Handing over cores: SIGUSR1 to the process that holds a running run's lock (``ledger.holder``), one
# signal per thread given. The receiver adds a thread at once (Python handles a signal in the
# main thread between two operations, where torch's thread count applies) and to every model it loads
# after (``runs.extra_threads``). More threads change only the order of float sums, as resuming a run on
# another machine does. Only a process that catches SIGUSR1 is signalled: the signal's default action
# is to terminate (a process of an older version, or ``prefixtune experiment NAME``, holds locks too).
def take_a_core(signum=None, frame=None) -> None:
    """SIGUSR1 handler of a grid process: one more torch thread, up to this process's cores."""
    if torch.get_num_threads() < len(os.sched_getaffinity(0)):
        runs_mod.extra_threads += 1
        torch.set_num_threads(torch.get_num_threads() + 1)


def catches_sigusr1(pid: int) -> bool:
    """Whether process ``pid`` handles SIGUSR1 (Linux: its SigCgt mask in /proc); False where unknown."""
    try:
        caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)


def hand_over_cores(running: list[Run], runs_dir: str | Path, threads: int) -> list[int]:
    """Give ``threads`` threads, one at a time and in turn, to the grid processes running ``running``;
    returns the pid that got each."""
    pids = []
    for run in running:
        pid = ledger_mod.holder(runs_dir, run.key())
        if pid is not None and pid != os.getpid() and pid not in pids and catches_sigusr1(pid):
            pids.append(pid)
    given = []
    for i in range(threads if pids else 0):
        try:
            os.kill(pids[i % len(pids)], signal.SIGUSR1)
        except OSError:  # it ended meanwhile
            continue
        given.append(pids[i % len(pids)])
        time.sleep(0.5)  # signals of one kind do not queue: let it handle this one first
    return given


def run_grid(scale: Scale, runs_dir: str | Path = "runs/experiments", results_dir: str | Path = "results", data=None,
             threads: int | None = None, commit: bool = False, max_runs: int | None = None, poll_seconds: float = 60,
             names: tuple[str, ...] = NAMES, readme: str | Path | None = "README.md", deadline: float | None = None,
             carry_over: bool = False) -> int:
    """Work on the grid until nothing is left that this process can do (``deadline``, a ``time.time()``
    value: nothing that is expected to end before it; with ``carry_over``, then train one more run until
    the deadline, see ``to_carry_over``); returns the number of runs it finished."""
    honour_sigint()
    if threads and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, take_a_core)  # cores handed over by a process that stopped
    ledger_dir = Path(results_dir) / "ledger"
    broken: set[str] = set()  # runs that failed in this process (not retried until the next start)
    finished = 0
    while max_runs is None or finished < max_runs:
        state = status(scale, runs_dir, ledger_dir, names)
        todo = [r for r in state["todo"] if r.key() not in broken]
        if not todo:
            if state["running"]:  # another process may finish a run that unblocks others: wait for it
                time.sleep(poll_seconds)
                continue
            if state["waiting"]:
                print(f"grid: {len(state['waiting'])} runs wait for learning-rate grid runs that failed or are missing; "
                      "see runs/experiments/*/error.txt")
            break
        run = todo[0]
        if deadline is not None:
            left = (deadline - time.time()) / 3600
            expected = expected_hours(state, ledger_dir, runs_dir)[1]
            now_threads = (threads or 1) + runs_mod.extra_threads
            ready = fits(todo, expected, left, now_threads)
            if not ready:
                shortest = SLACK * min(expected.get(r.key()) or UNKNOWN_HOURS for r in todo) / speedup(now_threads)
                print(f"grid: none of the {len(todo)} runs to do is expected to end before the deadline "
                      f"({max(left, 0):.2f} h left; the shortest needs ~{shortest:.2f} h with slack on {now_threads} "
                      "thread(s))", flush=True)
                if carry_over and left >= CARRY_OVER_MIN_HOURS and threading.current_thread() is threading.main_thread():
                    run = to_carry_over(todo, expected, runs_dir, ledger_dir)
                    print(f"grid: carrying over {run.label()} ({run.key()}, ~{expected.get(run.key()) or UNKNOWN_HOURS:.2f} h "
                          f"left): training it until the deadline, for a later session on this machine to resume", flush=True)
                    try:
                        ended = _carry_over(run, runs_dir, ledger_dir, data, threads, commit, deadline)
                    except Exception:  # noted in its error.txt: another one
                        broken.add(run.key())
                        continue
                    if ended:
                        finished += 1
                        write_reports(scale, results_dir, commit, names=names, readme=readme)
                    if ended is not False:  # finished before the deadline, or held by another process: go on
                        continue
                    break
                print("grid: stopping", flush=True)
                if threads:
                    given = hand_over_cores(state["running"], runs_dir, threads + runs_mod.extra_threads)
                    if given:
                        print(f"grid: handed {len(given)} thread(s) to process(es) {', '.join(map(str, sorted(set(given))))}, "
                              "still running a run", flush=True)
                break
            if ready[0] is not run:
                print(f"grid: {run.label()} (~{expected.get(run.key()) or UNKNOWN_HOURS:.2f} h) would not end before the "
                      f"deadline ({left:.2f} h left): taking a shorter run", flush=True)
            run = ready[0]
        print(f"grid: {len(state['done'])} done, {len(state['running'])} running elsewhere, {len(todo)} to do, "
              f"{len(state['waiting'])} waiting; now {run.label()} ({run.key()})", flush=True)
        try:
            result = work_on(run, runs_dir, ledger_dir, data, threads, commit)
        except Exception:
            broken.add(run.key())
            continue
        if result is None:  # taken by another process between the status and the lock: next one
            continue
        finished += 1
        # reports after every run; committed every 10 runs (and at the end), to keep PNG churn out of the history
        write_reports(scale, results_dir, commit and finished % 10 == 0, names=names, readme=readme)
    return finished


def work_on(run: Run, runs_dir: str | Path, ledger_dir: Path, data, threads: int | None, commit: bool) -> dict | None:
    """Train and score ``run`` (``run_one``); None where another process holds it. Stopped by SIGINT: notes
    in the ledger the CPU hours it had taken and how far its training got, then raises KeyboardInterrupt.
    A failure is written to its error.txt and raised."""
    before = ledger_mod.read(ledger_dir, run.key(), items=False) or {}
    resumed = (Path(runs_dir) / run.key() / "checkpoint").is_dir()  # an earlier attempt's, on this machine
    cpu = time.process_time()
    try:
        result = run_one(run, Path(runs_dir), ledger_dir, data, threads, commit)
    except KeyboardInterrupt:
        hours_taken = (time.process_time() - cpu) / 3600
        path = ledger_mod.note_unfinished(ledger_dir, run.key(), hours_taken,
                                          datetime.datetime.now().isoformat(timespec="minutes"), resumed,
                                          training_progress(Path(runs_dir) / run.key()))
        print(f"grid: {run.label()} stopped unfinished after {hours_taken:.2f} CPU hours (noted in {path})", flush=True)
        if commit:
            ledger_mod.commit([path], f"ledger: {run.label()} ({run.key()}) stopped unfinished after {hours_taken:.2f} CPU-h")
        raise
    except Exception as e:
        failed(run, Path(runs_dir), e)
        raise
    if result is not None:
        did = "evaluated" if "train" in before and not result.get("retrained") else "trained"
        print(f"grid: finished {run.key()} {did} {run.label()}", flush=True)
    return result


def _carry_over(run: Run, runs_dir, ledger_dir: Path, data, threads, commit: bool, deadline: float) -> bool | None:
    """Work on ``run`` until ``deadline`` (``StopAtDeadline``): True if it finished before it, None if another
    process holds it, False if it was stopped there. A SIGINT other than the deadline's, or a failure, is raised."""
    with StopAtDeadline(deadline) as stop:
        try:
            return None if work_on(run, runs_dir, ledger_dir, data, threads, commit) is None else True
        except KeyboardInterrupt:
            if not stop.fired:
                raise
            print(f"grid: deadline: {run.label()} stopped; a later session on this machine resumes it", flush=True)
    return False


def honour_sigint() -> None:
    """Make SIGINT stop this process (gracefully during training, see StopAtStepEnd) even when it was
    started in the background: a shell starts background jobs with SIGINT ignored, and Python then
    keeps ignoring it outside training, so ``kill -INT`` during a test decoding did nothing. A grid
    process is meant to run in the background and be stopped that way."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def write_reports(scale: Scale, results_dir: str | Path, commit: bool = False,
                  command: str = "prefixtune experiment grid --threads 1", readme: str | Path | None = "README.md",
                  names: tuple[str, ...] = NAMES) -> list[Path]:
    """The reports of ``names`` and the README's verdict table, from the ledger (a failing report is
    printed, never stops the grid)."""
    paths = []
    for name in names:
        try:
            paths.append(write_report(name, scale, results_dir, command))
        except Exception:
            print(f"grid: the {name} report failed:\n{traceback.format_exc()}")
    if readme and Path(readme).is_file():
        update_readme(results_dir, readme)
    if commit and paths:
        files = [p for p in Path(results_dir).iterdir() if p.name.startswith(tuple(f"{n}." for n in NAMES) + tuple(f"{n}-" for n in NAMES))]
        ledger_mod.commit(files + ([Path(readme)] if readme and Path(readme).is_file() else []), "results: reports from the ledger")
    return paths


START, END = "<!-- verdicts: generated by prefixtune experiment --report-only; do not edit -->", "<!-- end of verdicts -->"


def verdict_table(results_dir: str | Path) -> str:
    """One table of every finding of every report (from results/NAME.json)."""
    import json

    from .report import table

    rows = []
    for name in NAMES:
        path = Path(results_dir) / f"{name}.json"
        if path.is_file():
            for f in json.loads(path.read_text()).get("findings", []):
                n = len(f.get("unconverged", []))
                still = f" ({n} run{'s' if n > 1 else ''} still improving at the step cap)" if n else ""
                rows.append([f"[{name}](results/{name}.md)", f["finding"], f["paper"], f"{f['measure']}: {f['ours']}",
                             f"**{f['verdict']}**{still}"])
    return table(["report", "finding", "paper", "ours (mean difference [95% CI])", "verdict"], rows) if rows else "(no findings yet)"


def update_readme(results_dir: str | Path, readme: str | Path = "README.md") -> bool:
    """Replace the README's generated verdict table (between the START and END markers); False if the
    file or its markers are absent (e.g. ``--report-only`` run outside the repository)."""
    if not Path(readme).is_file():
        return False
    text = Path(readme).read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_atomic(Path(readme), f"{head}{START}\n{verdict_table(results_dir)}\n{END}{tail}")
    return True
