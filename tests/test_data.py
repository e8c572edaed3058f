"""The bundled tweets split: train, test and validation are fixed by the seed and disjoint."""

import pytest

from mpismoe_edge.data import Dataset, load_default, load_default_validation


def test_validation_rows_are_disjoint_from_train_and_test():
    train, test = load_default(400, 200, seed=3)
    val = load_default_validation(100, 400, 200, seed=3)
    assert len(val) == 100 and val.labels == train.labels
    assert not set(val.texts) & (set(train.texts) | set(test.texts))


def test_validation_split_leaves_train_and_test_as_they_were():
    before = load_default(400, 200, seed=3)
    load_default_validation(100, 400, 200, seed=3)
    after = load_default(400, 200, seed=3)
    assert before[0].texts == after[0].texts and before[1].texts == after[1].texts


def test_validation_larger_than_the_corpus_is_refused():
    with pytest.raises(ValueError, match="default corpus has"):
        load_default_validation(10**6)


def test_no_text_is_in_both_train_and_test():
    train, test = load_default(seed=0)
    assert not set(train.texts) & set(test.texts)


def test_relabelling_keeps_each_rows_label_name():
    data = Dataset(["x", "y"], [0, 1], ["rotten", "fresh"])
    again = data.relabel(["fresh", "rotten"])
    assert [again.labels[t] for t in again.targets] == ["rotten", "fresh"]
    words = Dataset([["a", "b"]], [[0, 1]], ["O", "B-x"]).relabel(["B-x", "O"])
    assert words.targets == [[1, 0]]
