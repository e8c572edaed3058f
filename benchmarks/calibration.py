"""Calibrated mixed precision vs uniform widths of the same size, trained the same way.

On the default task (all-MiniLM-L6-v2 backbone, 3-class tweets), at two budgets over the
backbone Linears:

* 3 bits: every layer at 3 bits vs the calibrated allocation of the same bytes;
* 2.5 bits: a fixed, non-calibrated rule (even-numbered encoder blocks at 3 bits, odd ones and
  any other layer at 2: half the encoder weights at each width) vs the calibrated allocation
  of the same bytes.

Sensitivities are measured once on the float backbone with texts drawn from the training
split, keeping every layer's quantized weight at every width; each model is then built from
those (exactly what ``quantize_model`` makes with its bit map, without quantizing again) and
trained like ``mpismoe-train`` does: same split, side network, seed and settings, only the bit
map differs. Scored on the test split. Prints a markdown table and writes ``results.json``
into ``--out``. ``--restarts``/``--iters`` set GNP-IQ's search effort for both arms alike.

    python benchmarks/calibration.py --n-train 1000 --n-test 1000 --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from mpismoe_edge.calibration.allocate import MB, allocate, layer_bytes
from mpismoe_edge.calibration.report import build_report, write_report
from mpismoe_edge.calibration.sensitivity import apply_bits, measure_sensitivities, text_batches
from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
from mpismoe_edge.data import load_default, load_default_validation
from mpismoe_edge.model import build_model, default_backbone_path, load_backbone
from mpismoe_edge.train import TrainConfig, train


def rule_2p5(names: list[str]) -> dict[str, int]:
    """Fixed rule: encoder block i at 3 bits when i is even, 2 when odd; other layers 2."""

    def bits(name: str) -> int:
        parts = name.split(".")
        return 3 if "layer" in parts and int(parts[parts.index("layer") + 1]) % 2 == 0 else 2

    return {n: bits(n) for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument(
        "--n-val",
        type=int,
        default=1000,
        help="validation rows that choose the best epoch (disjoint from train and test)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--gain-samples", type=int, default=64)
    p.add_argument("--weighting", default="propagated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--restarts", type=int, default=QuantConfig.restarts)
    p.add_argument("--iters", type=int, default=QuantConfig.iters)
    p.add_argument(
        "--only",
        help="comma-separated subset of runs to train, e.g. 2.5-uniform,2.5-calibrated "
        "('none': calibrate only; default: all four)",
    )
    p.add_argument("--out", default="runs/bench-calibration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    path = default_backbone_path()
    backbone, tokenizer_json = load_backbone(path)
    train_ds, test_ds = load_default(args.n_train, args.n_test, seed=args.seed)
    val_ds = load_default_validation(args.n_val, args.n_train, args.n_test, seed=args.seed)
    texts = random.Random(args.seed).sample(train_ds.texts, min(args.samples, len(train_ds)))
    # what mpismoe-train builds (bits=3, group 64, GNP-IQ, its seed), with the chosen search effort
    quant = QuantConfig(bits=3, group_size=64, method="gnpiq", seed=args.seed, restarts=args.restarts, iters=args.iters)
    quantized: dict = {}
    batches = text_batches(tokenizer_json, texts, args.max_length, 32)
    gain_batches = text_batches(tokenizer_json, texts[: args.gain_samples], args.max_length, 32)
    sens = measure_sensitivities(
        backbone,
        quant,
        batches,
        max_rows=args.max_rows,
        seed=args.seed,
        gain_batches=gain_batches,
        quantized=quantized,
        progress=True,
    )
    calib_s = time.perf_counter() - t0
    names = [s.name for s in sens]

    def size(bits_map: dict[str, int]) -> int:
        return round(
            sum(layer_bytes(s.out_features, s.in_features, bits_map[s.name], quant.group_size, s.bias) for s in sens)
        )

    def summary(bits_map: dict[str, int]) -> dict:
        numel = sum(s.numel for s in sens)
        return {
            "bits_map": bits_map,
            "mb": size(bits_map) / MB,
            "avg_bits": sum(s.numel * bits_map[s.name] for s in sens) / numel,
            "sum_sensitivity": sum(s.errors[bits_map[s.name]] for s in sens),
            "est_hidden_error": sum(s.gain * s.errors[bits_map[s.name]] for s in sens),
        }

    uniform3, rule = {n: 3 for n in names}, rule_2p5(names)
    calibrated = {
        b: allocate(sens, quant.group_size, budget_bytes=size(m), weighting=args.weighting)
        for b, m in (("3.0", uniform3), ("2.5", rule))
    }
    runs = {
        "3.0-uniform": summary(uniform3),
        "3.0-calibrated": summary(calibrated["3.0"].bits_map),
        "2.5-uniform": summary(rule),
        "2.5-calibrated": summary(calibrated["2.5"].bits_map),
    }
    for b, alloc in calibrated.items():
        write_report(build_report(sens, alloc, quant.group_size, samples=len(texts)), out / f"report-{b}")
    only = [n for n in args.only.split(",") if n != "none"] if args.only else list(runs)
    if set(only) - set(runs):
        raise SystemExit(f"--only: unknown runs {sorted(set(only) - set(runs))}; choose from {list(runs)}")
    print(f"sensitivities measured in {time.perf_counter() - t0:.0f} s; allocations:", flush=True)
    for name, run in runs.items():
        print(
            f"  {name}: {run['mb']:.4f} MB, est. hidden-state error {run['est_hidden_error']:.4f}, widths "
            + "".join(str(run["bits_map"][n]) for n in names),
            flush=True,
        )
    for name in only:
        run = runs[name]
        t = time.perf_counter()
        fresh, _ = load_backbone(path)
        apply_bits(fresh, quantized, run["bits_map"])
        config = ModelConfig(
            backbone=path,
            labels=train_ds.labels,
            max_length=args.max_length,
            side=SideConfig(expert_bits=None),
            quant=None,
        )
        model = build_model(fresh, config, tokenizer_json, progress=False)  # quant=None: already quantized
        model.config.quant = dataclasses.replace(quant, bits_map=run["bits_map"])
        tcfg = TrainConfig(
            epochs=args.epochs, seed=args.seed, threads=args.threads, min_steps=0
        )  # the budget: exactly --epochs
        result = train(
            model, train_ds, val_ds, tcfg, out / name, progress=False, test_data=test_ds
        )  # val picks the epoch
        run["accuracy"] = result["test"]["accuracy"]
        run["train_s"] = time.perf_counter() - t
        print(f"{name}: accuracy {run['accuracy']:.4f} ({run['train_s']:.0f} s)", flush=True)

    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "calibration_s": calib_s, "runs": runs}, indent=2)
    )
    print(
        f"\nsensitivities measured in {calib_s:.0f} s on {len(texts)} texts; {len(names)} layers; "
        f"n_train={args.n_train} n_test={args.n_test} epochs={args.epochs} seed={args.seed} "
        f"weighting={args.weighting}\n"
    )
    print(
        "| budget | allocation | backbone Linears MB | avg bits | sum of rel. output errors | "
        "est. hidden-state error | test accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        budget, kind = name.split("-")
        acc = f"{100 * run['accuracy']:.2f}" if "accuracy" in run else "-"
        print(
            f"| {budget} bits | {kind} | {run['mb']:.4f} | {run['avg_bits']:.3f} | "
            f"{run['sum_sensitivity']:.3f} | {run['est_hidden_error']:.4f} | {acc} |"
        )


if __name__ == "__main__":
    main()
