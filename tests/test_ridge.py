"""side/ridge.py: the closed-form ridge probe of frozen features."""

import pytest
import torch

from mpismoe_edge.side.ridge import fit_probe, ridge_fit


def _normal_equations_residual(x, y, w, alpha):
    x, y = x.double(), y.double()
    return ((x.T @ x + alpha * torch.eye(x.shape[1], dtype=x.dtype)) @ w - x.T @ y).abs().max().item()


@pytest.mark.parametrize("rows", [5, 40])  # fewer rows than features (dual form) and more (primal)
def test_ridge_fit_solves_the_regularized_normal_equations(rows):
    torch.manual_seed(0)
    x, y = torch.randn(rows, 12), torch.randn(rows, 2)
    assert _normal_equations_residual(x, y, ridge_fit(x, y, 3.0), 3.0) < 1e-9


def test_regression_probe_recovers_a_linear_map_on_raw_features():
    torch.manual_seed(0)
    w, b = torch.randn(6), 2.0
    x = torch.randn(200, 6) * 5 + 3  # unstandardized: the probe folds its standardization in
    y = x @ w + b
    probe = fit_probe("regression", x[:150], y[:150], x[150:], y[150:], 1, alphas=(1e-9,))
    pred = x[150:] @ probe.weight.T + probe.bias
    assert probe.scale == 1.0
    torch.testing.assert_close(pred[:, 0], y[150:], atol=1e-3, rtol=1e-4)


def test_classification_probe_outputs_confident_logits_on_separable_data():
    torch.manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(300, 3)
    probe = fit_probe("classification", x[:200], y[:200], x[200:], y[200:], 3)
    logits = x[200:] @ probe.weight.T + probe.bias
    assert probe.val["accuracy"] == 1.0 and (logits.argmax(-1) == y[200:]).all()
    assert probe.scale > 1.0  # one-hot regression alone gives logits near [0, 1]: the scale makes them trainable
    assert probe.val["loss"] < 0.1


def test_probe_chooses_a_strong_strength_when_the_features_are_noise():
    torch.manual_seed(0)
    x, y = torch.randn(60, 50), torch.randn(60)
    probe = fit_probe("regression", x[:30], y[:30], x[30:], y[30:], 1)
    assert probe.alpha >= 1e4


def test_probe_rejects_token_level_or_empty_inputs():
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="token-classification"):
        fit_probe("token-classification", x, y, x, y, 2)
    with pytest.raises(ValueError, match="training and validation rows"):
        fit_probe("classification", x[:0], y[:0], x, y, 2)
