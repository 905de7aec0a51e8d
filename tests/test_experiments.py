"""The experiment machinery on a tiny model: runs trained to their best dev score and recorded in the
ledger, reports regenerated from the ledger alone, the learning-rate grid read back, the lock that
dies with its process, two processes sharing one grid, and every report on an empty ledger."""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prefixtune.cli import main
from prefixtune.experiments import NAMES, LR_GRID, Scale, module, resolve_lrs, run_experiment, write_report
from prefixtune.experiments import grid, ledger
from prefixtune.experiments import runs as runs_mod
from prefixtune.experiments.runs import Eval, Run, run_one, xsum_topic
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch_size=2, summary_batch_size=2, max_epochs=1, summary_max_epochs=1, min_steps=3, min_eval_steps=1,
            eval_epochs=1, patience=1, dev_examples=4, summary_dev_examples=2, dev_score_examples=3, test_examples=3,
            summary_test_examples=2, train_size=4, arithmetic_cell=4, train_sizes=(4,), init_sizes=(4,), samplings=1,
            seeds=1, methods=("prefix", "finetune"), lr_grid={"prefix": (1e-2, 5e-2), "finetune": (1e-3,)},
            lr_grid_extra=0, max_source_tokens=24)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


GRID_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_experiments import TINY
from prefixtune.experiments import Scale, grid
grid.run_grid(Scale(**TINY, model={model!r}), {runs!r}, {results!r}, threads=1, poll_seconds=1,
              names=("lr-grid", "low-data"), readme=None)
