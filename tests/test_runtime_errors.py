"""Predictor: every bad input or option is one clear error (tables of input -> error)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_models import build_model_dir

from mpismoe_edge.runtime import Predictor


@pytest.mark.parametrize(
    "texts, error, message",
    [
        ([], ValueError, "empty batch"),
        ((), ValueError, "empty batch"),
        (["ok", None], TypeError, r"texts\[1\] must be str, got NoneType"),
        ([1, 2], TypeError, r"texts\[0\] must be str, got int"),
        (b"bytes", TypeError, "texts must be a list of str, got bytes"),
    ],
    ids=["empty-list", "empty-tuple", "none", "ints", "bytes"],
)
def test_bad_texts_are_refused(predictor, texts, error, message):
    with pytest.raises(error, match=message):
        predictor.predict(texts)
    with pytest.raises(error, match=message):
        predictor.predict_logits(texts)


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0])
def test_a_batch_size_that_is_not_a_positive_int_is_refused(predictor, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        predictor.predict(["ok"], batch_size=batch_size)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "manifest.json", "model.onnx.data"])
def test_a_missing_file_is_named(tmp_path, name):
    out = build_model_dir(tmp_path / "out", external=name == "model.onnx.data")
    (out / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        Predictor.from_dir(out)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nope"):
        Predictor.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({"format": "mpismoe-edge-onnx/2"}, "unsupported format 'mpismoe-edge-onnx/2'"),
        ({"format": "other/1"}, "'format' must be 'mpismoe-edge-onnx/1', got 'other/1'"),
        ([1, 2], "must hold a JSON object"),
        ({"format": "mpismoe-edge-onnx/1", "task": "ranking"}, "'task' must be one of"),
        ({"format": "mpismoe-edge-onnx/1", "max_length": 1}, "'max_length' must be an integer >= 2, got 1"),
        ({"format": "mpismoe-edge-onnx/1", "labels": []}, "'labels' must be a non-empty list"),
        ({"format": "mpismoe-edge-onnx/1", "outputs": ["scores"]}, "manifest output 'scores' is not a model output"),
    ],
    ids=["major", "format", "not-object", "task", "max_length", "labels", "outputs"],
)
def test_a_bad_manifest_is_refused(tmp_path, manifest, message):
    out = build_model_dir(tmp_path / "out")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        Predictor.from_dir(out)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"provider": "tpu"}, "provider must be one of"),
        ({"graph_optimization": "max"}, "graph_optimization must be one of"),
        ({"threads": 0}, "threads must be a positive integer, got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_a_bad_option_is_refused(model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        Predictor.from_dir(model_dir, **options)


def _feed(predictor):
    return predictor.encoder.encode(["good phone", "bad"]).arrays()


BAD_FEEDS = [
    (
        "missing",
        lambda f: {k: v for k, v in f.items() if k != "token_type_ids"},
        ValueError,
        r"missing \['token_type_ids'\].*input_ids: int64",
    ),
    ("extra", lambda f: {**f, "pixels": f["input_ids"]}, ValueError, r"unexpected \['pixels'\]"),
    (
        "dtype",
        lambda f: {**f, "input_ids": f["input_ids"].astype(np.int32)},
        ValueError,
        "input_ids has dtype int32, expected int64",
    ),
    ("rank", lambda f: {**f, "attention_mask": f["attention_mask"][0]}, ValueError, "rank 1"),
    ("dims", lambda f: {**f, "attention_mask": f["attention_mask"][:, :-1]}, ValueError, "same dimension 'seq'"),
    ("empty", lambda f: {k: v[:0] for k, v in f.items()}, ValueError, "empty batch"),
    ("vocab", lambda f: {**f, "input_ids": f["input_ids"] + 1000}, ValueError, r"input_ids must lie in \[0, "),
    (
        "list",
        lambda f: {**f, "input_ids": f["input_ids"].tolist()},
        TypeError,
        "input_ids must be a numpy array, got list",
    ),
    ("not-dict", lambda f: [f["input_ids"]], TypeError, "feed must be a dict of numpy arrays"),
]


@pytest.mark.parametrize("change, error, message", [b[1:] for b in BAD_FEEDS], ids=[b[0] for b in BAD_FEEDS])
def test_run_arrays_refuses_a_feed_that_does_not_fit_the_model(predictor, change, error, message):
    with pytest.raises(error, match=message):
        predictor.run_arrays(change(_feed(predictor)))


def test_run_arrays_refuses_nan_in_a_float_input(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", float_mask=True))
    feed = p.encoder.encode(["good phone"]).arrays()
    feed["attention_mask"] = feed["attention_mask"].astype(np.float32)
    feed["attention_mask"][0, 0] = np.nan
    with pytest.raises(ValueError, match="attention_mask contains NaN"):
        p.run_arrays(feed)
