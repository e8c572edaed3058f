"""Parity of an exported model against PyTorch on several shapes, with and without padding.

Logits with a sequence axis (token classification, ``[batch, seq, labels]``) are compared on
real tokens only: what a model computes at padding positions is meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpismoe_edge.runtime.parity import abs_diff
from mpismoe_edge.runtime.spec import EXPORT_ATOL

from .lower import OUTPUT_NAME, input_names, make_inputs

DEFAULT_ATOL = EXPORT_ATOL


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int  # 0: an image input (no sequence axis)
    lengths: tuple[int, ...]  # real tokens per row; seq for unpadded rows

    @property
    def padded(self) -> bool:
        return any(n < self.seq for n in self.lengths)

    @property
    def label(self) -> str:
        if self.seq == 0:
            return f"batch={self.batch} image"
        return f"batch={self.batch} seq={self.seq}" + (" padded" if self.padded else "")


def default_cases(model: nn.Module, max_length: int | None = None) -> list[Case]:
    """Batches 1, 2 and 7, short and long sequences up to the model's ``max_length`` (the longest
    input the runtime feeds it), unpadded and padded rows."""
    if "pixel_values" in input_names(model):
        return [Case(1, 0, ()), Case(7, 0, ())]
    max_length = int(max_length or getattr(getattr(model, "config", None), "max_length", None) or 128)
    long = max(4, min(max_length, 64))
    rng = np.random.default_rng(0)
    lens7 = [19] + sorted(rng.integers(1, 19, size=6).tolist(), reverse=True)
    cases = [
        Case(1, 5, (5,)),
        Case(1, 12, (7,)),
        Case(7, 19, tuple(lens7)),
        Case(7, long, (long,) * 7),
        Case(2, long, (long, 2)),
    ]
    if max_length > long:  # appended: the cases above keep their seeds
        cases += [Case(1, max_length, (max_length,)), Case(2, max_length, (max_length, max_length // 3))]
    return cases


def _feed(model: nn.Module, case: Case, seed: int) -> dict[str, torch.Tensor]:
    if case.seq == 0:
        return make_inputs(model, case.batch, 1, seed=seed)
    return make_inputs(model, case.batch, case.seq, lengths=list(case.lengths), seed=seed)


def _real_tokens(logits: np.ndarray, feed: dict[str, torch.Tensor]) -> np.ndarray:
    """``logits`` at the positions where ``attention_mask`` is 1 (``[tokens, labels]``) when they
    are per token; unchanged otherwise."""
    mask = feed.get("attention_mask")
    if logits.ndim != 3 or mask is None or logits.shape[:2] != tuple(mask.shape):
        return logits
    return logits[mask.numpy().astype(bool)]


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    atol: float = DEFAULT_ATOL,
    cases: list[Case] | None = None,
    provider: str = "CPUExecutionProvider",
    log=None,
) -> dict:
    """Run PyTorch and ONNX Runtime on each case; the report says ``passed`` and the diffs.

    ``report["cases"]`` holds one entry per case with the max abs diff of each output (per-token
    logits: over real tokens only).
    """
    import onnxruntime as ort

    model.eval()
    cases = cases or default_cases(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=[provider])
    feed_names = [i.name for i in sess.get_inputs()]
    results, worst = [], 0.0
    for i, case in enumerate(cases):
        feed = _feed(model, case, seed=1000 + i)
        with torch.no_grad():
            ref = model(**feed)
        refs = {OUTPUT_NAME: ref.detach().float().numpy()}
        outs = sess.run(list(refs), {k: feed[k].numpy() for k in feed_names})
        diffs = {}
        for (name, r), o in zip(refs.items(), outs):
            if r.shape != o.shape:
                diffs[name] = float("inf")
            else:
                diffs[name] = abs_diff(_real_tokens(r, feed), _real_tokens(o, feed))[0]
        worst = max(worst, *diffs.values())
        entry = {"batch": case.batch, "seq": case.seq, "padded": case.padded, "max_abs_diff": diffs}
        results.append(entry)
        if log:
            log("  parity " + case.label + ": " + ", ".join(f"{k} max abs diff {v:.3g}" for k, v in diffs.items()))
    return {"atol": atol, "max_abs_diff": worst, "passed": bool(worst <= atol), "provider": provider, "cases": results}
