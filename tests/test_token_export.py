"""Token classification end to end: export (logits [batch, seq, labels]), runtime (per-text logits,
per-word predictions, CLI) and the parity gate, on one tiny exported model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.session import TruncationWarning
from mpismoe_edge.runtime.text import TextEncoder

pytestmark = pytest.mark.slow  # exports a token-classification model

TAGS = ["O", "B-X", "I-X"]
# "qqb" is out of vocabulary: q ##q ##b.
TEXTS = ["i love qqb movies", "ok", "self driving cars are really fast", "the film was fine"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mpismoe_edge.model import save_checkpoint

    model = tiny_model(task="token-classification", labels=TAGS).eval()
    model.pack_experts()
    path = tmp_path_factory.mktemp("token-ckpt") / "model.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    from mpismoe_edge.model import load_checkpoint

    return load_checkpoint(ckpt).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """(directory, manifest) of one real, validated export for the module."""
    from mpismoe_edge.export import export_model

    out = tmp_path_factory.mktemp("token-onnx") / "out"
    return out, export_model(model, out, target="ort-cpu", log=None)


@pytest.fixture(scope="module")
def predictor(exported):
    return Predictor.from_dir(exported[0])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- export ----------------------------------------------------------------------------------


def test_export_passes_validation_with_padded_cases_and_the_manifest_says_the_task(exported):
    _, manifest = exported
    assert manifest["task"] == "token-classification" and manifest["labels"] == TAGS
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4
    assert {c["padded"] for c in manifest["parity"]["cases"]} == {True, False}


def test_onnx_logits_have_dynamic_batch_and_sequence_axes(exported):
    (output,) = onnx.load(exported[0] / "onnx" / "model.onnx").graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", len(TAGS)]


def test_onnx_logits_match_torch_on_real_tokens_of_a_padded_batch(model, exported):
    batch = TextEncoder(tiny_tokenizer(), 16).encode(TEXTS)
    feed = batch.arrays()
    assert len(set(feed["attention_mask"].sum(1))) > 1  # rows of different lengths: padding
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    sess = ort.InferenceSession(str(exported[0] / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feed)
    assert got.shape == ref.shape == feed["input_ids"].shape + (len(TAGS),)
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4)


# ---- runtime ---------------------------------------------------------------------------------


def test_predict_logits_gives_each_text_its_real_tokens_whatever_the_chunking(predictor):
    lengths = [len(e.ids) for e in tiny_tokenizer().encode_batch(TEXTS)]
    alone = [predictor.predict_logits([t])[0] for t in TEXTS]
    for bs in (1, 2, 32):
        got = predictor.predict_logits(TEXTS, batch_size=bs)
        assert isinstance(got, list) and [a.shape for a in got] == [(n, len(TAGS)) for n in lengths]
        assert all(a.dtype == np.float32 for a in got)
        for a, b in zip(got, alone):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_predict_labels_each_word_by_its_first_sub_token(predictor):
    text = "I love qqb movies"  # [CLS] i love q ##q ##b movie ##s [SEP]
    first = [1, 2, 3, 6]
    (logits,) = predictor.predict_logits([text])
    probs = _softmax(logits.astype(np.float64))
    assert probs[3].max() != probs[4].max() != probs[5].max()  # the sub-tokens disagree
    (res,) = predictor.predict([text])
    assert res["truncated"] is False
    assert [(w["word"], w["start"], w["end"]) for w in res["words"]] == [
        ("I", 0, 1),
        ("love", 2, 6),
        ("qqb", 7, 10),
        ("movies", 11, 17),
    ]
    for w, t in zip(res["words"], first):
        assert w["word"] == text[w["start"] : w["end"]]
        assert w["label"] == TAGS[int(probs[t].argmax())]
        assert w["score"] == pytest.approx(probs[t].max(), abs=1e-6)


def test_predict_gives_offsets_into_the_original_text(predictor):
    text = "  Café, QQB!"
    words = predictor.predict(text)[0]["words"]
    assert [w["word"] for w in words] == ["Café", ",", "QQB", "!"]
    assert all(text[w["start"] : w["end"]] == w["word"] for w in words)


def test_predict_drops_words_cut_off_by_truncation_and_keeps_a_cut_word_whole(predictor):
    short = Predictor(predictor.session, TextEncoder(tiny_tokenizer(), 5), predictor.manifest, "cpu")
    text = "good qqb ok fine"  # [CLS] good q ##q | ##b ok fine: qqb is cut after ##q
    with pytest.warns(TruncationWarning):
        (res,) = short.predict([text])
    assert res["truncated"] is True
    assert [(w["word"], w["start"], w["end"]) for w in res["words"]] == [("good", 0, 4), ("qqb", 5, 8)]


def test_cli_prints_one_json_line_of_words_per_text(exported, predictor, capsys):
    from mpismoe_edge.runtime.cli import run_main

    assert run_main([str(exported[0]), "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = predictor.predict(TEXTS[:2])
    assert [x["index"] for x in lines] == [0, 1]
    for got, exp in zip(lines, expected):
        assert set(got) == {"index", "words", "truncated"}
        assert [w["word"] for w in got["words"]] == [w["word"] for w in exp["words"]]
        assert [w["label"] for w in got["words"]] == [w["label"] for w in exp["words"]]


# ---- the parity gate -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "tokens"])
def test_parity_cli_compares_every_real_token(ckpt, exported, tmp_path, capsys, fmt):
    from mpismoe_edge.parity import main

    data = tmp_path / "data.jsonl"
    rows = (
        [{"text": t, "label": "O"} for t in TEXTS]
        if fmt == "text"
        else [{"tokens": t.split(), "tags": ["O"] * len(t.split())} for t in TEXTS]
    )
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing truncated, nothing else to say
        assert main([str(ckpt), str(exported[0]), "--data", str(data), "--batch-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["label_agreement"] == 1.0 and report["max_abs_diff"] <= 1e-4
    assert report["n"] == len(TEXTS)
    assert report["tokens"] == sum(len(e.ids) for e in tiny_tokenizer().encode_batch(TEXTS))
    assert report["reference_accuracy"] is None


def test_parity_cli_fails_with_exit_1_when_a_bar_is_missed(ckpt, exported, tmp_path, capsys):
    from mpismoe_edge.parity import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main([str(ckpt), str(exported[0]), "--data", str(data), "--atol", "-1"]) == 1
    out, err = capsys.readouterr()
    assert "tokens=" in out and "parity FAILED" in err
