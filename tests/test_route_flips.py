"""Routing flips: a near tie between two experts' router logits, decided one way by PyTorch and
the other by the export, moves one text's logits past the parity bar; the gate confirms the flip
by pinning the choice and judges that text by its label."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TEXTS, tiny_model

from mpismoe_edge.parity import main
from mpismoe_edge.route_flips import find_routing_flips

pytestmark = pytest.mark.slow  # exports a model with a built near tie

TIE_TEXT = 0  # TEXTS[0], "i love this movie"
LAYER = 1  # the last MoE layer of the tiny model
DELTA = 1e-5  # each side's margin at the tie: far above rounding noise (~1e-7), far below atol 1e-3


def _router_logits(model, text: str, layer: int) -> torch.Tensor:
    seen = []
    router = model.side.moe_layers()[layer].router
    handle = router.register_forward_hook(lambda _m, _a, out: seen.append(out[1][0].detach()))
    try:
        model.predict_logits([text], batch_size=1)
    finally:
        handle.remove()
    return seen[0]


def _tie(model, text: str, layer: int, margin: float):
    """Shift one expert's router bias so that, at the token where swapping the k-th expert for
    the (k+1)-th moves the logits most, those two are ``margin`` apart (the (k+1)-th on top if
    ``margin`` > 0)."""
    from mpismoe_edge.route_flips import _Choice, _pinned

    router = model.side.moe_layers()[layer].router
    logits = _router_logits(model, text, layer)
    vals, idx = logits.topk(router.top_k + 1, dim=-1)
    gaps = vals[:, -2] - vals[:, -1]
    ref = _pinned(model, text, ())
    effect = [
        np.abs(_pinned(model, text, [_Choice(layer, t, (int(idx[t, -2]), int(idx[t, -1])), 0.0)]) - ref).max()
        for t in range(len(gaps))
    ]
    t = int(np.argmax(effect))
    with torch.no_grad():
        router.gate.bias[idx[t, -1]] += gaps[t] + margin
    return t, (int(idx[t, -2]), int(idx[t, -1]))


@pytest.fixture(scope="module")
def tie(tmp_path_factory):
    """A model whose export picks one expert at a near tie (margin -DELTA) and a checkpoint of
    the same model picking the other (+DELTA): what rounding differences do at a closer tie."""
    from mpismoe_edge.export import export_model
    from mpismoe_edge.model import save_checkpoint

    root = tmp_path_factory.mktemp("tie")
    exported = tiny_model().eval()
    exported.pack_experts()
    token, (kth, other) = _tie(exported, TEXTS[TIE_TEXT], LAYER, -DELTA)
    export_model(exported, root / "onnx", target="portable", log=None)
    flipped = copy.deepcopy(exported)
    with torch.no_grad():
        flipped.side.moe_layers()[LAYER].router.gate.bias[other] += 2 * DELTA
    save_checkpoint(flipped, root / "model.pt")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"root": root, "model": flipped, "token": token, "experts": (other, kth), "data": data}


def _onnx_logits(tie):
    from mpismoe_edge.runtime import Predictor

    return Predictor.from_dir(tie["root"] / "onnx").predict_logits(TEXTS)


def test_a_flipped_near_tie_moves_one_texts_logits_past_atol_and_no_other(tie):
    torch_logits = tie["model"].predict_logits(TEXTS).numpy()
    diffs = np.abs(torch_logits - _onnx_logits(tie)).max(-1)
    assert diffs[TIE_TEXT] > 1e-3
    assert np.delete(diffs, TIE_TEXT).max() < 1e-4


def test_the_flip_is_confirmed_by_pinning_that_choice_the_other_way(tie):
    flips = find_routing_flips(tie["model"], TEXTS, _onnx_logits(tie), [TIE_TEXT], atol=1e-3)
    flip = flips[TIE_TEXT]
    assert (flip.layer, flip.token, flip.experts) == (LAYER, tie["token"], tie["experts"])
    assert flip.margin == pytest.approx(DELTA, rel=0.1)
    assert flip.max_abs_diff > 1e-3 and flip.pinned_abs_diff < 1e-4


def test_a_difference_no_flip_explains_is_not_taken_for_one(tie):
    onnx = _onnx_logits(tie)
    onnx[TIE_TEXT] += 0.01  # off by more than the pinned choice accounts for
    assert find_routing_flips(tie["model"], TEXTS, onnx, [TIE_TEXT], atol=1e-3) == {}


def test_the_gate_passes_a_correct_export_with_a_routing_flip_and_counts_it(tie, capsys):
    args = [str(tie["root"] / "model.pt"), str(tie["root"] / "onnx"), "--data", str(tie["data"])]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["over_atol"] == 1 and report["routing_flips"] == [TIE_TEXT]
    assert report["max_abs_diff"] > 1e-3 >= report["max_abs_diff_without_flips"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "1 of 8 texts past atol 0.001, 1 by a routing flip" in out.out
    assert f"text {TIE_TEXT}" in out.err and "routing flip" in out.err


def test_a_routing_flip_does_not_lift_the_label_bar(tie, capsys):
    args = [str(tie["root"] / "model.pt"), str(tie["root"] / "onnx"), "--data", str(tie["data"])]
    assert main([*args, "--min-agreement", "1.01"]) == 1  # no agreement reaches it: the bar still applies
    assert "label agreement 1.0000 < 1.01" in capsys.readouterr().err


def test_pinning_a_choice_that_an_earlier_pin_already_moved_leaves_it_alone(tie):
    from mpismoe_edge.route_flips import _Choice, _pinned

    model, text, token = tie["model"], TEXTS[TIE_TEXT], tie["token"]
    logits = _router_logits(model, text, LAYER)[token]
    unpicked = [int(e) for e in logits.argsort()[: logits.numel() - model.side.moe_layers()[LAYER].router.top_k]]
    stale = _Choice(LAYER, token, (unpicked[0], unpicked[-1]), 0.0)  # neither is the token's k-th pick
    np.testing.assert_array_equal(_pinned(model, text, [stale]), _pinned(model, text, ()))
