"""benchmarks/frozen_probe.py: the closed-form ridge and the strength chosen on validation, on synthetic features."""

from __future__ import annotations

import torch

from benchmarks import frozen_probe as probe
from mpismoe_edge.data import Dataset


def test_ridge_fit_matches_the_primal_solution():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 50, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64)
    primal = torch.linalg.solve(x.T @ x + 3.0 * torch.eye(50, dtype=x.dtype), x.T @ y)
    assert torch.allclose(probe.ridge_fit(x, y, 3.0), primal, atol=1e-10)


def test_probe_recovers_a_linear_regression_target_and_scores_it_by_pearson():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, generator=g)
    feats = {s: torch.randn(n, 8, generator=g) for s, n in (("train", 200), ("val", 50), ("test", 50))}
    splits = {s: Dataset([f"{s}{i}" for i in range(len(f))], (f @ w).tolist(), []) for s, f in feats.items()}
    alpha, val, test = probe.probe("regression", feats, splits)
    assert alpha == min(probe.ALPHAS) and val > 0.99 and test > 0.99


def test_probe_classifies_separable_classes_by_argmax():
    g = torch.Generator().manual_seed(2)
    feats, splits = {}, {}
    for s, n in (("train", 120), ("val", 30), ("test", 30)):
        y = torch.arange(n) % 3
        feats[s] = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(n, 3, generator=g)
        splits[s] = Dataset([f"{s}{i}" for i in range(n)], y.tolist(), ["a", "b", "c"])
    assert probe.probe("classification", feats, splits)[2] == 1.0


def test_a_missing_task_folder_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert probe.main(["--data", str(tmp_path), "--tasks", "vader-movies"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "fetch_tasks.py" in out.err
