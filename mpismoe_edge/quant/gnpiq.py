"""GNP-IQ: Gaussian Noise Perturbed Iterative Quantization.

Our reading of the MP-ISMoE paper's abstract (arXiv 2605.04058), which names the method but
does not spell out every step. For each group of G weights ``w`` along the input dimension we
search an asymmetric grid ``w ~ s * (q - z)`` with integer codes ``q in [0, 2^b - 1]`` and a
real zero point ``z`` (an integer one at 8 bits, where ONNX Runtime's kernel wants uint8):

1. Start from min-max round-to-nearest (RTN).
2. Iterate: round ``q = clamp(round(w / s + z))``; refit the grid by least squares
   (``w ~ a*q + c`` gives ``s = a``, ``z = -c / a``; at 8 bits ``z`` is rounded and ``s`` refit).
   Each step cannot raise the error of the grid it refits, so it descends to a local optimum.
3. Perturb: restart from the best grid so far with Gaussian noise added to the codes before
   rounding (``sigma`` shrinks over restarts), iterate again.
4. Keep, per group, the grid with the least squared error over all restarts.

All groups of a layer are processed at once as rows of one tensor. Deterministic for a seed.
"""
from __future__ import annotations

import torch

from .rtn import GroupQuant, as_groups, check_weight, encode, from_groups, minmax_params


def _refit(w: torch.Tensor, q: torch.Tensor, qmax: int, int_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale and zero point for fixed codes ``q`` (rows of ``w``)."""
    qm, wm = q.mean(1, keepdim=True), w.mean(1, keepdim=True)
    var = ((q - qm) ** 2).sum(1)
    a = ((q - qm) * (w - wm)).sum(1) / var.clamp(min=1e-12)
    a = torch.where(var > 0, a, torch.ones_like(a)).clamp(min=1e-12)
    c = wm.squeeze(1) - a * qm.squeeze(1)
    z = -c / a
    if not int_zero:
        return a, z
    z = torch.round(z).clamp(0, qmax)
    d = q - z[:, None]
    s = (d * w).sum(1) / (d * d).sum(1).clamp(min=1e-12)
    return s.clamp(min=1e-12), z


def _err(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return ((w - s[:, None] * (q - z[:, None])) ** 2).sum(1)


def gnpiq_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    iters: int = 8,
    restarts: int = 6,
    noise: float = 1.0,
    shrinks: int = 8,
    seed: int = 0,
    name: str = "weight",
) -> GroupQuant:
    """Quantize ``weight`` ``[N, K]`` with GNP-IQ; see the module docstring."""
    check_weight(weight, bits, group_size, name)
    qmax = (1 << bits) - 1
    w = as_groups(weight, group_size)
    gen = torch.Generator().manual_seed(seed)
    int_zero = bits == 8

    s, z = minmax_params(w, qmax)
    best_q = encode(w, s, z, qmax)
    best_s, best_z = s, z
    best_err = _err(w, best_q, s, z)
    lo, hi = w.amin(1), w.amax(1)
    grid = torch.linspace(1.0, 0.25, shrinks).tolist()
    for a in grid:  # 2-D search over clipped ranges [a*lo, b*hi]
        for b in grid:
            s2 = ((b * hi - a * lo) / qmax).clamp(min=1e-12)
            z2 = -a * lo / s2
            if int_zero:
                z2 = torch.round(z2).clamp(0, qmax)
            q2 = encode(w, s2, z2, qmax)
            err = _err(w, q2, s2, z2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s2, best_s)
            best_z = torch.where(better, z2, best_z)
            best_q = torch.where(better[:, None], q2, best_q)
    for r in range(restarts + 1):
        if r == 0:
            s, z = best_s, best_z
            q = best_q
        else:
            sigma = noise * (1.0 - (r - 1) / restarts)
            eps = torch.randn(w.shape, generator=gen) * sigma
            q = torch.clamp(torch.round(w / best_s[:, None] + best_z[:, None] + eps), 0, qmax)
        for _ in range(iters):
            s, z = _refit(w, q, qmax, int_zero)
            q = encode(w, s, z, qmax)
            err = _err(w, q, s, z)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_q = torch.where(better[:, None], q, best_q)
    return from_groups(best_q, best_s, best_z, weight.shape, bits, group_size)
