"""The bundled tweets split: train, test and validation are fixed by the seed and disjoint."""

import json
import warnings

import pytest

from mpismoe_edge.data import Dataset, load_default, load_default_validation, load_file, load_splits


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


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_non_numeric_regression_label_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": "high"}])
    with pytest.raises(ValueError, match=r"r.jsonl line 2: regression label 'high' is not a finite number"):
        load_file(path, task="regression")


@pytest.mark.parametrize(
    "train, other, unseen",
    [
        (["neg", "pos"], ["neg", "neu"], "'neu'"),
        ([0, 1], [0, 2], "'2'"),
    ],
    ids=["names", "ids"],
)
def test_an_evaluation_label_never_seen_in_training_is_warned_about_naming_file_and_label(
    tmp_path, train, other, unseen
):
    tr = _jsonl(tmp_path / "train.jsonl", [{"text": str(i), "label": y} for i, y in enumerate(train)])
    ev = _jsonl(tmp_path / "val.jsonl", [{"text": str(i), "label": y} for i, y in enumerate(other)])
    with pytest.warns(UserWarning, match=rf"val.jsonl: label {unseen} never occurs in the training data"):
        load_splits([tr, ev])


def test_a_token_tag_never_seen_in_training_is_warned_about(tmp_path):
    tr = _jsonl(tmp_path / "train.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-x"]}])
    te = _jsonl(tmp_path / "test.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-y"]}])
    with pytest.warns(UserWarning, match=r"test.jsonl: label 'B-y' never occurs in the training data"):
        load_splits([tr, None, te], task="token-classification")


def test_evaluation_labels_seen_in_training_give_no_warning(tmp_path):
    tr = _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    ev = _jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "pos"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val = load_splits([tr, ev])
    assert val.labels == train.labels == ["neg", "pos"]
