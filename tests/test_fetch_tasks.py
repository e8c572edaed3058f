"""scripts/fetch_tasks.py: the parsers, de-duplication and splits, on small synthetic inputs."""

from __future__ import annotations

import json

import pytest

from mpismoe_edge.data import load_file
from scripts import fetch_tasks as fetch


def test_rotten_tomatoes_keeps_fresh_and_rotten_snippets_only():
    text = (
        "category,text,movie_name,has_plot_and_reviews\n"
        'plot,"A long plot.",m,False\nfresh," Great fun ",m,True\nrotten,"Dull, dull.",m,True\n'
    )
    assert fetch.parse_rotten_tomatoes(text) == [
        {"text": "Great fun", "label": "fresh"},
        {"text": "Dull, dull.", "label": "rotten"},
    ]


def test_wnut_reads_one_row_per_blank_line_separated_sentence():
    text = "@me\tO\nParis\tB-geo-loc\n\nNew\tB-geo-loc\nYork\tI-geo-loc\n"
    assert fetch.parse_wnut(text) == [
        {"tokens": ["@me", "Paris"], "tags": ["O", "B-geo-loc"]},
        {"tokens": ["New", "York"], "tags": ["B-geo-loc", "I-geo-loc"]},
    ]


def test_wnut_names_the_line_that_is_not_token_tab_tag():
    with pytest.raises(ValueError, match=":2: expected 'token<TAB>tag'"):
        fetch.parse_wnut("ok\tO\nbroken line\n")


def test_vader_reads_ratings_and_replaces_bytes_that_are_not_utf8():
    rows = fetch.parse_vader(b"1\t2.5\tgood film\n2\t-0.6\tcaf\xe9 meh\n")
    assert rows == [{"text": "good film", "label": 2.5}, {"text": "caf\ufffd meh", "label": -0.6}]


def test_vader_rejects_a_rating_outside_the_scale():
    with pytest.raises(ValueError, match=r"outside \[-4, 4\]"):
        fetch.parse_vader(b"1\t4.5\ttoo good\n")


def test_dedupe_keeps_the_first_row_of_each_text():
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "a", "label": "z"}]
    assert fetch.dedupe(rows) == rows[:2]
    words = [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a", "b"], "tags": ["B-x", "O"]}]
    assert fetch.dedupe(words) == words[:1]


def test_splits_are_disjoint_80_10_10_and_fixed_by_the_seed():
    rows = [{"text": f"t{i % 90}", "label": "x"} for i in range(100)]  # 10 repeats
    splits = fetch.split_rows(rows, seed=3)
    assert [len(splits[s]) for s in fetch.SPLITS] == [72, 9, 9]
    texts = [{r["text"] for r in splits[s]} for s in fetch.SPLITS]
    assert sum(len(t) for t in texts) == len(set().union(*texts)) == 90
    assert fetch.split_rows(rows, seed=3) == splits
    assert fetch.split_rows(rows, seed=4)["test"] != splits["test"]


def test_written_task_loads_with_the_training_reader(tmp_path):
    rows = [{"tokens": ["New", "York", str(i)], "tags": ["B-loc", "I-loc", "O"]} for i in range(20)]
    splits = fetch.split_rows(rows, seed=0)
    fetch.write_task(tmp_path, "ner", splits, {"task": "token-classification", "labels": fetch.labels_of(rows)})
    info = json.loads((tmp_path / "ner" / "task.json").read_text())
    assert info["rows"] == {"train": 16, "validation": 2, "test": 2} and info["labels"] == ["B-loc", "I-loc", "O"]
    ds = load_file(tmp_path / "ner" / "train.jsonl", task="token-classification", labels=info["labels"])
    assert len(ds) == 16 and ds.targets[0] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ner"]  # no temporary folder left


def test_unknown_task_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        fetch.fetch_task("imdb", tmp_path, 0)
