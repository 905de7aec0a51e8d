"""Dataset readers on the real files (../shared/data), and their errors on malformed input."""

import pytest

from prefixtune.data import DataError, data_dir, dart, e2e, group_references, jsonl, summarization, webnlg

DATA = data_dir()


def test_e2e():
    train, test = e2e.read(DATA, "train"), e2e.read(DATA, "test")
    assert len(train) == 42061 and len(e2e.read(DATA, "valid")) == 4672 and len(test) == 4693
    grouped = group_references(test)
    assert len(grouped) == 630 and sum(len(g.references) for g in grouped) == 4693
    assert grouped[0].source == "name : Blue Spice | Type : coffee shop | area : city centre"
    assert grouped[0].references[0] == "A coffee shop in the city centre area called Blue Spice ."


def test_webnlg_linearisation_and_seen_unseen():
    train = webnlg.read(DATA, "train")
    assert len(train) == 18025  # references marked "good", as the paper's code keeps
    assert train[0].source == ' | Aarhus_Airport : cityServed : "Aarhus, Denmark"'
    test = group_references(webnlg.read(DATA, "test"))
    assert len(test) == 1862 and sum(len(g.references) for g in test) == 4928
    seen = webnlg.seen_categories(DATA)
    assert len(seen) == 10
    assert sum(g.category in seen for g in test) == 971 and sum(g.category not in seen for g in test) == 891
    assert len(group_references(webnlg.read(DATA, "dev"))) == 871  # of 872: one entry has no "good" reference


def test_dart():
    dev = dart.read(DATA, "dev")
    assert len(dev) == 6980 and len(group_references(dev)) == 2768
    assert dev[0].source.startswith("Mars Hill College : joined : 1973 | Mars Hill College : location : ")
    with pytest.warns(UserWarning, match="skipped 1 empty reference"):
        test = dart.read(DATA, "test")
    grouped = group_references(test)
    assert len(grouped) == 5097  # one per XML entry, the official reference layout
    assert grouped[0].source.startswith("Hawaii Five-O : notes : Episode: The Flight of the Jewels")
    with pytest.raises(ValueError, match="no train split"):
        dart.read(DATA, "train")


def test_summarization():
    splits = {s: summarization.read_xsum(DATA, s) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [1210, 200, 500]
    keys = [set(e.key for e in splits[s]) for s in splits]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert [e.key for e in summarization.read_xsum(DATA, "test")] == [e.key for e in splits["test"]]  # seeded
    test = group_references(summarization.read_dialogsum(DATA, "test"))
    assert len(test) == 500 and all(len(g.references) == 3 for g in test)
    assert len(summarization.read_dialogsum(DATA, "train")) == 12460


def test_malformed_inputs_name_file_and_line(tmp_path):
    e2e_dir = tmp_path / "e2e" / "prefix_tuning_format"
    e2e_dir.mkdir(parents=True)
    (e2e_dir / "src1_train.txt").write_text("name : A||A is nice .\nname : B without separator\n")
    with pytest.raises(DataError, match=r"src1_train.txt:2: expected 'table\|\|text', found no '\|\|'"):
        e2e.read(tmp_path, "train")
    (e2e_dir / "src1_train.txt").write_text("name : A||   \n")
    with pytest.raises(DataError, match=r"src1_train.txt:1: empty text"):
        e2e.read(tmp_path, "train")
    xml_dir = tmp_path / "webnlg2017" / "test"
    xml_dir.mkdir(parents=True)
    (xml_dir / "testdata_with_lex.xml").write_text("<benchmark><entries><entry eid='Id1'>\n<mtriple>a | b</mtriple>\n")
    with pytest.raises(DataError, match=r"testdata_with_lex.xml:3: malformed XML"):
        webnlg.read(tmp_path, "test")
    (xml_dir / "testdata_with_lex.xml").write_text(
        "<benchmark><entries><entry eid='Id1' category='X'><mtriple>a | b</mtriple></entry></entries></benchmark>")
    with pytest.raises(DataError, match=r"entry Id1: triple 'a \| b' is not"):
        webnlg.read(tmp_path, "test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "x", "target": "y"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object"):
        jsonl.read(bad)


def test_missing_data_dir_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="pass --data DIR or set PREFIXTUNE_DATA"):
        data_dir()
