"""Choosing the epoch and the length of training: the metric first, the loss breaks ties, small data takes min_steps."""

from mpismoe_edge.selection import planned_epochs, selection_key, should_stop


def test_a_tied_accuracy_with_a_lower_loss_is_the_better_epoch():
    stuck = {"accuracy": 0.40, "loss": 1.05}
    learning = {"accuracy": 0.40, "loss": 0.98}
    assert selection_key(learning, "classification") > selection_key(stuck, "classification")


def test_a_higher_accuracy_wins_over_a_lower_loss():
    better, worse = {"accuracy": 0.60, "loss": 1.2}, {"accuracy": 0.59, "loss": 0.5}
    assert selection_key(better, "classification") > selection_key(worse, "classification")


def test_entity_f1_judges_token_classification_and_mse_judges_regression():
    token = "token-classification"
    assert selection_key({"accuracy": 0.90, "entity_f1": 0.2, "loss": 1.0}, token) > selection_key(
        {"accuracy": 0.95, "entity_f1": 0.1, "loss": 0.5}, token
    )
    assert selection_key({"mse": 0.5, "loss": 0.5}, "regression") > selection_key(
        {"mse": 0.7, "loss": 0.7}, "regression"
    )


def test_token_classification_without_bio_tags_is_judged_by_word_accuracy():
    token = "token-classification"
    assert selection_key({"accuracy": 0.9, "loss": 1.0}, token) > selection_key({"accuracy": 0.8, "loss": 0.5}, token)


def test_micro_f1_judges_multi_label_classification():
    task = "multi-label-classification"
    better, worse = (
        {"micro_f1": 0.7, "exact_match": 0.2, "loss": 0.9},
        {"micro_f1": 0.6, "exact_match": 0.5, "loss": 0.3},
    )
    assert selection_key(better, task) > selection_key(worse, task)


def test_small_data_gets_enough_epochs_for_the_minimum_steps():
    assert planned_epochs(3, rows=500, batch_size=32, min_steps=200) == 13  # 16 steps an epoch
    assert planned_epochs(3, rows=4000, batch_size=32, min_steps=200) == 3  # 125 steps an epoch: unchanged
    assert planned_epochs(3, rows=500, batch_size=32, min_steps=0) == 3


def test_early_stopping_waits_for_the_minimum_steps():
    assert not should_stop(bad_epochs=5, patience=2, steps_done=160, min_steps=200)
    assert should_stop(bad_epochs=2, patience=2, steps_done=208, min_steps=200)
    assert not should_stop(bad_epochs=1, patience=2, steps_done=208, min_steps=200)
