"""Multi-label classification end to end: any number of labels per text, from the data file through
training, export and the torch-free runtime to the parity gate. The kind is one record
(runtime/tasks.py) plus how the data reader reads a list of labels; nothing else knows it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_TRAIN_FLAGS

from mpismoe_edge.cli import train_main
from mpismoe_edge.data import load_file, load_splits

TASK = "multi-label-classification"
ROWS = [  # words of the tiny vocabulary (conftest.WORDS); topics: film, car, mood
    ("the movie was great", ["film", "mood"]),
    ("a fast car", ["car"]),
    ("i love this film", ["film", "mood"]),
    ("driving the car is slow", ["car"]),
    ("we think it is ok", []),
    ("sad movie about cars", ["car", "film", "mood"]),
    ("happy driving", ["car", "mood"]),
    ("the film is fine", ["film"]),
]


@pytest.fixture
def multi_label_jsonl(tmp_path):
    path = tmp_path / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS * 3))
    return path


def test_a_jsonl_list_or_a_csv_cell_of_names_holds_a_rows_labels(tmp_path, multi_label_jsonl):
    data = load_file(multi_label_jsonl, TASK)
    assert data.labels == ["car", "film", "mood"]
    assert data.targets[:5] == [[1, 2], [0], [1, 2], [0], []]
    csv = tmp_path / "topics.csv"
    csv.write_text('text,label\n"the movie was great",film;mood\n"we think it is ok",\n')
    assert load_file(csv, TASK, labels=data.labels).targets == [[1, 2], []]


def test_a_label_cell_that_is_not_a_list_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": ["film"]}\n{"text": "b", "label": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: the labels of a multi-label row must be a list"):
        load_file(path, TASK)


def test_splits_share_one_label_list(tmp_path, multi_label_jsonl):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "a car", "label": ["car"]}) + "\n")
    train, validation, _ = load_splits([multi_label_jsonl, val, None], TASK)
    assert train.labels == validation.labels == ["car", "film", "mood"] and validation.targets == [[0]]


@pytest.mark.slow
def test_a_multi_label_model_trains_exports_runs_and_passes_parity(tmp_path, multi_label_jsonl, backbone_dir, capsys):
    from mpismoe_edge import Predictor
    from mpismoe_edge.export.cli import main as export_main
    from mpismoe_edge.parity import main as parity_main

    run = tmp_path / "run"
    flags = ["--task", TASK, "--data", str(multi_label_jsonl), "--eval-data", str(multi_label_jsonl)]
    tiny = [*TINY_TRAIN_FLAGS, "--epochs", "2", "-q"]
    assert train_main([*flags, "--backbone", str(backbone_dir), "-o", str(run), *tiny]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"loss", "micro_f1", "exact_match"} <= set(metrics["final"])

    out = tmp_path / "onnx"
    assert export_main([str(run / "model.pt"), "-o", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert list(config["id2label"].values()) == ["car", "film", "mood"]

    predictor = Predictor.from_dir(out)
    texts = [t for t, _ in ROWS]
    results = predictor.predict(texts)
    logits = predictor.predict_logits(texts)
    for result, row in zip(results, logits):
        probs = 1 / (1 + np.exp(-row.astype(np.float64)))
        assert result["labels"] == [n for n, p in zip(["car", "film", "mood"], probs) if p > 0.5]
        assert list(result["probabilities"].values()) == pytest.approx(probs.tolist())

    capsys.readouterr()
    assert parity_main([str(run / "model.pt"), str(out), "--data", str(multi_label_jsonl)]) == 0
    assert "label_agreement=1.0000" in capsys.readouterr().out