"""


@pytest.fixture(scope="module")
def low_data(tmp_path_factory, tiny_dir):
    """The learning-rate grid and the low-data experiment on the tiny model, worked on by two processes
    at once, as on two cores: 5 runs (2 grid runs of the prefix, 1 of fine-tuning, which are also the
    low-data pair, and the pair in the other arithmetic). Returns (root, scale, report, finished keys
    per process)."""
    root = tmp_path_factory.mktemp("grid")
    script = GRID_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), model=tiny_dir, runs=str(root / "runs"),
                                results=str(root / "results"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    first = grid.order(Scale(**TINY, model=tiny_dir), names=("lr-grid", "low-data"))[0]
    ledger.note_unfinished(root / "results" / "ledger", first.key(), 0.1, "2026-12-01T09:40")  # an earlier attempt
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    # per process, the runs it trained (a run trained by one process may be evaluated by the other later)
    done = [{line.split()[2] for line in out.splitlines() if line.startswith("grid: finished") and line.split()[3] == "trained"}
            for out in outs]
    return root, Scale(**TINY, model=tiny_dir), root / "results" / "low-data.md", done


def test_two_processes_share_one_grid_without_doing_a_run_twice(low_data):
    root, _, _, done = low_data
    ledger_keys = {p.name for p in (root / "results" / "ledger").iterdir()}
    assert len(ledger_keys) == 5 and done[0] | done[1] == ledger_keys and not done[0] & done[1], done
    assert (root / "results" / "lr-grid.md").is_file()


def test_runs_go_to_the_ledger_with_their_dev_curve_and_test_outputs(low_data):
    root, scale, path, _ = low_data
    chosen = resolve_lrs(scale, root / "results" / "ledger").chosen_lr
    assert set(chosen) == {"prefix", "finetune"} and chosen["prefix"] in (1e-2, 5e-2) and chosen["finetune"] == 1e-3
    md = path.read_text()
    assert "Runs in the ledger: 4 of 4." in md and "**Protocol.**" in md
    assert "What differs from the paper" in md and "Verdict:" in md and "Arithmetic check" in md
    entries = sorted((root / "results" / "ledger").iterdir())
    assert len(entries) == 5  # 2 grid runs of the prefix, 1 of fine-tuning (= the low-data pair), 2 in float32
    assert not list((root / "results" / "ledger").glob("*/unfinished.json"))  # the note of an earlier attempt: gone once done
    tested = 0
    for entry in entries:
        result = json.loads((entry / "result.json").read_text())
        run = Run(**result["run"])
        assert run.key() == entry.name and not list(entry.glob("*.safetensors"))  # no weights in the ledger
        train = result["train"]
        assert train["dev_curve"][0]["step"] == 0 and train["best_step"] in [h["step"] for h in train["dev_curve"]]
        assert train["selected_by"] == "dev_score" and train["min_dev_loss"] is not None
        assert 0 < train["cpu_seconds_per_step"] * train["steps"] < train["train_cpu_seconds"]  # steps + evaluations
        for ev in result["evals"].values():
            tested += 1
            assert len((entry / ev["outputs_file"]).read_text().splitlines()) == ev["n"] == 3
            items = [json.loads(line) for line in (entry / ev["items_file"]).read_text().splitlines()]
            assert len(items) == 3 and set(items[0]) == {"BLEU", "SER"}
            assert {"BLEU", "METEOR", "SER"} <= set(ev["scores"]["A"])
    assert tested == 4
    assert not list((root / "runs").glob("*/checkpoint"))  # scratch kept only while a training is unfinished...
    assert not list((root / "runs").glob("*/decoding-*.jsonl"))  # ...or a test decoding


def test_report_only_from_a_fresh_clone_is_identical_and_lists_missing_runs(low_data, tmp_path):
    root, scale, path, _ = low_data
    fresh = tmp_path / "clone" / "results"
    shutil.copytree(root / "results" / "ledger", fresh / "ledger")  # what a clone has: the ledger, no runs/
    command = "prefixtune experiment grid --threads 1"
    again = write_report("low-data", scale, fresh, command)
    assert again.read_text() == path.read_text()
    stamp = {p: p.stat().st_mtime_ns for p in (root / "results" / "ledger").rglob("*")}
    run_experiment("low-data", scale, runs_dir=root / "runs", results_dir=root / "results", command=command)  # nothing to do
    assert {p: p.stat().st_mtime_ns for p in (root / "results" / "ledger").rglob("*")} == stamp
    victim = next(p for p in (fresh / "ledger").iterdir() if json.loads((p / "result.json").read_text())["run"]["autocast"] is False)
    shutil.rmtree(victim)
    md = write_report("low-data", scale, fresh, command).read_text()
    assert "Runs in the ledger: 3 of 4." in md and f"(`{victim.name}`): not in the ledger yet\n" in md
    # begun elsewhere: stopped at the end of two sessions, the second going on from the first's checkpoint
    ledger.note_unfinished(fresh / "ledger", victim.name, 0.25, "2026-12-03T09:25", progress=(40, 120))
    ledger.note_unfinished(fresh / "ledger", victim.name, 0.5, "2026-12-04T09:25", resumed=True, progress=(120, 200))
    md = write_report("low-data", scale, fresh, command).read_text()
    assert (f"(`{victim.name}`): not in the ledger yet; begun: stopped unfinished at step 120 (of 200 or more) after "
            "0.75 CPU-h (its checkpoint is on the machine that ran it)\n") in md
    state = grid.status(scale, tmp_path / "runs", fresh / "ledger", names=("lr-grid", "low-data"))
    assert [r.key() for r in state["todo"]] == [victim.name] and not state["waiting"] and len(state["done"]) == 4


def test_a_run_waits_for_its_learning_rate(tmp_path):
    scale = resolve_lrs(Scale(), tmp_path / "ledger")
    low = module("low-data").plan(scale)
    assert low and all(r.lr is None for r in low)
    md = write_report("low-data", scale, tmp_path, "cmd").read_text()
    assert "wait for the learning-rate grid" in md and "Verdict: runs missing" in md
    # explicit rates need no grid
    assert all(r.lr == 2e-4 for r in module("low-data").plan(Scale(lr={"prefix": 2e-4, "finetune": 2e-4})))


def test_lock_dies_with_its_process(tmp_path, tiny_dir):
    run = Run("e2e", lr=1e-3, model=tiny_dir)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from prefixtune.experiments import ledger
        with ledger.lock({str(tmp_path)!r}, {run.key()!r}) as got:
            print(got, flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert ledger.is_locked(tmp_path, run.key())
        with ledger.lock(tmp_path, run.key()) as got:
            assert not got
        assert run_one(run, tmp_path, tmp_path / "ledger", None, None) is None  # not trained twice
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel must release the lock
        holder.wait()
    assert not ledger.is_locked(tmp_path, run.key())
    with ledger.lock(tmp_path, run.key()) as got:
        assert got


def test_experiments_share_runs():
    scale = Scale(chosen_lr={k: v[1] for k, v in LR_GRID.items()})
    t2t = {r.key() for r in module("table-to-text").plan(scale)}
    grid_runs = module("lr-grid").plan(scale)
    assert {r.key() for r in grid_runs if r.lr == scale.chosen_lr[r.method if r.method != "adapter" else
            f"adapter-{100 * r.size:g}"]} <= t2t
    lengths = {r.key() for r in module("prefix-length").plan(scale)}
    assert len(t2t & lengths) == scale.seeds  # the length-10 E2E prefix
    order = grid.order(scale)
    assert len({r.key() for r in order}) == len(order) and order[0].method == "prefix"
    assert {r.key() for r in order} == {r.key() for n in NAMES for r in module(n).plan(scale)}  # every run, once
    low = {r.key() for r in module("low-data").plan(scale)}
    first = {n: min(i for i, r in enumerate(order) if r in module(n).plan(scale) and r.key() not in low)
             for n in ("extrapolation", "initialisation")}
    assert first["extrapolation"] < first["initialisation"]  # the headline claims first (word inits after)
    # breadth first: one run per cell of every experiment before any second round (low data's included)
    position = {r.key(): i for i, r in enumerate(order)}
    second = min(position[r.key()] for n in NAMES for r in module(n).plan(scale) if (r.sampling, r.seed) != (0, 0))
    firsts = [r for n in NAMES for r in module(n).plan(scale) if (r.sampling, r.seed) == (0, 0)]
    assert {n for n in NAMES if any(r in module(n).plan(scale) for r in firsts)} == set(NAMES)
    assert max(position[r.key()] for r in firsts) < second


def test_every_report_and_the_readme_table_from_an_empty_ledger(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{grid.START}\nold\n{grid.END}\n\nafter\n")
    grid.write_reports(Scale(), tmp_path, readme=readme)
    for name in NAMES:
        md = (tmp_path / f"{name}.md").read_text()
        assert md.startswith("# ") and "Runs in the ledger: 0 of" in md
    text = readme.read_text()
    assert "old" not in text and "after" in text and "| [low-data](results/low-data.md) |" in text and "runs missing" in text
    assert not grid.update_readme(tmp_path, tmp_path / "absent.md")  # --report-only outside the repository
    assert "## E2E test set: all 630 E2E test tables" in (tmp_path / "table-to-text.md").read_text()
    sample = write_report("table-to-text", Scale(test_examples=3), tmp_path / "sample", "cmd").read_text()
    assert "## E2E test set: a fixed random 3 of the 630 E2E test tables" in sample and "all 630" not in sample


def test_xsum_topics_from_the_text():
    assert xsum_topic("The striker scored a late goal as the league leaders won the match; the manager praised "
                      "his squad.") == "sport"
    assert xsum_topic("The government said the new housing policy would help families in Wales.") == "news"


def test_experiment_cli_validates_and_explains(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ledger" in out and "95% bootstrap" in out  # the description is printed as written (no %-escapes)
    assert main(["experiment", "table-to-text", "--methods", "prefix", "dance", "--report-only"]) == 2
    assert "unknown method 'dance'" in capsys.readouterr().err
    for argv, message in ((["low-data", "--lr", "prefix"], "--lr wants METHOD=VALUE"),
                          (["low-data", "--lr", "prefix=fast"], "--lr wants METHOD=VALUE"),
                          (["low-data", "--lr", "prefix=0"], "--lr wants METHOD=VALUE"),
                          (["low-data", "--lr", "dance=1e-4"], "--lr wants METHOD=VALUE"),
                          (["low-data", "--deadline", "+60"], "--deadline is for running the grid"),
                          (["grid", "--deadline", "tonight"], "--deadline 'tonight': expected HH:MM"),
                          (["grid", "--carry-over"], "--carry-over goes with --deadline")):
        assert main(["experiment", *argv]) == 2
        assert f"prefixtune experiment: error: {message}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "grid", "--status"]) == 0
    out = capsys.readouterr().out
    assert "done: 0" in out and "todo: 27" in out and "waiting" in out
    assert "  lr-grid           0 done (  0.0 h)   27 left (~0.0 h + 27 runs of kinds not run yet)" in out
    first = grid.status(Scale(), "runs/experiments", "results/ledger")["todo"][0]
    ledger.note_unfinished("results/ledger", first.key(), 0.5, "2026-12-01T09:40")
    assert main(["experiment", "grid", "--status"]) == 0
    out = capsys.readouterr().out  # each run with the CPU hours it is expected to take (? where unknown: here
    # UNKNOWN_HOURS for the noted run, more than the 0.5 h it took)
    assert f"  todo     {first.key()}  ~{grid.UNKNOWN_HOURS:.2f}h  {first.label()}  (stopped unfinished: its training needs at least 0.50 CPU-h)" in out
    begun = tmp_path / "runs" / "experiments" / first.key()  # its checkpoint is here (a machine that is kept)
    (begun / "checkpoint").mkdir(parents=True)
    (begun / "run.json").write_text(json.dumps({"train": {"patience": 3, "eval_every": 100, "max_steps": 1000},
                                                "method": {"method": "prefix"}, "prefix": {"length": 10}}))
    (begun / "checkpoint" / "state.json").write_text(json.dumps({"step": 250, "history": [{"step": 200, "dev_loss": 1.0}]}))
    assert main(["experiment", "grid", "--status"]) == 0
    assert "0.50 CPU-h)  (checkpoint here: step 250, ends at step 500 or later)" in capsys.readouterr().out
    assert sum(line.startswith("  todo") and "     ?  e2e/" in line for line in out.splitlines()) == 26


def test_a_deadline_starts_only_runs_expected_to_end_before_it(tmp_path, monkeypatch, capsys):
    """With a deadline the grid skips a run that would not end in time for a later, shorter one, counts a run
    of a kind that never finished as UNKNOWN_HOURS, and stops when nothing fits (a session whose machine is
    not kept would lose the run in progress)."""
    scale = Scale(**TINY)
    first, second, third = grid.status(scale, tmp_path / "runs", tmp_path / "ledger", names=("lr-grid",))["todo"]
    expected = {first.key(): 1.0, second.key(): 0.2, third.key(): None}
    monkeypatch.setattr(grid, "expected_hours", lambda state, ledger_dir, runs_dir=None: ({}, expected))
    monkeypatch.setattr(grid, "write_reports", lambda *a, **k: [])
    started = []
    monkeypatch.setattr(grid, "run_one", lambda run, *a, **k: started.append(run.key()) or {"evals": {}})

    def work(hours_left):
        started.clear()
        n = grid.run_grid(scale, tmp_path / "runs", tmp_path, names=("lr-grid",), readme=None, max_runs=1,
                          deadline=time.time() + hours_left * 3600)
        return n, started[:], capsys.readouterr().out

    assert work(3.0)[:2] == (1, [first.key()])  # time for all: the grid's order
    n, done, out = work(0.5)  # 1.25 x 1.0 h does not fit, 1.25 x 0.2 h does
    assert (n, done) == (1, [second.key()]) and "would not end before the deadline" in out
    assert grid.fits([first, second, third], expected, 1.8) == [first, second]  # unknown: 1.25 x 1.5 h > 1.8 h
    assert grid.fits([first, second, third], expected, 1.9) == [first, second, third]
    assert grid.fits([first, second, third], expected, 1.2, threads=2) == [first, second, third]  # 1.875 h / 1.65
    n, done, out = work(0.2)
    assert (n, done) == (0, []) and "grid: none of the 3 runs to do" in out and "grid: stopping" in out and "~0.25 h" in out


def test_the_run_carried_over_is_one_begun_here_else_the_longest(tmp_path):
    """Past the last run that fits, a process carries over the run begun on this machine with the least
    left (a training checkpoint, or trained weights whose test decodings are left); none begun: the
    longest (the first of equals), since shorter ones fit in a session of their own."""
    scale = Scale(**TINY)
    a, b, c = grid.status(scale, tmp_path / "runs", tmp_path / "ledger", names=("lr-grid",))["todo"]
    expected = {a.key(): 1.0, b.key(): 3.0, c.key(): None}
    assert grid.to_carry_over([a, b, c], expected, tmp_path / "runs", tmp_path / "ledger") is b
    assert grid.to_carry_over([a, c], expected, tmp_path / "runs", tmp_path / "ledger") is c  # unknown: 1.5 h
    (tmp_path / "runs" / a.key() / "checkpoint").mkdir(parents=True)
    (tmp_path / "runs" / c.key() / "checkpoint").mkdir(parents=True)
    assert grid.to_carry_over([a, b, c], expected, tmp_path / "runs", tmp_path / "ledger") is a


def test_a_carried_over_run_that_fails_is_left_for_another(tmp_path, monkeypatch, capsys):
    """A carried-over run that fails (noted in its error.txt) does not end the process's work: it carries
    over the next one until the deadline."""
    scale = Scale(**TINY)
    monkeypatch.setattr(grid, "CARRY_OVER_MIN_HOURS", 0.0)
    monkeypatch.setattr(grid, "write_reports", lambda *a, **k: [])
    monkeypatch.setattr(grid, "expected_hours", lambda state, ledger_dir, runs_dir=None: ({}, {}))  # none fits
    tried = []

    def run_one(run, *a, **k):
        tried.append(run.key())
        if len(tried) == 1:
            raise RuntimeError("out of memory")
        time.sleep(30)  # until the deadline's SIGINT

    monkeypatch.setattr(grid, "run_one", run_one)
    start = time.time()
    assert grid.run_grid(scale, tmp_path / "runs", tmp_path, names=("lr-grid",), readme=None, deadline=start + 2,
                         carry_over=True) == 0
    out = capsys.readouterr().out
    assert len(set(tried)) == 2 and out.count("grid: carrying over") == 2 and "grid: deadline:" in out
    assert "out of memory" in (tmp_path / "runs" / tried[0] / "error.txt").read_text() and time.time() - start < 10


def test_a_carried_over_run_stops_at_the_deadline_with_an_exact_checkpoint_and_resumes(tmp_path, tiny_dir, monkeypatch, capsys):
    """With carry_over, a process with no run that fits trains one anyway and stops it at the deadline at the
    end of a step (noted unfinished, with its progress); the next session resumes it, and its dev curve and
    test outputs are those of a run trained straight through."""
    scale = Scale(**{**TINY, "min_steps": 300, "eval_epochs": 75, "patience": 0}, model=tiny_dir, lr={"prefix": 1e-2})
    run = grid.status(scale, tmp_path / "a", tmp_path / "ledger", names=("low-data",))["todo"][0]
    assert run.method == "prefix" and run.evals  # trained, then decoded
    monkeypatch.setattr(grid, "CARRY_OVER_MIN_HOURS", 0.0)
    monkeypatch.setattr(grid, "write_reports", lambda *a, **k: [])
    monkeypatch.setattr(grid, "expected_hours", lambda state, ledger_dir, runs_dir=None: ({}, {run.key(): 5.0}))
    monkeypatch.setattr(grid, "status", lambda *a, _status=grid.status, **k: {**(s := _status(*a, **k)),
                                                                               "todo": [r for r in s["todo"] if r.key() == run.key()]})

    def work(out, deadline=None, carry_over=False):
        return grid.run_grid(scale, tmp_path / out, tmp_path / out, threads=1, names=("low-data",), readme=None,
                             deadline=deadline, carry_over=carry_over)

    assert work("a", deadline=time.time() + 5, carry_over=True) == 0
    out = capsys.readouterr().out
    assert f"grid: carrying over {run.label()}" in out and "interrupted after step" in out and "grid: deadline:" in out
    step, _ = grid.training_progress(tmp_path / "a" / run.key())
    assert 0 < step < 300
    attempts = json.loads((tmp_path / "a" / "ledger" / run.key() / "unfinished.json").read_text())["attempts"]
    assert [(a["steps"], a["least_steps"], a["resumed"]) for a in attempts] == [(step, 300, False)]
    assert work("a") == 1 and work("b") == 1  # resumed here; straight through elsewhere
    resumed, straight = (ledger.read(tmp_path / d / "ledger", run.key()) for d in "ab")
    assert resumed["train"]["steps"] == straight["train"]["steps"] == 300
    curve = [(h["step"], h["dev_loss"], h.get("dev_score")) for h in straight["train"]["dev_curve"]]
    assert len(curve) == 3 and [(h["step"], h["dev_loss"], h.get("dev_score")) for h in resumed["train"]["dev_curve"]] == curve

    def outputs(d, result):
        return {k: (tmp_path / d / "ledger" / run.key() / e["outputs_file"]).read_text() for k, e in result["evals"].items()}

    assert resumed["evals"] and outputs("a", resumed) == outputs("b", straight)


def test_a_run_stopped_unfinished_is_noted_and_expected_to_need_more(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or the end of a session) during a run: the ledger notes the CPU hours it had taken, and the
    grid then expects it to need at least that, so a deadline does not start it where it did not fit."""
    scale, names = Scale(**TINY), ("lr-grid",)
    first = grid.status(scale, tmp_path / "runs", tmp_path / "ledger", names=names)["todo"][0]

    def stopped(run, *args, **kwargs):
        clock.append(clock[-1] + 1800.0)  # half an hour of CPU, then Ctrl-C
        raise KeyboardInterrupt

    clock = [100.0]
    monkeypatch.setattr(grid, "run_one", stopped)
    monkeypatch.setattr(grid.time, "process_time", lambda: clock[-1])
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(scale, tmp_path / "runs", tmp_path, names=names, readme=None)
    assert f"grid: {first.label()} stopped unfinished after" in capsys.readouterr().out
    attempts = json.loads((tmp_path / "ledger" / first.key() / "unfinished.json").read_text())["attempts"]
    assert attempts == [{"cpu_hours": 0.5, "stopped": attempts[0]["stopped"], "resumed": False}]
    # stopped again, after going on from the first attempt's checkpoint: it was seen to need 0.5 + 0.5 h
    (tmp_path / "runs" / first.key() / "checkpoint").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(scale, tmp_path / "runs", tmp_path, names=names, readme=None)
    assert ledger.unfinished_hours(tmp_path / "ledger", first.key()) == 1.0
    # a longer attempt that started afresh (a new machine), then one going on from it
    ledger.note_unfinished(tmp_path / "ledger", first.key(), 2.0, "2026-12-01T09:40")
    assert ledger.unfinished_hours(tmp_path / "ledger", first.key()) == 2.0
    ledger.note_unfinished(tmp_path / "ledger", first.key(), 0.25, "2026-12-01T10:40", resumed=True)
    assert ledger.unfinished_hours(tmp_path / "ledger", first.key()) == 2.25
    state = grid.status(scale, tmp_path / "runs", tmp_path / "ledger", names=names)
    assert [r.key() for r in state["todo"]][0] == first.key()  # not done: it runs again when it fits
    expected = grid.expected_hours(state, tmp_path / "ledger")[1]
    assert expected[first.key()] == 2.25 and expected[state["todo"][1].key()] is None
    assert [r.key() for r in grid.fits(state["todo"], expected, 2.8)] == [r.key() for r in state["todo"][1:]]
    assert len(grid.fits(state["todo"], expected, 2.85)) == len(state["todo"])
    # stopped at step 400 while its dev score still rose (best at the last evaluation, at 375): it cannot end
    # before 3 more evaluations (at 750), so a fresh attempt needs at least 0.5 h x 750 / 400
    ledger.note_unfinished(tmp_path / "ledger", first.key(), 0.5, "2026-12-02T10:00", progress=(400, 750))
    assert ledger.unfinished_hours(tmp_path / "ledger", first.key()) == 2.25  # the longer chain still
    ledger.note_unfinished(tmp_path / "ledger", first.key(), 1.5, "2026-12-02T12:00", resumed=True, progress=(1600, 2000))
    assert ledger.unfinished_hours(tmp_path / "ledger", first.key()) == pytest.approx((0.5 + 1.5) * 2000 / 1600)


