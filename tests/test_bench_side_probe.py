"""benchmarks/side_probe.py's leave-one-task-out choice: a task's variant is picked by the other tasks."""

from benchmarks.side_probe import group_runs, leave_one_out, pick_by_validation

VARIANTS = {"base": {}, "a": {}, "b": {}}


def _rows(test_by_task_variant: dict) -> list[dict]:
    return [{"task": t, "variant": v, "seed": 0, "test": score} for (t, v), score in test_by_task_variant.items()]


def test_a_held_out_task_gets_the_variant_that_gained_most_on_the_others():
    scores = {
        ("x", "base"): 50, ("x", "a"): 52, ("x", "b"): 49,
        ("y", "base"): 50, ("y", "a"): 51, ("y", "b"): 50,
        ("z", "base"): 50, ("z", "a"): 40, ("z", "b"): 60,  # z's own result does not pick z's variant
    }  # fmt: skip
    runs = group_runs(_rows(scores), ["x", "y", "z"], [0], VARIANTS)
    assert leave_one_out(runs, ["x", "y", "z"], VARIANTS, "base") == {"x": "b", "y": "b", "z": "a"}


def test_the_base_is_kept_where_no_variant_gained_on_the_others():
    scores = {("x", "base"): 50, ("x", "a"): 49, ("y", "base"): 50, ("y", "a"): 70}
    runs = group_runs(_rows(scores), ["x", "y"], [0], {"base": {}, "a": {}})
    assert leave_one_out(runs, ["x", "y"], {"base": {}, "a": {}}, "base") == {"x": "a", "y": "base"}


def test_pick_by_validation_keeps_each_runs_better_validating_variant_and_the_base_on_a_tie():
    rows = [
        {"task": "x", "backbone": "m", "seed": s, "variant": v, "val_score": val, "test": test}
        for s, v, val, test in [(0, "base", 0.5, 50), (0, "a", 0.6, 40), (1, "base", 0.7, 70), (1, "a", 0.7, 90),
                                (2, "base", 0.1, 10)]  # seed 2: "a" did not run
    ]  # fmt: skip
    picked = pick_by_validation(rows, "base", "a")
    assert [(r["seed"], r["test"]) for r in picked] == [(0, 40), (1, 70)]
    assert {r["variant"] for r in picked} == {"base or a, by validation"}


def test_token_targets_are_padded_with_the_ignored_target():
    import torch

    from benchmarks.side_probe import _targets
    from mpismoe_edge.runtime.tasks import IGNORE

    out = _targets([torch.tensor([1, 2, 3]), torch.tensor([4])], token_level=True)
    assert out.tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]
    assert _targets([torch.tensor(1), torch.tensor(0)], token_level=False).tolist() == [1, 0]
