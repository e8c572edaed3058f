"""Predictor: every bad input or option is one clear error (tables of input -> error)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_models import build_model_dir

from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.manifest import ExportFileError


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


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _link_out(name):
    """Replace the export's ``name`` by a symlink to a copy of it outside the export folder."""

    def change(out):
        outside = out.parent / ("outside-" + name)
        outside.write_bytes((out / name).read_bytes())
        (out / name).unlink()
        (out / name).symlink_to(outside)

    return change


BROKEN_EXPORTS = [
    (
        "truncated-model",
        lambda out: _truncate(out / "model.onnx"),
        r"model\.onnx: ONNX Runtime cannot load it \(a trunc",
    ),
    (
        "garbage-model",
        lambda out: (out / "model.onnx").write_bytes(b"not a graph"),
        r"model\.onnx: ONNX Runtime cannot",
    ),
    ("truncated-tokenizer", lambda out: _truncate(out / "tokenizer.json"), r"tokenizer\.json is not a readable"),
    ("tokenizer-not-json", lambda out: (out / "tokenizer.json").write_text("x"), r"tokenizer\.json is not a readable"),
    ("manifest-not-json", lambda out: _truncate(out / "manifest.json"), r"manifest\.json is not valid UTF-8 JSON"),
    ("tokenizer-links-out", _link_out("tokenizer.json"), r"tokenizer\.json leads outside the export folder"),
    ("manifest-links-out", _link_out("manifest.json"), r"manifest\.json leads outside the export folder"),
    ("model-links-out", _link_out("model.onnx"), r"model\.onnx leads outside the export folder"),
    ("data-links-out", _link_out("model.onnx.data"), r"model\.onnx\.data leads outside the export folder"),
]


@pytest.mark.parametrize("change, message", [b[1:] for b in BROKEN_EXPORTS], ids=[b[0] for b in BROKEN_EXPORTS])
def test_a_broken_or_escaping_export_file_is_an_export_file_error_naming_it(tmp_path, change, message):
    out = build_model_dir(tmp_path / "out", external=True)
    change(out)
    with pytest.raises(ExportFileError, match=message):
        Predictor.from_dir(out)


def test_an_export_folder_reached_through_a_symlink_is_read(tmp_path):
    out = build_model_dir(tmp_path / "real" / "out")
    (tmp_path / "alias").symlink_to(out)
    (out / "manifest.link.json").symlink_to(out / "manifest.json")  # a link inside the folder is fine
    assert Predictor.from_dir(tmp_path / "alias").predict(["good"])[0]["label"]


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