def test_the_fewest_steps_an_unfinished_training_can_end_at(tmp_path):
    """From the checkpoint: the last evaluation plus ``patience`` evaluations after the best, counting those
    already made; the step reached where it has stopped early; never past the cap."""
    from prefixtune.experiments.grid import training_progress

    assert training_progress(tmp_path) is None  # no checkpoint
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"train": {"patience": 3, "eval_every": 125, "max_steps": 1000}}))

    def progress(step, scores):
        history = [{"step": 0, "dev_loss": 3.0}] + [{"step": 125 * (i + 1), "dev_loss": 1.0, "dev_score": v}
                                                    for i, v in enumerate(scores)]
        (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"step": step, "history": history}))
        return training_progress(tmp_path)

    assert progress(413, [43.8, 50.9, 52.8]) == (413, 750)  # still rising: 3 more evaluations after 375
    assert progress(625, [40.0, 45.1, 47.7, 53.3, 52.0]) == (625, 875)  # one worse evaluation made: 2 more
    assert progress(750, [40.0, 45.1, 47.7, 53.3, 52.0, 51.0]) == (750, 875)
    assert progress(875, [40.0, 53.3, 47.7, 52.0, 51.0, 50.0, 49.0]) == (875, 875)  # stopped early
    assert progress(900, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == (900, 1000)  # the cap
    (tmp_path / "run.json").write_text(json.dumps({"train": {"patience": 0, "eval_every": 125, "max_steps": 1000}}))
    assert progress(413, [43.8, 50.9, 52.8]) == (413, 1000)  # no early stopping: only the cap ends it


def test_a_run_is_expected_to_take_its_like_runs_training_plus_each_of_its_test_decodings(tmp_path):
    """Training and each test decoding are estimated apart, each from the finished runs most like the run
    that did it: a learning-rate-grid run (no test decoding) lowers the training mean, not the decoding
    (a whole-run mean under-counted the E2E-500 runs that decode the test set by ~0.1 CPU-h). A run
    resumed before CPU time was counted does not count for training: its clock included pauses."""
    test, beam = Eval("e2e", n=12), Eval("e2e", n=12, num_beams=3)
    grid_run = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=0)  # training only
    tested = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=1, evals=(test,))
    fast = Run("e2e", "prefix", lr=1e-3, train_examples=500, seed=0)  # a higher rate, stopped sooner
    # resumed before CPU time was counted: its wall-clock intervals (paused, loaded) say 1.5 h
    paused = Run("e2e", "prefix", lr=1e-4, train_examples=50, seed=0, evals=(test,))
    for run, train, decodings in (
            (grid_run, {"wall_seconds": 1860.0, "cpu_seconds": 1800.0, "train_cpu_seconds": 1800.0}, {}),
            (fast, {"wall_seconds": 960.0, "cpu_seconds": 900.0, "train_cpu_seconds": 900.0}, {}),
            (tested, {"wall_seconds": 3660.0, "cpu_seconds": 3600.0, "train_cpu_seconds": 3600.0}, {test.key(): 720.0}),
            (paused, {"wall_seconds": 300.0, "cpu_seconds": 290.0, "train_seconds": 5400.0}, {test.key(): 720.0})):
        evals = {k: {"decode_cpu_seconds": s, "decode_seconds": s + 100} for k, s in decodings.items()}
        ledger.write(tmp_path, run.key(), {"run": run.training(), "train": train, "evals": evals})
    assert grid.hours(ledger.read(tmp_path, tested.key())) == 1.2 and grid.hours(ledger.read(tmp_path, paused.key())) == 1.7
    todo = {"same": Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=2, evals=(test,)),
            "smaller": Run("e2e", "prefix", lr=1e-4, train_examples=50, evals=(test,)),
            "other method": Run("e2e", "finetune", lr=1e-5, train_examples=500, evals=(test,)),
            "training only": Run("e2e", "prefix", lr=3e-4, train_examples=500),
            "new decoding": Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=3, evals=(test, beam)),
            "new task": Run("webnlg", "prefix", lr=1e-4, train_examples=500)}
    state = {"done": [grid_run, fast, tested, paused], "running": [], "todo": list(todo.values()), "waiting": []}
    spent, expected = grid.expected_hours(state, tmp_path)
    assert spent == {grid_run.key(): 0.5, fast.key(): 0.25, tested.key(): 1.2, paused.key(): 1.7}
    assert expected[todo["same"].key()] == pytest.approx((0.5 + 1.0) / 2 + 0.2)  # same rate: not the fast run
    any_rate = (0.5 + 0.25 + 1.0) / 3  # not the paused run's 1.5 h, even for a run of its size
    assert expected[todo["training only"].key()] == pytest.approx(any_rate)  # a rate not run yet
    for name in ("smaller", "other method"):  # like by task and method, else by task
        assert expected[todo[name].key()] == pytest.approx(any_rate + 0.2), name
    assert expected[todo["new decoding"].key()] is None and expected[todo["new task"].key()] is None



