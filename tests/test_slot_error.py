"""E2E slot errors (prefixtune/metrics/slot_error.py): the published rates of the E2E cleaning paper on
its own system outputs, and hand-made cases for each kind of error."""

import csv
import statistics
from pathlib import Path

import pytest

from prefixtune.metrics import slot_error as se

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUTPUTS = DATA / "system_outputs" / "e2e-cleaning" / "train-orig_test-orig"
# Dušek, Howcroft & Rieser (INLG 2019), original training and test data: SER (%) averaged over the 5 runs
PUBLISHED_SER = {"tgen-minus": 15.94, "tgen-std": 4.27, "tgen-plus": 1.80, "sclstm": 31.51}


@pytest.fixture(scope="module")
def test_mrs():
    rows = list(csv.DictReader(open(DATA / "e2e" / "original" / "testset_w_refs.csv", encoding="utf-8")))
    return list(dict.fromkeys(r["mr"] for r in rows))


@pytest.mark.parametrize("system", sorted(PUBLISHED_SER))
def test_published_slot_error_rates(system, test_mrs):
    rates = [se.score((OUTPUTS / f"{system}.run{k}.txt").read_text(encoding="utf-8").splitlines(), test_mrs)["SER"]
             for k in range(5)]
    assert abs(statistics.mean(rates) - PUBLISHED_SER[system]) < 0.006


def test_our_linearisation_and_the_dataset_format_give_the_same_table(test_mrs):
    lines = (DATA / "e2e" / "prefix_tuning_format" / "src1_test.txt").read_text(encoding="utf-8").splitlines()
    ours = list(dict.fromkeys(line.split("||")[0].strip() for line in lines))
    assert len(ours) == len(test_mrs) == 630
    assert all(se.parse_mr(a) == se.parse_mr(b) for a, b in zip(ours, test_mrs))
    assert se.parse_mr("name : The Eagle | price : £ 20 - 25 | customer rating : 3 out of 5") == \
        {"name": "The Eagle", "price_range": "£20-25", "rating": "3 out of 5"}


TABLE = "name : The Eagle | Type : coffee shop | food : French | price : less than £ 20 | customer rating : low | " \
        "area : riverside | family friendly : yes | near : Burger King"


@pytest.mark.parametrize("text,expected", [
    # faithful, in our models' tokenised style and in plain text
    ("The Eagle is a cheap French coffee shop near Burger King in the riverside area . It is family - friendly "
     "but has a low customer rating .", {}),
    ("The Eagle is a family-friendly coffee shop serving French food for less than £20 near Burger King by the "
     "river. Its customer rating is low.", {}),
    # a value left out
    ("The Eagle is a cheap French coffee shop near Burger King in the riverside area . It has a low customer rating .",
     {"missing": 1}),
    # a wrong value (the rating the table does not say)
    ("The Eagle is a cheap French coffee shop near Burger King in the riverside area . It is family - friendly "
     "and has a 5 out of 5 customer rating .", {"wrong": 1}),
])
def test_hand_cases(text, expected):
    got = se.errors(text, se.parse_mr(TABLE))
    assert {k: v for k, v in got.items() if k not in ("slots", "repeated") and v} == expected
    assert got["slots"] == 8


def test_added_and_negated_values():
    table = se.parse_mr("name : Aromi | Type : pub | area : city centre")
    assert se.errors("Aromi is a pub in the city centre .", table) == {"added": 0, "missing": 0, "wrong": 0, "repeated": 0, "slots": 3}
    # an Italian pub: food is not in the table
    assert se.errors("Aromi is an Italian pub in the city centre .", table)["added"] == 1
    table = se.parse_mr("name[Aromi], eatType[pub], familyFriendly[no]")
    assert se.errors("Aromi is a pub that isn 't family - friendly .", table)["wrong"] == 0
    assert se.errors("Aromi is a family - friendly pub .", table)["wrong"] == 1


def test_ties_go_to_the_tables_value():
    """"cheap" realises both "cheap" and "less than £20": whichever the table has is the one found."""
    for value in ("cheap", "less than £20"):
        table = {"name": "Aromi", "price_range": value}
        assert se.errors("Aromi is cheap .", table)["wrong"] == 0


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="unknown E2E attribute"):
        se.parse_mr("name : Aromi | colour : blue")
    with pytest.raises(ValueError, match="unknown value"):
        se.parse_mr("name : Aromi | food : Martian")
    with pytest.raises(ValueError, match="outputs for"):
        se.score(["a"], [])
