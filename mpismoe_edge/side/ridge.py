"""Closed-form ridge regression: the linear probe of frozen features, as pure tensor functions.

``fit_probe`` is what ``TrainConfig.skip_init="ridge"`` puts into the ladder's linear skip
before the side network trains (``skip_fit.py``): features standardized on the training rows,
the strength chosen on validation by the same rule that chooses epochs
(``selection.selection_key``), the standardization folded into one ``weight`` / ``bias`` pair
that applies to the raw features. ``benchmarks/frozen_probe.py`` shares ``ridge_fit`` and
``ALPHAS`` but keeps its own choice of strength (by Pearson / accuracy, as its tables were made).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import selection_key

ALPHAS = tuple(10.0**k for k in range(6))  # ridge strengths tried: 1 .. 1e5
TEMPERATURES = tuple(2.0 ** (k / 2) for k in range(15))  # logit scales tried for classification: 1 .. 128


def ridge_fit(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weights ``w`` (``[features, outputs]``) minimizing ``|x w - y|^2 + alpha |w|^2``, in float64;
    the dual form when there are fewer rows than features."""
    x, y = x.double(), y.double()
    n, d = x.shape
    if n < d:
        return x.T @ torch.linalg.solve(x @ x.T + alpha * torch.eye(n, dtype=x.dtype), y)
    return torch.linalg.solve(x.T @ x + alpha * torch.eye(d, dtype=x.dtype), x.T @ y)


@dataclass
class Probe:
    """``x @ weight.T + bias``: the chosen linear map on raw features, and how it was chosen."""

    weight: torch.Tensor  # [outputs, features], float32
    bias: torch.Tensor  # [outputs]
    alpha: float
    scale: float  # classification: the logit temperature chosen on validation; regression 1
    val: dict[str, float]  # the chosen map's validation metrics, as ``inference.evaluate`` names them


def _metrics(task: str, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    if task == "regression":
        mse = torch.mean((pred[:, 0] - y.double()) ** 2).item()
        return {"loss": mse, "mse": mse}
    loss = torch.nn.functional.cross_entropy(pred, y).item()
    return {"loss": loss, "accuracy": (pred.argmax(-1) == y).double().mean().item()}


def fit_probe(
    task: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_outputs: int,
    alphas: tuple[float, ...] = ALPHAS,
) -> Probe:
    """Ridge from features to targets (class ids: the centered one-hot; regression: the values),
    the strength best on validation; for classification then the logit scale of least
    validation loss, so that the map's outputs are logits a cross-entropy can train on."""
    if task not in ("regression", "classification"):
        raise ValueError(f"a ridge probe fits 'regression' or 'classification' outputs, not {task!r}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("a ridge probe needs training and validation rows")
    x_train, x_val = x_train.double(), x_val.double()
    if task == "regression":
        y = y_train.double().reshape(-1, 1)
    else:
        y = torch.nn.functional.one_hot(y_train.long(), num_outputs).double()
        y_val = y_val.long()
    offset = y.mean(0)
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False) + 1e-6
    z_train, z_val = (x_train - mu) / sd, (x_val - mu) / sd
    scales = (1.0,) if task == "regression" else TEMPERATURES  # a scale cannot change argmax: least loss wins
    best = None
    for alpha in alphas:
        w = ridge_fit(z_train, y - offset, alpha)
        pred = z_val @ w + offset
        for scale in scales:
            key = selection_key(_metrics(task, scale * pred, y_val), task)
            if best is None or key > best[0]:
                best = (key, alpha, scale, w)
    _, alpha, scale, w = best
    weight = (w / sd[:, None]) * scale  # on raw features: (x - mu) / sd @ w
    bias = (offset - mu @ (w / sd[:, None])) * scale
    val = _metrics(task, x_val @ weight + bias, y_val)
    return Probe(weight.T.float().contiguous(), bias.float(), alpha, scale, val)
