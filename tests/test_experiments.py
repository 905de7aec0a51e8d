"""The experiment machinery on a tiny model: cached and shared runs, failures kept apart, reports and plots."""

import json

import pytest

from prefixtune.cli import main
from prefixtune.experiments import Scale, run_experiment
from prefixtune.experiments import prefix_length, table_to_text
from prefixtune.experiments.runs import Run, run_all, xsum_topic
from conftest import tiny_model

TINY = dict(steps=2, batch_size=2, summary_steps=2, summary_batch_size=2, test_examples=4, summary_test_examples=2,
            train_sizes=(4,), summary_train_sizes=(4,), init_sizes=(4,), seeds=1, lengths=(1, 3), summary_lengths=(2,),
            summary_prefix_lengths=(2, 3), max_source_tokens=24)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_runs_are_cached_and_a_failed_run_does_not_stop_the_others(tmp_path, tiny_dir):
    scale = Scale(**TINY, model=tiny_dir)
    ok = scale.run("e2e", "prefix", length=2, train_examples=4, evals=(scale.eval("e2e", n=3),))
    bad = scale.run("e2e", "prefix", length=2, train_examples=10**7)  # more pairs than E2E has
    results = run_all([ok, bad], tmp_path)
    assert "error" in results[1] and "10000000" in results[1]["error"]
    assert (tmp_path / bad.key() / "error.txt").is_file()
    result = results[0]
    assert result["train"]["n_train"] == 4 and result["train"]["stored_parameters"] > 0
    (ev,) = result["evals"].values()
    assert ev["n"] == 3 and set(ev["scores"]["A"]) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert not (tmp_path / ok.key() / "checkpoint").exists()  # only kept while a training is unfinished
    stamp = (tmp_path / ok.key() / "result.json").stat().st_mtime_ns
    again = run_all([ok], tmp_path)[0]  # cached: nothing redone
    assert again == result and (tmp_path / ok.key() / "result.json").stat().st_mtime_ns == stamp
    # a new evaluation of a finished run is added without retraining
    more = Run(**{**ok.training(), "evals": (scale.eval("e2e", n=3), scale.eval("dart", n=2))})
    assert more.key() == ok.key()
    assert "not run yet" in run_all([more], tmp_path, cached_only=True)[0]["error"]  # nothing run
    grown = run_all([more], tmp_path)[0]
    assert grown["train"] == result["train"] and len(grown["evals"]) == 2
    assert run_all([more], tmp_path, cached_only=True)[0] == grown


def test_experiments_share_runs():
    scale = Scale()
    t2t = {r.key() for r in table_to_text.plan(scale)}
    lengths = {r.key() for r in prefix_length.plan(scale)}
    assert len(t2t & lengths) == 1  # the length-10 E2E prefix, seed 0


def test_an_experiment_writes_its_report_json_and_plots(tmp_path, tiny_dir):
    scale = Scale(**TINY, model=tiny_dir)
    path = run_experiment("prefix-length", scale, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", command="cmd")
    md = path.read_text()
    assert "```bash\ncmd\n```" in md and "paper: 10" in md and "Failed runs" not in md
    data = json.loads((tmp_path / "results" / "prefix-length.json").read_text())
    assert len(data["runs"]) == 3 and all("error" not in r for r in data["runs"])
    for png in ("prefix-length-quality.png", "prefix-length-speed.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000


def test_xsum_topics_from_the_text():
    assert xsum_topic("The striker scored a late goal as the league leaders won the match; the manager praised "
                      "his squad.") == "sport"
    assert xsum_topic("The government said the new housing policy would help families in Wales.") == "news"


def test_experiment_cli_validates_and_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--help"])
    assert e.value.code == 0
    assert "paper" in capsys.readouterr().out
    assert main(["experiment", "table-to-text", "--methods", "prefix", "dance"]) == 2
    assert "unknown method 'dance'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "low-data", "--lr", "prefix"])
