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


def _train_on_random_states(state, stop_at: int | None = None):
    """Three epochs of an MP-ISMoE side network on random states of a tiny backbone; ``stop_at``:
    the validation of that epoch raises (a kill)."""
    import pytest
    import torch
    from conftest import tiny_backbone

    import benchmarks.side_probe as sp
    from mpismoe_edge.config import SideConfig
    from mpismoe_edge.train import TrainConfig

    backbone = tiny_backbone(hidden=128)  # side width 16: one expert group
    gen = torch.Generator().manual_seed(0)
    split = {
        "states": [torch.randn(3, 5 + i % 4, 128, generator=gen).half() for i in range(24)],  # [L+1, T, H]
        "targets": [torch.tensor(i % 2) for i in range(24)],
    }
    calls = iter(range(1, 10))
    scores = sp._scores

    def scored(*args):
        if next(calls) == stop_at:
            raise KeyboardInterrupt
        return scores(*args)

    tcfg = TrainConfig(epochs=3, batch_size=8, min_steps=0, patience=5, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sp, "_scores", scored)
        try:
            model, run = sp.train_on_states(SideConfig(expert_bits=4), tcfg, {"train": split, "val": split},
                                            "classification", ["a", "b"], backbone, 16, "t", False, test=False,
                                            state=state)  # fmt: skip
        except KeyboardInterrupt:
            return None, None
    return model, run


def test_a_run_on_cached_states_continues_from_its_state_to_the_same_weights(tmp_path):
    import torch

    whole, run = _train_on_random_states(None)
    assert _train_on_random_states(tmp_path / "state.pt", stop_at=3)[0] is None  # epochs 1-2 are saved
    again, resumed = _train_on_random_states(tmp_path / "state.pt")
    assert resumed["resumed"] == 2 and resumed["epochs"] == run["epochs"] == 3 and resumed["epoch"] == run["epoch"]
    assert resumed["val_score"] == run["val_score"]
    assert all(torch.equal(a, b) for a, b in zip(whole.side.state_dict().values(), again.side.state_dict().values()))
