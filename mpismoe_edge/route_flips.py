"""Routing flips: a text whose logits differ between PyTorch and an export because one token's
top-k expert choice fell the other way on a near tie.

ISMoE picks each token's top-k experts by its router logits. Two runtimes compute those logits
with different rounding (~1e-7 apart on the float-exact targets), so where the k-th and
(k+1)-th logits of a token are closer than that, PyTorch and ONNX Runtime may pick different
experts. The routing weight moves from one expert to another: a jump in that token's output
(not a small error) that reaches the text's logits (6e-3 on one text of 500 in a trained news
model, while every other text stayed within 5e-6). Both choices are right; neither runtime is
wrong, and no tie-break rule removes ties that depend on rounding.

:func:`find_routing_flips` confirms such a flip instead of guessing it: for each text whose
logits are past ``atol``, it runs PyTorch on the text alone, lists the (layer, token) choices
whose top-k margin is within ``atol``, and re-runs with one of them (or all at once) pinned to
the other expert. When the pinned run matches the candidate's logits within ``atol``, the
difference is that flip and nothing else. ``mpismoe-parity`` reports such texts apart and
judges them by their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .runtime.parity import abs_diff

MAX_TEXTS = 50  # texts past atol examined at most (each costs a few single-text forwards)
MAX_CANDIDATES = 8  # near-tie choices tried per text, smallest margins first


@dataclass(frozen=True)
class RoutingFlip:
    """One text's logit difference explained by one flipped top-k choice (or several, ``token`` -1)."""

    index: int  # the text's position among the compared texts
    layer: int  # MoE layer (0-based, in side-network order)
    token: int  # token position in the text's sequence (special tokens included); -1: several choices
    experts: tuple[int, int]  # the reference's k-th pick, and the (k+1)-th expert the candidate took instead
    margin: float  # the reference's router-logit gap between those two experts
    max_abs_diff: float  # |reference - candidate| on this text
    pinned_abs_diff: float  # |reference with the choice pinned the other way - candidate|

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Choice:
    layer: int
    token: int
    experts: tuple[int, int]
    margin: float


def _routers(model) -> list:
    return [moe.router for moe in model.side.moe_layers()]


@contextmanager
def _hooks(model, hook_for):
    handles = [r.register_forward_hook(hook_for(i, r)) for i, r in enumerate(_routers(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _near_ties(model, text: str, tol: float) -> list[_Choice]:
    """The text's top-k choices whose margin (k-th minus (k+1)-th router logit) is at most ``tol``,
    smallest first."""
    found: list[_Choice] = []

    def hook_for(layer, router):
        def hook(_module, _args, output):
            logits = output[1][0].detach().float()  # [tokens, experts]; one text, no padding
            k = router.top_k
            if k >= logits.shape[-1]:
                return
            vals, idx = logits.topk(k + 1, dim=-1)
            gaps = vals[:, k - 1] - vals[:, k]
            for t in torch.nonzero(gaps <= tol).flatten().tolist():
                pair = (int(idx[t, k - 1]), int(idx[t, k]))
                found.append(_Choice(layer, t, pair, float(gaps[t])))

        return hook

    with _hooks(model, hook_for), torch.no_grad():
        model.predict_logits([text], batch_size=1)
    return sorted(found, key=lambda c: c.margin)


def _pinned(model, text: str, choices: Sequence[_Choice]) -> np.ndarray:
    """The text's logits with each choice's k-th expert swapped for its (k+1)-th."""
    by_layer: dict[int, list[_Choice]] = {}
    for c in choices:
        by_layer.setdefault(c.layer, []).append(c)

    def hook_for(layer, router):
        def hook(_module, _args, output):
            if layer not in by_layer:
                return None
            weights, logits = output
            weights = weights.clone()
            for c in by_layer[layer]:
                row = logits[0, c.token]
                picked = row.topk(router.top_k).indices.tolist()
                if c.experts[0] not in picked or c.experts[1] in picked:  # moved by a pin upstream
                    continue
                picked[picked.index(c.experts[0])] = c.experts[1]
                chosen = torch.tensor(picked, device=row.device)
                weights[0, c.token] = torch.zeros_like(row).scatter(0, chosen, row[chosen].softmax(-1))
            return weights, logits

        return hook

    with _hooks(model, hook_for), torch.no_grad():
        out = model.predict_logits([text], batch_size=1)
    return (out[0] if isinstance(out, list) else out[0]).float().numpy()


def find_routing_flips(
    model, texts: Sequence[str], candidate: Sequence, over_atol: Sequence[int], atol: float
) -> dict[int, RoutingFlip]:
    """{text index: flip} for the texts of ``over_atol`` (at most :data:`MAX_TEXTS`) whose
    ``candidate`` logits (``candidate[i]``: the export's, as ``Predictor.predict_logits`` gives
    them) are the PyTorch ``model``'s with one near-tie top-k choice pinned the other way (or
    all of the text's near ties at once), within ``atol``."""
    flips: dict[int, RoutingFlip] = {}
    if not _routers(model):
        return flips
    model.eval()
    for i in list(over_atol)[:MAX_TEXTS]:
        target = np.asarray(candidate[i], dtype=np.float64)
        reference = _pinned(model, texts[i], ())
        ties = _near_ties(model, texts[i], atol)[:MAX_CANDIDATES]
        tries = [[c] for c in ties] + ([ties] if len(ties) > 1 else [])
        for choices in tries:
            pinned = _pinned(model, texts[i], choices)
            if pinned.shape != target.shape:
                break
            after = abs_diff(pinned, target)[0]
            if after <= atol:
                c = choices[0]
                flips[i] = RoutingFlip(
                    index=int(i),
                    layer=c.layer,
                    token=c.token if len(choices) == 1 else -1,
                    experts=c.experts,
                    margin=c.margin,
                    max_abs_diff=abs_diff(reference, target)[0],
                    pinned_abs_diff=after,
                )
                break
    return flips
