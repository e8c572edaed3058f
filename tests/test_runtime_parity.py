"""mpismoe_edge.runtime.parity: pure-numpy logits comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpismoe_edge.runtime.parity import (
    accuracy,
    compare_logits,
    label_agreement,
    labels_to_indices,
    max_abs_diff,
    text_abs_diffs,
)

RNG = np.random.default_rng(0)
REF = RNG.normal(size=(50, 3)).astype(np.float32)
GOLD = REF.argmax(-1)


def test_identical_passes():
    r = compare_logits(REF, REF.copy(), labels=GOLD)
    assert r.passed and r.failures == []
    assert r.max_abs_diff == 0.0 and r.label_agreement == 1.0
    assert r.reference_accuracy == r.candidate_accuracy == 1.0
    assert "PASS" in r.summary()
    json.dumps(r.to_dict())


def test_small_noise_within_atol():
    cand = REF + RNG.uniform(-1e-4, 1e-4, size=REF.shape).astype(np.float32)
    r = compare_logits(REF, cand, atol=1e-3)
    assert r.passed and 0 < r.max_abs_diff <= 1e-3
    assert not compare_logits(REF, cand, atol=1e-6).passed


def test_argmax_flips_lower_agreement():
    cand = REF.copy()
    cand[:5] = -cand[:5]  # flips most of the first five rows
    agree = label_agreement(REF, cand)
    assert agree < 1.0
    r = compare_logits(REF, cand, labels=GOLD, atol=None, min_agreement=0.99)
    assert not r.passed and any("agreement" in f for f in r.failures)
    assert r.candidate_accuracy == pytest.approx(agree)
    assert compare_logits(REF, cand, atol=None, min_agreement=0.5).passed
    r = compare_logits(REF, cand, labels=GOLD, atol=None, min_agreement=None, max_accuracy_drop=0.01)
    assert not r.passed and "accuracy dropped" in r.summary()


def test_nan_fails_not_raises():
    cand = REF.copy()
    cand[3, 1] = np.nan
    r = compare_logits(REF, cand, atol=1.0, min_agreement=0.0)
    assert not r.passed and r.max_abs_diff == float("inf")
    assert any("NaN" in f for f in r.failures)
    assert max_abs_diff(REF, cand) == float("inf")


@pytest.mark.parametrize(
    "reference, candidate, options, message",
    [
        (REF, REF[:, :2], {}, r"shape mismatch: reference \[50, 3\] vs candidate \[50, 2\]"),
        (np.zeros((0, 3)), np.zeros((0, 3)), {}, "n > 0"),
        (np.array([["a"]]), np.array([["a"]]), {}, "reference must be numeric"),
        (REF, REF, {"task": "ranking"}, "unknown task .ranking.; expected one of"),
    ],
    ids=["shape", "empty", "strings", "task"],
)
def test_inputs_that_cannot_be_compared_are_refused(reference, candidate, options, message):
    with pytest.raises(ValueError, match=message):
        compare_logits(reference, candidate, **options)


NAMES = ["neg", "neu", "pos"]


def test_gold_labels_may_be_names():
    gold_names = [NAMES[i] for i in GOLD]
    np.testing.assert_array_equal(labels_to_indices(gold_names, NAMES), GOLD)
    assert compare_logits(REF, REF, labels=gold_names, label_names=NAMES).reference_accuracy == 1.0


def test_accuracy_is_the_fraction_of_rows_whose_argmax_is_the_label():
    gold = GOLD.copy()
    gold[:10] = (gold[:10] + 1) % 3
    assert accuracy(REF, gold) == pytest.approx(40 / 50)


@pytest.mark.parametrize(
    "labels, names, message",
    [
        (["other"], NAMES, r"label #0: label 'other' is neither one of \['neg', 'neu', 'pos'\]"),
        (["neg"], None, "label #0: label 'neg' is not a class index"),
    ],
    ids=["unknown-name", "name-without-names"],
)
def test_a_label_that_is_no_class_is_refused(labels, names, message):
    with pytest.raises(ValueError, match=message):
        labels_to_indices(labels, names)


def test_an_id_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        accuracy(REF, [7] * len(REF))


def test_regression():
    ref = RNG.normal(size=(20,))
    r = compare_logits(ref, ref + 1e-5, task="regression", atol=1e-4)
    assert r.passed and r.label_agreement is None and r.reference_accuracy is None
    assert not compare_logits(ref, ref + 1e-2, task="regression", atol=1e-4).passed


TOKEN_REF = [RNG.normal(size=(n, 3)).astype(np.float32) for n in (4, 9, 2)]  # one [tokens, labels] per text


def test_token_classification_compares_every_token():
    r = compare_logits(TOKEN_REF, [x.copy() for x in TOKEN_REF], task="token-classification")
    assert r.passed and r.n == 3 and r.tokens == 15 and r.label_agreement == 1.0
    assert "tokens=15" in r.summary() and r.to_dict()["tokens"] == 15


def test_token_classification_agreement_is_per_token():
    cand = [x.copy() for x in TOKEN_REF]
    cand[1][0] = 0.0
    cand[1][0, (TOKEN_REF[1][0].argmax() + 1) % 3] = 100.0  # one token of one text picks another label
    r = compare_logits(TOKEN_REF, cand, task="token-classification", atol=None, min_agreement=0.99)
    assert r.label_agreement == pytest.approx(14 / 15)
    assert not r.passed and any("agreement" in f for f in r.failures)


@pytest.mark.parametrize(
    "reference, candidate, options, message",
    [
        (TOKEN_REF, [TOKEN_REF[0], TOKEN_REF[1][:-1], TOKEN_REF[2]], {}, "shape mismatch at text 1"),
        (TOKEN_REF, TOKEN_REF[:2], {}, "3 texts, candidate 2"),
        (REF, REF, {}, r"list of \[tokens, labels\] arrays"),
        (TOKEN_REF, TOKEN_REF, {"labels": [0, 1, 2]}, "gold labels are not supported"),
    ],
    ids=["token-count", "text-count", "not-per-text", "gold-labels"],
)
def test_token_logits_that_cannot_be_compared_are_refused(reference, candidate, options, message):
    with pytest.raises(ValueError, match=message):
        compare_logits(reference, candidate, task="token-classification", **options)


def test_sequence_reports_have_no_token_count():
    assert "tokens" not in compare_logits(REF, REF).to_dict()
    assert "tokens" not in compare_logits(REF, REF).summary()


def _jump(rows, by=6e-3):
    """REF with ``rows`` moved by ``by`` (as a flipped routing choice moves one text's logits)."""
    cand = REF.copy()
    cand[rows, 0] += by
    return cand


def test_a_text_past_atol_fails_and_the_failure_counts_the_texts():
    r = compare_logits(REF, _jump([7, 9]), atol=1e-3)
    assert not r.passed and r.over_atol == 2
    assert r.failures == ["max_abs_diff 0.006 > atol 0.001 (2 of 50 texts past atol)"]


def test_a_routing_flip_is_counted_and_judged_by_its_label_not_by_atol():
    r = compare_logits(REF, _jump([7]), atol=1e-3, routing_flips=[7])
    assert r.passed and r.over_atol == 1 and r.routing_flips == [7]
    assert r.max_abs_diff == pytest.approx(6e-3, rel=1e-3) and r.max_abs_diff_without_flips == 0.0
    assert "1 of 50 texts past atol 0.001, 1 by a routing flip (judged by labels)" in r.summary()


def test_a_routing_flip_does_not_excuse_another_text():
    r = compare_logits(REF, _jump([7, 9]), atol=1e-3, routing_flips=[7])
    assert not r.passed and r.over_atol == 2
    assert r.failures == ["max_abs_diff 0.006 > atol 0.001 (1 of 50 texts past atol not explained by a routing flip)"]


def test_a_routing_flip_that_changes_a_label_counts_against_the_agreement():
    cand = REF.copy()
    cand[7] = cand[7][::-1] * 10  # another argmax
    r = compare_logits(REF, cand, atol=1e-3, min_agreement=0.99, routing_flips=[7])
    assert not r.passed and r.failures == ["label agreement 0.9800 < 0.99"]


@pytest.mark.parametrize("flips", [[50], [-1]])
def test_a_routing_flip_index_outside_the_texts_is_refused(flips):
    with pytest.raises(ValueError, match=r"routing_flips must be text indices in \[0, 50\)"):
        compare_logits(REF, REF, routing_flips=flips)


def test_token_logits_count_texts_past_atol_not_tokens():
    ref = [np.zeros((3, 2)), np.zeros((4, 2)), np.zeros((2, 2))]
    cand = [r.copy() for r in ref]
    cand[1][1:3, 0] = 0.5  # two tokens of text 1
    r = compare_logits(ref, cand, task="token-classification", atol=1e-3, routing_flips=[1])
    assert r.over_atol == 1 and r.passed and r.max_abs_diff_without_flips == 0.0
    assert text_abs_diffs(ref, cand, "token-classification").tolist() == [0.0, 0.5, 0.0]
