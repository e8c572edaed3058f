"""runtime/tasks.py: each task kind is one record that training, export and the runtime ask."""

import numpy as np
import pytest
import torch

from mpismoe_edge.runtime.tasks import KINDS, TASKS, Task, kind

MULTI = "multi-label-classification"


def test_the_task_enum_and_names_are_the_records():
    assert list(TASKS) == list(KINDS) == ["classification", "regression", "token-classification", MULTI]
    assert [t.value for t in Task] == list(TASKS)
    assert kind(Task.TOKEN_CLASSIFICATION) is KINDS["token-classification"]


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'ner'; expected one of classification, regression"):
        kind("ner")


@pytest.mark.parametrize(
    "task, pipeline, problem_type, outputs",
    [
        ("classification", "text-classification", "single_label_classification", 3),
        ("regression", "text-classification", "regression", 1),
        ("token-classification", "token-classification", None, 3),
        (MULTI, "text-classification", "multi_label_classification", 3),
    ],
)
def test_each_kind_names_its_hugging_face_head_and_output_width(task, pipeline, problem_type, outputs):
    k = kind(task)
    assert (k.pipeline, k.problem_type, k.num_outputs(["a", "b", "c"])) == (pipeline, problem_type, outputs)


def test_multi_label_targets_are_one_hot_rows_over_every_label():
    target = kind(MULTI).targets([None, None], [[0, 2], []], ["a", "b", "c"])
    assert target.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_multi_label_loss_is_the_binary_cross_entropy_of_each_label():
    logits, target = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 1.0]])
    total, count = kind(MULTI).loss_sum(logits, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert count.item() == 1 and total.item() == pytest.approx(expected.item())


def test_multi_label_metrics_are_micro_f1_over_label_decisions_and_exact_match():
    k, labels = kind(MULTI), ["a", "b", "c"]
    logits = torch.tensor([[3.0, -3.0, 2.0], [1.0, 1.0, -1.0]])  # decides {a, c} and {a, b}
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # gold {a, c} and {b}
    counts = dict(zip(k.count_names, k.counts(logits, target, labels)))
    assert counts == {"exact": 1.0, "gold": 3.0, "found": 4.0, "matched": 3.0}
    metrics = k.metrics(0.5, 2, counts, labels)
    assert metrics["micro_f1"] == pytest.approx(2 * 0.75 * 1.0 / 1.75) and metrics["exact_match"] == 0.5


def test_multi_label_output_is_read_with_a_sigmoid_and_a_threshold_per_label():
    out = kind(MULTI).read(np.array([2.0, -2.0, 0.1]), ["sports", "politics", "tech"])
    assert out["labels"] == ["sports", "tech"]
    assert out["probabilities"]["politics"] == pytest.approx(1 / (1 + np.exp(2.0)))
    assert kind(MULTI).answer(np.array([-1.0, -1.0, -1.0]), ["a", "b", "c"]) == []


@pytest.mark.parametrize(
    "task, logits, answer",
    [
        ("classification", [0.1, 2.0, -1.0], "b"),
        ("regression", [0.25], 0.25),
        (MULTI, [1.0, -1.0, 3.0], ["a", "c"]),
    ],
)
def test_each_kind_answers_in_its_own_form(task, logits, answer):
    assert kind(task).answer(np.array(logits), ["a", "b", "c"]) == answer


def test_parity_compares_argmax_for_classes_label_sets_for_multi_label_and_nothing_for_regression():
    logits = np.array([[0.5, -0.2, 1.0]])
    assert kind("classification").decisions(logits).tolist() == [2]
    assert kind(MULTI).decisions(logits).tolist() == [[True, False, True]]
    assert kind("regression").decisions(logits) is None


def test_the_selection_score_is_larger_for_better_epochs_of_every_kind():
    assert kind("regression").score({"mse": 0.2}) > kind("regression").score({"mse": 0.3})
    assert kind("token-classification").score({"accuracy": 0.9}) == 0.9  # tags that are not BIO
    assert kind("token-classification").score({"accuracy": 0.9, "entity_f1": 0.4}) == 0.4


def test_importing_the_records_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, mpismoe_edge.runtime.tasks; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
