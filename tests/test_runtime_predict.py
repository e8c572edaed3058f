"""Predictor: labels, probabilities, scores and logits of a tiny ONNX classifier, as numpy computes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_models import LABELS, TEXTS, build_model_dir, reference_logits

from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.session import TruncationWarning


def test_logits_are_the_models_computation_in_input_order(predictor, model_dir):
    logits = predictor.predict_logits(TEXTS)
    assert logits.shape == (len(TEXTS), len(LABELS)) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference_logits(model_dir, TEXTS, 32), atol=1e-5)


def test_a_classification_result_is_label_probabilities_and_truncated(predictor):
    assert all(set(r) == {"label", "probabilities", "truncated"} for r in predictor.predict(TEXTS))


def test_probabilities_are_the_softmax_of_the_logits_in_label_order(predictor):
    logits = predictor.predict_logits(TEXTS).astype(np.float64)
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    for res, row in zip(predictor.predict(TEXTS), softmax):
        assert list(res["probabilities"]) == LABELS
        assert list(res["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-9)


def test_the_label_is_the_argmax(predictor):
    logits = predictor.predict_logits(TEXTS)
    assert [r["label"] for r in predictor.predict(TEXTS)] == [LABELS[int(i)] for i in logits.argmax(-1)]


def test_short_texts_are_not_flagged_truncated(predictor):
    assert [r["truncated"] for r in predictor.predict(TEXTS)] == [False] * len(TEXTS)


def test_the_predictor_reports_its_provider_labels_and_task(predictor):
    assert (predictor.provider, predictor.labels, predictor.task) == ("cpu", LABELS, "classification")
    assert repr(predictor) == f"Predictor(task='classification', labels={LABELS}, max_length=32, provider='cpu')"


def test_a_single_string_is_one_text(predictor):
    assert len(predictor.predict("great phone")) == 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_padding_does_not_change_logits(predictor, batch_size):
    alone = predictor.predict_logits(["bad battery"])
    longer = [
        "the movie was really really awful but the phone was fine " * 2,
        "bad battery",
        "the phone is good and the battery is very good",
    ]
    batched = predictor.predict_logits(longer, batch_size=batch_size)
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(batched, predictor.predict_logits(longer, batch_size=1), atol=1e-5)


LONG = "the phone is very very very good and the battery is fine"


def test_a_text_over_max_length_is_flagged_and_warned_about(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", max_length=8))
    with pytest.warns(TruncationWarning, match="1 of 2"):
        res = p.predict([LONG, "bad"])
    assert [r["truncated"] for r in res] == [True, False]


def test_a_truncated_text_is_run_on_its_first_max_length_tokens(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", max_length=8))
    with pytest.warns(TruncationWarning):
        logits = p.predict_logits([LONG])
    np.testing.assert_allclose(logits, reference_logits(tmp_path / "out", [LONG], 8), atol=1e-5)


def test_a_regression_result_is_a_float_score(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", task="regression"))
    logits = p.predict_logits(["good", "bad phone"])
    assert p.predict(["good", "bad phone"]) == [
        {"score": pytest.approx(float(v[0])), "truncated": False} for v in logits
    ]


def test_token_classification_needs_per_token_logits(tmp_path):
    out = build_model_dir(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "task": "token-classification"}))
    p = Predictor.from_dir(out)
    with pytest.raises(
        ValueError, match=r"must return logits \[batch, seq, labels\] \(\[1, 4, labels\] here\), got \[1, 3\]"
    ):
        p.predict(["good phone"])


def test_graph_optimization_and_threads_do_not_change_logits(model_dir, predictor):
    p = Predictor.from_dir(model_dir, threads=1, graph_optimization="disable")
    np.testing.assert_allclose(p.predict_logits(TEXTS), predictor.predict_logits(TEXTS), atol=1e-6)


def test_a_model_with_external_data_runs(tmp_path):
    out = build_model_dir(tmp_path / "out", external=True)
    assert (out / "model.onnx.data").is_file()
    np.testing.assert_allclose(
        Predictor.from_dir(out).predict_logits(TEXTS), reference_logits(out, TEXTS, 32), atol=1e-5
    )


def _feed(predictor, texts):
    return predictor.encoder.encode(texts).arrays()


def test_run_arrays_matches_predict(predictor):
    texts = ["good phone", "awful battery and poor movie"]
    np.testing.assert_allclose(
        predictor.run_arrays(_feed(predictor, texts)), predictor.predict_logits(texts), atol=1e-6
    )


def test_a_float_mask_model_takes_texts_and_float_feeds(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", float_mask=True))
    assert p.input_spec()["attention_mask"][0] == "float32"
    feed = _feed(p, ["good phone"])
    feed["attention_mask"] = feed["attention_mask"].astype(np.float32)
    np.testing.assert_allclose(p.run_arrays(feed), p.predict_logits(["good phone"]), atol=1e-6)
