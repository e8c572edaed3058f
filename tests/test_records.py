"""runtime.records: the one reader of CSV/JSONL rows and the one rule for texts and labels."""

import pytest

from mpismoe_edge.runtime import records


def _write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_jsonl_rows_carry_their_line_numbers_and_skip_blank_lines(tmp_path):
    path = _write(tmp_path, "d.jsonl", b'{"text": "a"}\n\n{"text": "b", "id": 7}\n')
    assert records.read_rows(path) == [(1, {"text": "a"}), (3, {"text": "b", "id": 7})]


def test_csv_rows_carry_the_line_they_end_on(tmp_path):
    path = _write(tmp_path, "d.csv", b'text,label\nhello,pos\n"two\nlines",neg\n')
    assert records.read_rows(path) == [
        (2, {"text": "hello", "label": "pos"}),
        (4, {"text": "two\nlines", "label": "neg"}),
    ]


BAD_FILES = [
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "d.jsonl line 2: not valid UTF-8"),
    ("d.jsonl", b'{"text": "ok"}\n["text"]\n', "d.jsonl line 2: expected a JSON object"),
    ("d.jsonl", b'{"text": "ok"\n', "d.jsonl line 1: not valid JSON"),
    ("d.jsonl", b"\n\n", "d.jsonl holds no rows"),
    ("d.csv", b"text,label\n", "d.csv holds no rows"),
    ("d.csv", b"text\n\x89PNG\x00\xff\n", "d.csv line 2: not valid UTF-8"),
    ("d.txt", b"hello\n", "unsupported data format '.txt'"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[m.split(": ")[-1] for _, _, m in BAD_FILES])
def test_a_bad_file_is_an_error_naming_file_and_line(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        records.read_rows(_write(tmp_path, name, content))


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        records.read_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"body": "x"}, "f line 4: 'text' missing"),
        ({"text": None}, "f line 4: 'text' missing"),
        ({"text": 5}, "f line 4: 'text' must be a string, got int"),
    ],
)
def test_a_row_without_a_string_text_names_its_line(row, message):
    with pytest.raises(ValueError, match=message):
        records.texts([(1, {"text": "ok"}), (4, row)], "f")


LABELS = ["neg", "neu", "pos"]


@pytest.mark.parametrize("value, expected", [("pos", 2), ("0", 0), (1, 1), ("2", 2)])
def test_a_label_is_a_name_or_a_class_id(value, expected):
    assert records.label_ids([value], LABELS) == [expected]


def test_a_name_wins_over_an_id():
    assert records.label_ids(["0"], ["1", "0"]) == [1]


@pytest.mark.parametrize("value", ["other", 3, -1, "3", True, 1.0])
def test_anything_else_is_an_error_naming_where_it_is(value):
    with pytest.raises(
        ValueError, match=r"f line 9: label .* is neither one of \['neg', 'neu', 'pos'\] nor a class id in \[0, 3\)"
    ):
        records.label_ids([value], LABELS, ["f line 9"])


@pytest.mark.parametrize("value, expected", [(1, 1.0), (2.5, 2.5), ("-0.25", -0.25), (" 3 ", 3.0)])
def test_a_regression_label_is_a_number_or_a_string_holding_one(value, expected):
    assert records.regression_targets([value]) == [expected]


@pytest.mark.parametrize("value", ["high", "", None, True, [1.0], "nan", float("inf")])
def test_a_regression_label_that_is_not_a_finite_number_names_its_line(value):
    with pytest.raises(ValueError, match=r"f line 9: regression label .* is not a finite number"):
        records.regression_targets([1.0, value], ["f line 3", "f line 9"])


def test_a_line_that_is_not_json_says_what_a_jsonl_line_must_be(tmp_path):
    path = _write(tmp_path, "d.jsonl", b"text,label\nhello,pos\n")
    with pytest.raises(
        ValueError, match=r"d.jsonl line 1: not valid JSON \(.*\); JSONL holds one JSON object per line"
    ):
        records.read_rows(path)
