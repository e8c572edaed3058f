"""Which backbone layers cost the ``ort-int8`` export its labels: ONNX Runtime's int8 path simulated
in PyTorch per layer (``calibration.int8_layers``) on a trained checkpoint.

Prints each MatMul layer's sensitivity (mean |logit error| it removes when it alone computes in
float) and the simulated decisions' agreement / max |logit difference| with every layer int8,
with the layers ``choose_float_layers`` keeps in float, and with every MatMul layer in float (the
q/k/v projections stay int8: ONNX Runtime's ``QAttention`` takes them as one int8 weight).

    python benchmarks/int8_layers.py --checkpoint runs/default/model.pt [--texts 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from calibration.int8_layers import choose_float_layers
from calibration.sensitivity import text_batches
from mpismoe_edge.data import load_default_validation
from mpismoe_edge.export.backbone_graph import fused_backbone
from mpismoe_edge.export.int8 import float_layer_candidates
from mpismoe_edge.model import load_checkpoint
from mpismoe_edge.runtime.spec import INT8_ATOL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--texts", type=int, default=128, help="held-out tweets to calibrate on (default 128)")
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    candidates = float_layer_candidates(fused_backbone(model, 18)[0], model)
    texts = load_default_validation().texts[: args.texts]
    batches = text_batches(model.tokenizer_json, texts, int(model.config.max_length))
    t0 = time.perf_counter()
    plan = choose_float_layers(model, batches, candidates, atol=INT8_ATOL)
    print(f"\n### {args.checkpoint}: {len(texts)} held-out tweets, {time.perf_counter() - t0:.0f} s\n")
    print("| layers in float | decisions agreeing | max abs logit diff |")
    print("|---|---|---|")
    print(f"| none (every layer int8) | {100 * plan.all_int8_agreement:.2f}% | {plan.all_int8_max_abs_diff:.3f} |")
    kept = ", ".join(plan.float_layers) if len(plan.float_layers) < len(candidates) else "every MatMul layer"
    print(f"| {kept} | {100 * plan.agreement:.2f}% | {plan.max_abs_diff:.3f} |")
    print("\n| layer | sensitivity (mean abs logit error removed) |")
    print("|---|---|")
    for name, value in sorted(plan.sensitivity.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {value:.4f} |")


if __name__ == "__main__":
    main()
