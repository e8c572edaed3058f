"""mpismoe_edge.metrics: entity spans as seqeval's default mode reads them, F1, correlations."""

from __future__ import annotations

import math

import pytest

from mpismoe_edge import metrics


def test_an_entity_runs_from_b_over_i_tags_of_its_type():
    assert metrics.entities(["B-loc", "I-loc", "O", "B-per"]) == {("loc", 0, 1), ("per", 3, 3)}


def test_an_i_tag_after_o_or_another_type_starts_an_entity():
    assert metrics.entities(["O", "I-loc", "I-per", "I-per"]) == {("loc", 1, 1), ("per", 2, 3)}


def test_b_after_b_of_the_same_type_starts_a_new_entity():
    assert metrics.entities(["B-loc", "B-loc"]) == {("loc", 0, 0), ("loc", 1, 1)}


def test_entity_f1_counts_exact_type_and_span_matches():
    true = [["B-loc", "I-loc", "O"], ["B-per", "O", "O"]]
    pred = [["B-loc", "O", "O"], ["B-per", "O", "B-org"]]  # a cut span, one right, one spurious
    assert metrics.entity_f1(true, pred) == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4})


def test_predicting_no_entities_scores_zero_f1():
    assert metrics.entity_f1([["B-loc"]], [["O"]])["f1"] == 0.0


def test_entity_f1_needs_aligned_sequences():
    with pytest.raises(ValueError):
        metrics.entity_f1([["O", "O"]], [["O"]])


def test_pearson_of_a_linear_relation_is_one_and_of_a_constant_zero():
    assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) == pytest.approx(
        4.5 / math.sqrt(2 * 61 / 6)
    )  # sxy / sqrt(sxx syy)
    assert metrics.pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0


def test_ties_share_their_mean_rank():
    assert metrics.ranks([10.0, 20.0, 10.0, 30.0]) == [1.5, 3.0, 1.5, 4.0]


def test_spearman_sees_only_the_order():
    assert metrics.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    assert metrics.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_accuracy_is_the_fraction_equal():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    assert not math.isnan(metrics.accuracy([1], [0]))