def test_a_run_counts_only_what_is_left_of_it_on_this_machine(tmp_path):
    """With the training scratch at hand (a session on the machine of the one before), a run is expected to
    take what is left: less the hours its checkpoint holds (the attempts that stopped at its step), or only
    its missing test decodings once its trained weights are here. Without it, the whole run."""
    test = Eval("e2e", n=12)
    like = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=0, evals=(test,))
    ledger.write(tmp_path / "ledger", like.key(), {"run": like.training(), "evals": {test.key(): {"decode_cpu_seconds": 720.0}},
                                                   "train": {"wall_seconds": 3700.0, "cpu_seconds": 3600.0, "train_cpu_seconds": 3600.0}})
    run = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=1, evals=(test,))
    state = {"done": [like], "running": [], "todo": [run], "waiting": []}
    runs, out = tmp_path / "runs", tmp_path / "runs" / run.key()

    def left(here=True):
        return grid.expected_hours(state, tmp_path / "ledger", runs if here else None)[1][run.key()]

    assert left() == left(here=False) == pytest.approx(1.2)  # nothing here: 1 h of training, 0.2 of decoding
    # stopped at step 400 after 0.25 + 0.25 h (the second attempt went on from the first's checkpoint)
    ledger.note_unfinished(tmp_path / "ledger", run.key(), 0.25, "2026-12-01T12:00", progress=(200, 300))
    ledger.note_unfinished(tmp_path / "ledger", run.key(), 0.25, "2026-12-01T13:00", resumed=True, progress=(400, 500))
    (out / "checkpoint").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"train": {"patience": 3, "eval_every": 100, "max_steps": 1000},
                                              "method": {"method": "prefix"}, "prefix": {"length": 10}}))

    def checkpoint(step):
        history = [{"step": 100 * i, "dev_loss": 1.0, "dev_score": 50.0 + i} for i in range(step // 100 + 1)]
        (out / "checkpoint" / "state.json").write_text(json.dumps({"step": step, "history": history}))

    checkpoint(400)
    assert ledger.hours_behind(tmp_path / "ledger", run.key(), 400) == 0.5
    assert left() == pytest.approx(1.2 - 0.5) and left(here=False) == pytest.approx(1.2)
    checkpoint(300)  # a checkpoint no noted attempt stopped at (a killed process): nothing known to be behind it
    assert left() == pytest.approx(1.2)
    # its dev score rose at every evaluation: 0.5 h for 400 steps and 700 to go, more than its like run
    ledger.note_unfinished(tmp_path / "ledger", run.key(), 0.5, "2026-12-01T14:00", resumed=True, progress=(800, 1000))
    checkpoint(800)
    assert left(here=False) == pytest.approx(1.0 * 1000 / 800 + 0.2) and left() == pytest.approx(1.25 - 1.0 + 0.2)
    # the best weights so far are kept during training: they do not make it trained
    (out / "prefix.safetensors").write_bytes(b"")
    assert left() == pytest.approx(0.45)
    # trained (in the ledger, weights here), its test decoding not done: the decoding is left
    ledger.write(tmp_path / "ledger", run.key(), {"run": run.training(), "evals": {}, "train": {"wall_seconds": 1.0}})
    assert left() == pytest.approx(0.2) and left(here=False) == pytest.approx(1.25 + 0.2)
    (out / "prefix.safetensors").unlink()  # trained on another machine: trained again here
    assert left() == pytest.approx(1.25 - 1.0 + 0.2)



def test_an_interrupted_test_decoding_goes_on_where_it_stopped(tmp_path, tokenizer, monkeypatch):
    """A test decoding keeps each batch's tokens as it ends: interrupted, it decodes only the batches it
    lacks (a batch cut short again), in the same batches, so its outputs are those of a decoding in one go."""
    import prefixtune

    model = tiny_model("llama-gqa", init_range=0.5)
    sources = [f"name[Place {i}], area[{'riverside' if i % 2 else 'city centre'}]" + " x" * (i % 3) for i in range(7)]
    monkeypatch.setattr(runs_mod, "DECODE_BATCH", 3)  # 3 batches: 3, 3 and 1 rows
    decoding = dict(num_beams=3, max_new_tokens=6)
    whole, _, _ = runs_mod.decode_batches(model, tokenizer, sources, tmp_path / "whole.jsonl", **decoding)
    assert whole == [g.tokens for g in prefixtune.generate(model, tokenizer, sources, batch_size=3, return_tokens=True,
                                                           **decoding)]  # as generate decodes them in one call
    assert len(set(map(tuple, whole))) > 1
    from prefixtune.generate import PartialOutputs

    calls, interrupt, real_add = [], [True], PartialOutputs.add

    def add(self, batch, rows, outputs):
        calls.append(len(rows))
        if calls == [3, 3] and interrupt:  # Ctrl-C during the second batch
            interrupt.clear()
            raise KeyboardInterrupt
        real_add(self, batch, rows, outputs)

    monkeypatch.setattr(PartialOutputs, "add", add)
    with pytest.raises(KeyboardInterrupt):
        runs_mod.decode_batches(model, tokenizer, sources, tmp_path / "parts.jsonl", **decoding)
    assert len((tmp_path / "parts.jsonl").read_text().splitlines()) == 1 + 1  # the key and the first batch
    with open(tmp_path / "parts.jsonl", "a") as f:
        f.write('{"batch": 1, "rows": [3, 4')  # a line cut short: not taken
    calls.clear()
    tokens, seconds, cpu_seconds = runs_mod.decode_batches(model, tokenizer, sources, tmp_path / "parts.jsonl", **decoding)
    assert tokens == whole and calls == [3, 1] and seconds > 0 and cpu_seconds > 0
    assert len((tmp_path / "parts.jsonl").read_text().splitlines()) == 1 + 3
    calls.clear()  # all there: nothing decoded again
    assert runs_mod.decode_batches(model, tokenizer, sources, tmp_path / "parts.jsonl", **decoding)[0] == whole
    assert calls == []
    # a file of another decoding (other options) is started over, not mixed in
    other = runs_mod.decode_batches(model, tokenizer, sources, tmp_path / "parts.jsonl", num_beams=2, max_new_tokens=6)[0]
    assert calls == [3, 3, 1] and other == [g.tokens for g in prefixtune.generate(
        model, tokenizer, sources, batch_size=3, return_tokens=True, num_beams=2, max_new_tokens=6)]


HOLDER = """
import signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from prefixtune.experiments import grid, ledger, runs
torch.set_num_threads(1)
grid.os.sched_getaffinity = lambda pid: set(range(4))  # (a CI machine may have one core)
if {takes_cores!r}:
    signal.signal(signal.SIGUSR1, grid.take_a_core)
with ledger.lock({runs!r}, {key!r}) as mine:
    print("holding", mine, flush=True)
    while not Path({stop!r}).exists():
        time.sleep(0.05)
print("threads", torch.get_num_threads(), runs.extra_threads, flush=True)
"""


def test_a_process_stopping_at_its_deadline_hands_its_threads_to_a_process_still_running(tmp_path, capsys):
    """At the end of a session the process that stops first gives its core to one still running a run
    (which adds a thread at once and keeps it for the models it loads after); a process that does not
    catch the signal (it would die of it: an older version, or ``prefixtune experiment NAME``) gets none."""
    scale, runs_dir, stop = Scale(**TINY), tmp_path / "runs", tmp_path / "stop"
    first, second, third = grid.status(scale, runs_dir, tmp_path / "ledger", names=("lr-grid",))["todo"]
    holders = {}
    for run, takes_cores in ((first, True), (second, False)):
        script = HOLDER.format(root=str(ROOT), takes_cores=takes_cores, runs=str(runs_dir), key=run.key(), stop=str(stop))
        holders[takes_cores] = proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "holding True"
    assert grid.catches_sigusr1(holders[True].pid) and not grid.catches_sigusr1(holders[False].pid)
    before = signal.getsignal(signal.SIGUSR1)
    try:  # only the third run is free, and a run never seen (1.5 h) does not fit in a minute: it stops
        n = grid.run_grid(scale, runs_dir, tmp_path, threads=1, names=("lr-grid",), readme=None, deadline=time.time() + 60)
    finally:
        signal.signal(signal.SIGUSR1, before)
    out = capsys.readouterr().out
    assert n == 0 and "grid: stopping" in out and f"grid: handed 1 thread(s) to process(es) {holders[True].pid}," in out
    stop.touch()
    for takes_cores, threads in ((True, "threads 2 1"), (False, "threads 1 0")):
        assert holders[takes_cores].communicate(timeout=60)[0].strip() == threads
        assert holders[takes_cores].returncode == 0


def test_deadline_parsing():
    now = datetime.datetime(2026, 12, 1, 9, 0)
    assert grid.parse_deadline("17:30", now) == datetime.datetime(2026, 12, 1, 17, 30).timestamp()
    assert grid.parse_deadline("08:15", now) == datetime.datetime(2026, 12, 2, 8, 15).timestamp()  # the next 08:15
    assert grid.parse_deadline("+90", now) == datetime.datetime(2026, 12, 1, 10, 30).timestamp()
    for bad in ("25:00", "+soon", "5pm"):
        with pytest.raises(ValueError, match="expected HH:MM"):
            grid.parse_deadline(bad, now)


def fake_result(run, rng):
    """A plausible ledger entry for ``run`` (no training): every field the reports read."""
    curve = [{"step": 0, "dev_loss": 3.0, "train_loss": None, "seconds_per_step": None}] + [
        {"step": s, "dev_loss": 2.0 + rng.random(), "train_loss": 1.0, "seconds_per_step": 2.0,
         **({"dev_score": 40 + 10 * rng.random()} if run.select == "dev_bleu" else {})} for s in (25, 50, 75)]
    name = f"adapter-{100 * run.size:g}" if run.method == "adapter" else run.method
    middle = LR_GRID[name][1]  # made the grid's choice: the best dev BLEU (and the lowest dev loss)
    train = {"trainable_percent": 1.0, "stored_percent": 0.1, "dev_loss": 2.1, "min_dev_loss": 2.0 if run.lr == middle else 3.0,
             "dev_score": 45.0 if run.lr == middle else 44.0, "best_step": 50, "best_epoch": 1.5, "steps": 75, "stopped_early": True,
             "seconds_per_step": 2.0, "wall_seconds": 600.0, "cpu_seconds": 590.0, "peak_memory_mb": 2000.0,
             "peak_memory_mb_before": None, "dev_curve": curve}
    evals = {}
    for ev in run.evals:
        n = 12
        if ev.task == "e2e":
            items = {"BLEU": [[int(rng.integers(5, 10)), 5, 3, 2, 10, 9, 8, 7, 10] for _ in range(n)],
                     "SER": [[int(rng.integers(0, 2)), 5] for _ in range(n)]}
            scores = {"A": {"BLEU": 0.5, "NIST": 7.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 1.8, "SER": 5.0}}
        elif ev.task == "webnlg":
            items = {"BLEU": [[10, 10, int(rng.integers(5, 10)), 5, 3, 2, 10, 9, 8, 7] for _ in range(n)],
                     "category": ["S", "U"] * (n // 2)}
            scores = {c: {"BLEU": 40.0, "METEOR": 0.3, "TER": 0.5} for c in "SUA"}
        else:
            items = {k: [[float(rng.uniform(10, 40)), 1] for _ in range(n)] for k in ("ROUGE-1", "ROUGE-2", "ROUGE-L")}
            scores = {"A": {"ROUGE-1": 30.0, "ROUGE-2": 10.0, "ROUGE-L": 25.0}}
        evals[ev.key()] = {"eval": {}, "n": n, "scores": scores, "items": items, "decode_seconds": 100.0,
                           "decode_cpu_seconds": 99.0, "output_tokens": 500}
    return {"run": run.training(), "train": train, "evals": evals}


def test_a_verdict_on_fewer_run_pairs_than_planned_is_provisional():
    """One finished pair of two planned: the verdict says so (its interval has no seed variation)."""
    import numpy as np

    from prefixtune.experiments.report import compare, verdict_label

    rng, ev = np.random.default_rng(0), Eval("e2e", n=12)
    a = [Run("e2e", "prefix", lr=1e-4, train_examples=50, seed=s, evals=(ev,)) for s in (0, 1)]
    b = [Run("e2e", "finetune", lr=1e-5, train_examples=50, seed=s, evals=(ev,)) for s in (0, 1)]
    first = [fake_result(a[0], rng), fake_result(b[0], rng)]
    c = compare(first, a, b, ev, "BLEU")
    assert c.pairs == 1 and c.planned == 2
    assert verdict_label(c, +1) == f"provisional: {c.verdict(+1)} (1 of 2 run pairs)"
    both = compare(first + [fake_result(a[1], rng), fake_result(b[1], rng)], a, b, ev, "BLEU")
    assert both.pairs == both.planned == 2 and verdict_label(both, +1) == both.verdict(+1)
    assert verdict_label(None, +1) == "runs missing"
    # a finding's verdict goes by the interval as its bullet shows it
    from types import SimpleNamespace

    from prefixtune.experiments import stats
    from prefixtune.experiments.report import finding

    ctx = SimpleNamespace(name="x", findings=[])
    tiny = stats.Comparison(diff=5.6e-8, low=5.6e-8, high=5.6e-8, pairs=2, items=6, a=5.6e-8, b=6e-12, planned=2)
    text = finding(ctx, "claim", "paper", tiny, +1, "BLEU")
    assert "+0.00 [+0.00, +0.00]" in text and ctx.findings[-1]["verdict"] == stats.NOT_SEPARABLE
    assert stats.HOLDS in finding(ctx, "claim", "paper", tiny, +1, "BLEU", digits=8)


def test_runs_the_step_cap_ended_are_listed_and_flag_the_findings_resting_on_them(tmp_path):
    """A run still improving at its cap (best evaluation = last) marks the finding that uses it, in the
    report and the README table; a run the cap ended after its best is listed but marks nothing; a run
    its stopping rule ended is neither."""
    import json
    from types import SimpleNamespace

    import numpy as np

    from prefixtune.experiments.report import at_cap, cap_section, compare, finding

    rng, ev = np.random.default_rng(0), Eval("e2e", n=12)
    a = [Run("e2e", "prefix", lr=1e-4, train_examples=50, seed=s, evals=(ev,)) for s in (0, 1)]
    b = [Run("e2e", "finetune", lr=1e-5, train_examples=50, seed=s, evals=(ev,)) for s in (0, 1)]
    results = [fake_result(r, rng) for r in a + b]
    for r in results:
        r["train"]["max_steps"] = 75
    scores = {"improving": [41.0, 40.0, 42.5], "after best": [41.0, 43.0, 42.0]}
    for r, kind in zip(results[:2], scores):  # a[0] ends at the cap still improving, a[1] after its best
        for h, x in zip(r["train"]["dev_curve"][1:], scores[kind]):
            h["dev_score"] = x
        r["train"].update(stopped_early=False, selected_by="dev_score", best_step=75 if kind == "improving" else 50)
    improving, after = at_cap(results[0]["train"]), at_cap(results[1]["train"])
    assert improving["still_improving"] and improving["last_gain"] == pytest.approx(1.5) and improving["cap"] == 75
    assert not after["still_improving"] and after["after_best"] == 1 and after["last_gain"] is None
    assert at_cap(results[2]["train"]) is None
    # dev loss: lower is better
    loss = {"stopped_early": False, "selected_by": "dev_loss", "best_step": 20, "steps": 20, "max_steps": 20,
            "dev_curve": [{"step": 0, "dev_loss": 5.0}, {"step": 10, "dev_loss": 2.61}, {"step": 20, "dev_loss": 2.6}]}
    assert at_cap(loss)["still_improving"] and at_cap(loss)["last_gain"] == pytest.approx(0.01)

    c = compare(results, a, b, ev, "BLEU")
    assert c.unconverged == (a[0].label(),)
    ctx = SimpleNamespace(name="low-data", findings=[])
    text = finding(ctx, "claim", "paper", c, +1, "BLEU")
    assert f"Not converged: `{a[0].label()}` was still improving" in text and a[1].label() not in text
    assert not compare(results, a[1:], b[1:], ev, "BLEU").unconverged
    section = cap_section(results, a + b)
    assert section.count("| `e2e/50/") == 2 and "dev BLEU +1.5000 at its last evaluation" in section
    assert cap_section(results, b) == ""
    (tmp_path / "low-data.json").write_text(json.dumps({"findings": ctx.findings}))
    assert "(1 run still improving at the step cap)" in grid.verdict_table(tmp_path)


def test_a_resumed_runs_time_counts_all_its_sessions():
    """A run's wall_seconds cover its last session only; its evaluation intervals cover all of them
    (numbers of a real resumed run: 182 s in its last session, 2523 s of steps and 1401 s of dev BLEU)."""
    from prefixtune.experiments import grid
    from prefixtune.experiments.runs import training_seconds

    resumed = {"wall_seconds": 182.0, "cpu_seconds": 178.0, "train_seconds": 2523.0, "dev_score_seconds": 1401.0}
    straight = {"wall_seconds": 1592.0, "cpu_seconds": 1149.0, "train_seconds": 1190.0, "dev_score_seconds": 300.0}
    assert training_seconds(resumed) == 3924.0 and training_seconds(straight) == 1592.0
    test = {"x": {"decode_seconds": 700.0, "decode_cpu_seconds": 460.0}}
    assert grid.hours({"train": resumed, "evals": test}) == (3924.0 + 460.0) / 3600
    assert grid.hours({"train": straight, "evals": test}) == (1149.0 + 460.0) / 3600  # one session: its CPU time
    # a run whose evaluations counted CPU time: that, over all sessions (pauses and load do not count)
    from prefixtune.experiments.runs import step_seconds

    counted = {**resumed, "train_cpu_seconds": 3000.0, "seconds_per_step": 9.0, "cpu_seconds_per_step": 2.5}
    assert training_seconds(counted) == 3000.0 and step_seconds(counted) == 2.5 and step_seconds(resumed) is None
    assert grid.hours({"train": counted, "evals": test}) == (3000.0 + 460.0) / 3600


def test_the_rate_is_chosen_on_the_selection_score_not_on_dev_loss(tmp_path):
    """When dev loss and dev BLEU disagree (fine-tuning on the real grid: the lowest dev loss at 3.9 dev
    BLEU less), the learning-rate grid takes the rate whose run selected the best dev BLEU, and its
    report marks the rate dev loss would have taken."""
    import numpy as np

    from prefixtune.experiments import lr_grid

    rng, scale = np.random.default_rng(0), Scale()
    grid_runs = lr_grid.runs_for(scale, "finetune")
    low, mid, high = (r.lr for r in grid_runs)
    for run in grid_runs:
        result = fake_result(run, rng)
        result["evals"] = {}
        result["train"].update(min_dev_loss={low: 1.34, mid: 1.28, high: 1.27}[run.lr],
                               dev_score={low: 61.9, mid: 64.8, high: 60.9}[run.lr])
        ledger.write(tmp_path / "ledger", run.key(), result)
    assert lr_grid.chosen(scale, tmp_path / "ledger")["finetune"] == mid
    assert lr_grid.chosen(scale, tmp_path / "ledger", by="dev_loss")["finetune"] == high
    assert resolve_lrs(scale, tmp_path / "ledger").chosen_lr["finetune"] == mid
    md = write_report("lr-grid", scale, tmp_path, "cmd").read_text()
    rows = {}
    for line in md.splitlines():  # the grid table (the first with a row per method and rate)
        if line.startswith("| finetune |"):
            rows.setdefault(line.split("|")[2].strip(), line)
    assert "**chosen**" in rows[f"{mid:g}"] and "lowest dev loss" in rows[f"{high:g}"] and "chosen" not in rows[f"{high:g}"]
    # an incomplete grid chooses nothing
    (tmp_path / "ledger" / grid_runs[0].key() / "result.json").unlink()
    assert "finetune" not in lr_grid.chosen(scale, tmp_path / "ledger")


def test_a_rate_chosen_at_the_edge_of_its_grid_extends_the_grid(tmp_path):
    """The prefix grid's lowest rate wins: the next lower rate joins the grid and prefix-tuning waits for
    its run; it loses, so the edge rate is chosen (now inside); at most lr_grid_extra rates are added."""
    import numpy as np

    from prefixtune.experiments import lr_grid

    rng, scale = np.random.default_rng(0), Scale()
    base = sorted(scale.lr_grid["prefix"])

    def record(lr, score):
        run = scale.run("e2e", "prefix", lr=lr, train_examples=scale.train_size, sampling=0, seed=0)
        result = fake_result(run, rng)
        result["train"].update(min_dev_loss=1.3, dev_score=score)
        ledger.write(tmp_path / "ledger", run.key(), result)

    for lr, score in zip(base, (66.1, 64.9, 56.6)):  # the lowest rate wins, as on the real grid
        record(lr, score)
    resolved = resolve_lrs(scale, tmp_path / "ledger")
    lower = lr_grid.next_rate(base[0], down=True)
    assert lower == pytest.approx(base[0] / 10 ** 0.5, rel=0.06) and sorted(resolved.lr_grid["prefix"]) == [lower, *base]
    assert "prefix" not in resolved.chosen_lr  # waits for the new rate's run
    assert lower in [r.lr for r in lr_grid.plan(resolved)]  # which the grid now plans
    record(lower, 65.0)
    assert resolve_lrs(scale, tmp_path / "ledger").chosen_lr["prefix"] == base[0]  # inside: chosen
    record(lower, 67.0)  # had it won, the grid would go on, up to lr_grid_extra rates past the base grid
    lowest = lr_grid.next_rate(lower, down=True)
    record(lowest, 68.0)
    resolved = resolve_lrs(scale, tmp_path / "ledger")
    assert len(resolved.lr_grid["prefix"]) == len(base) + scale.lr_grid_extra == len(base) + 2
    assert resolved.chosen_lr["prefix"] == lowest  # still at the edge: chosen, and flagged in the report
    md = write_report("lr-grid", scale, tmp_path, "cmd").read_text()
    assert "(edge of the grid)" in md


def test_every_report_on_a_full_synthetic_ledger(tmp_path):
    """Every report's code path with every run present (synthetic numbers, no training)."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = Scale()
    scale = Scale(chosen_lr={k: v[1] for k, v in LR_GRID.items()})
    runs = grid.order(scale)
    extra = [r for r in module("lr-grid").plan(base) if r.key() not in {x.key() for x in runs}]  # not chosen
    for run in runs + extra:
        result = fake_result(run, rng)
        items = {k: ev.pop("items") for k, ev in result["evals"].items()}
        entry = tmp_path / "ledger" / run.key()
        for ev in run.evals:
            rows = items[ev.key()]
            loops = run.method == "ft-top2" or (run.method == "finetune" and run.train_examples == 50)
            outputs = ["a b c d a b c d"] * 12 if loops else ["x"] * 12  # these runs' outputs loop
            result["evals"][ev.key()].update(ledger.write_eval_files(tmp_path / "ledger", run.key(), ev, outputs, rows))
        ledger.write(tmp_path / "ledger", run.key(), result)
        assert (entry / "result.json").is_file()
    readme = tmp_path / "README.md"
    readme.write_text(f"{grid.START}\n{grid.END}\n")
    grid.write_reports(base, tmp_path, readme=readme)
    for name in NAMES:
        md = (tmp_path / f"{name}.md").read_text()
        assert "Missing runs" not in md, name
        assert "runs missing" not in md and ("Verdict:" in md or name == "lr-grid"), name
    assert "| news (12 test articles) | sport (12 test articles) |" in (tmp_path / "extrapolation.md").read_text()
    # rep-4 %, read from the outputs: "a b c d a b c d" has 5 word 4-grams, one of them seen before
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "table-to-text.md").read_text().splitlines() if line.startswith("| ")}
    header = rows["| method"].split(" | ")
    rep = header.index("rep-4 %")
    assert rows["| ft-top2"].split(" | ")[rep].startswith("20.00 ± 0.00") and rows["| prefix"].split(" | ")[rep].startswith("0.00")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "low-data.md").read_text().splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row for row in cells}
    prefix_rep, ft_rep = rows["train pairs"].index("prefix rep-4 %"), rows["train pairs"].index("FT rep-4 %")
    assert rows["50"][ft_rep].startswith("20.00 ± 0.00") and rows["50"][prefix_rep].startswith("0.00")
    assert rows["100"][ft_rep].startswith("0.00")
    table = readme.read_text()
    assert table.count("| [") >= 30 and "runs missing" not in table
    state = grid.status(base, tmp_path / "runs", tmp_path / "ledger")
    assert not state["todo"] and not state["waiting"] and len(state["done"]) == len(runs)
    cost = grid.estimate(state, tmp_path / "ledger", base)
    assert abs(cost["done_hours"] - len(runs) * (590 + 99 * 1) / 3600) < 2
    per = cost["experiments"]  # every run under exactly one experiment
    assert list(per) == ["lr-grid", "low-data", *grid.LATER] and all(c["left"] == 0 for c in per.values())
    assert sum(c["done"] for c in per.values()) == len(runs) and all(c["done"] for c in per.values())
    assert abs(sum(c["done_hours"] for c in per.values()) - cost["done_hours"]) < 1e-9


def test_runs_are_selected_on_dev_bleu_decoded_as_the_test_set(tokenizer, monkeypatch):
    """The dev BLEU that selects a table-to-text run decodes as the test set does (the task's beam search,
    by a bfloat16 copy: the trained weights stay float32); ledger entries from before the setting keep
    their keys and read back as greedy float32 runs."""
    import torch

    import prefixtune
    from prefixtune.data import DECODING

    run = Scale().run("e2e", "prefix", lr=1e-3, train_examples=50)
    assert (run.dev_score_decoding, run.dev_score_dtype) == ("test", "bfloat16")
    legacy = {k: v for k, v in run.training().items() if k not in ("dev_score_decoding", "dev_score_dtype")}
    old = Run(**legacy)  # a ledger entry written before the fields existed
    assert (old.dev_score_decoding, old.dev_score_dtype) == ("greedy", "float32")
    assert old.key() == runs_mod._hash(legacy) and run.key() != old.key()
    assert Scale(dev_decoding="greedy").run("e2e", "prefix", lr=1e-3, train_examples=50).key() == old.key()

    seen = []

    def fake_generate(model, tokenizer, sources, **kw):
        seen.append((next(model.parameters()).dtype, kw))
        return ["x"] * len(sources)

    monkeypatch.setattr(prefixtune, "generate", fake_generate)  # what the hook imports
    model = tiny_model("llama-gqa")

    class FakeTrainer:  # what the hook reads: the tuner, its eval mode and its decoding inputs
        tuner = torch.nn.Module()

    FakeTrainer.tuner.decode_inputs = lambda: {}
    groups = [runs_mod.Example("name : A", "A.", ["A."], "k", None)] * 3
    monkeypatch.setattr(runs_mod, "read_task", lambda *a, **k: groups)
    monkeypatch.setattr(runs_mod, "group_references", lambda g: g)
    for r, dtype, beams in ((run, torch.bfloat16, DECODING["e2e"]["num_beams"]), (old, torch.float32, None)):
        runs_mod.dev_bleu(r, model, tokenizer, data=None)(FakeTrainer())
        got_dtype, kw = seen.pop()
        assert got_dtype == dtype and kw.get("num_beams") == beams, (r.dev_score_decoding, got_dtype, kw)
    assert next(model.parameters()).dtype == torch.float32  # the model being trained is untouched


def test_a_grid_process_started_in_the_background_stops_on_sigint():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a shell starts a background job
    try:
        grid.honour_sigint()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_hours_measured_on_two_threads_count_as_one_threads(tmp_path):
    """A run on 2 threads keeps both busy (CPU time ~ 2x wall) but ends only 1.65x sooner: its CPU hours are
    1.2x what one thread needs, and counted as 1.65/2 of themselves, training and decoding alike (the
    estimate is of one thread's hours, divided by the speed-up of the process that will run it)."""
    test = Eval("e2e", n=12)
    done = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=0, evals=(test,))
    ledger.write(tmp_path, done.key(), {"run": done.training(), "evals": {test.key(): {"decode_cpu_seconds": 720.0, "threads": 2}},
                                        "train": {"wall_seconds": 3700.0, "cpu_seconds": 7200.0, "train_cpu_seconds": 7200.0,
                                                  "threads": 2}})
    todo = Run("e2e", "prefix", lr=1e-4, train_examples=500, seed=1, evals=(test,))
    spent, expected = grid.expected_hours({"done": [done], "running": [], "todo": [todo], "waiting": []}, tmp_path)
    assert spent[done.key()] == pytest.approx(2.2)  # what it cost stays CPU hours
    assert expected[todo.key()] == pytest.approx(2.2 * 1.65 / 2)
    assert grid.one_thread(1.0, None) == grid.one_thread(1.0, 1) == 1.0


def test_seq_rep_counts_the_word_ngrams_seen_earlier_in_an_output():
    from prefixtune.experiments.report import seq_rep

    assert seq_rep([]) == seq_rep("too short".split()) == seq_rep("no phrase comes back here".split()) == 0.0
    assert seq_rep("a b c d a b c d".split()) == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert seq_rep(("pub " * 40).split()) == pytest.approx(36 / 37)  # a loop: all but the first 4-gram repeat
