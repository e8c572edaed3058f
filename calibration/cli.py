"""``mpismoe-calibrate``: mixed-precision bit allocation for a trained checkpoint.

Reloads the float backbone the checkpoint was built from, measures every quantized layer's
output error at each width on calibration texts, picks widths under the budget, re-quantizes
the float backbone with them and saves the model with the new backbone. The side network is
kept as trained; since it learned on the old backbone's features, training with the
calibrated bit map from the start (``bits_map`` of the quantization config) is better still.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from mpismoe_edge.quant.pack import SUPPORTED_BITS

from .allocate import WEIGHTINGS, Allocation, allocate, resolve_budget
from .sensitivity import LayerSensitivity, apply_bits, measure_sensitivities, text_batches

# calibration's defaults: the CLI and calibrate() share them
SAMPLES, MAX_ROWS, GAIN_SAMPLES, BATCH_SIZE = 256, 4096, 64, 32  # texts, token rows per layer, gain texts


def _widths(text: str) -> list[int]:
    try:
        widths = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        widths = []
    if not widths or any(w not in SUPPORTED_BITS for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be comma-separated values from {SUPPORTED_BITS}, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpismoe-calibrate",
        description="Mixed-precision bit allocation for a trained checkpoint: "
        "per-layer widths that minimize output error under a memory budget.",
    )
    p.add_argument("model", help="trained checkpoint (model.pt)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-mb", type=float, help="memory budget of the quantized backbone Linears, in MB (10^6 bytes)"
    )
    budget.add_argument("--avg-bits", type=float, help="average code bits per backbone Linear weight")
    p.add_argument("-o", "--output", required=True, help="where to write the calibrated checkpoint")
    p.add_argument(
        "--data", help="calibration texts: CSV or JSONL with a 'text' column (default: the bundled training data)"
    )
    p.add_argument(
        "--samples", type=int, default=SAMPLES, help="calibration texts drawn from the data (default %(default)s)"
    )
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, help="token rows kept per layer (default %(default)s)")
    p.add_argument(
        "--widths", type=_widths, default=list(SUPPORTED_BITS), help="candidate widths (default: every packed width)"
    )
    p.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default=WEIGHTINGS[0],
        help="weight of each layer's relative output error in the objective: its measured propagation "
        "gain to the hidden states (default), 1, or its output energy share",
    )
    p.add_argument(
        "--gain-samples",
        type=int,
        default=GAIN_SAMPLES,
        help="calibration texts for the propagation gains (one forward pass over them per layer; default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--report-dir", help="write calibration.json and calibration.png here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def calibrate_backbone(
    backbone: torch.nn.Module,
    quant,
    tokenizer_json: str,
    texts: Sequence[str],
    max_length: int,
    *,
    widths: Sequence[int] = SUPPORTED_BITS,
    max_rows: int = MAX_ROWS,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    weighting: str = WEIGHTINGS[0],
    gain_samples: int = GAIN_SAMPLES,
    quantized: dict | None = None,
    progress: bool = False,
    **budget,
) -> tuple[list[LayerSensitivity], Allocation]:
    """Sensitivities of the float ``backbone``'s layers that ``quant`` selects (with propagation
    gains from the first ``gain_samples`` texts when ``weighting`` is "propagated"), and the
    allocation under ``budget`` (one of ``budget_mb``, ``avg_bits``, ``budget_bytes``).
    ``quantized`` is passed on to ``measure_sensitivities``."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("calibration data holds no non-empty text")
    batches = text_batches(tokenizer_json, texts, max_length, batch_size)
    gain_batches = (
        text_batches(tokenizer_json, texts[:gain_samples], max_length, batch_size)
        if weighting == "propagated"
        else None
    )
    sens = measure_sensitivities(
        backbone,
        quant,
        batches,
        widths=widths,
        max_rows=max_rows,
        seed=seed,
        gain_batches=gain_batches,
        quantized=quantized,
        progress=progress,
    )
    return sens, allocate(sens, quant.group_size, widths=widths, weighting=weighting, **budget)


def _check_same_layers(old: torch.nn.Module, new: torch.nn.Module, names: Sequence[str]) -> None:
    for name in names:
        try:
            a, b = old.get_submodule(name), new.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the float backbone's layer {name} is not in the checkpoint's backbone") from None
        if (getattr(a, "in_features", None), getattr(a, "out_features", None)) != (b.in_features, b.out_features):
            raise ValueError(
                f"{name}: the float backbone's shape differs from the checkpoint's (backbone files changed?)"
            )


@torch.no_grad()
def _predictions(model: torch.nn.Module, batches) -> torch.Tensor:
    """Predicted class per text (sign of the output for regression; per real token for token
    classification)."""
    outs = []
    for batch in batches:
        out = model(**batch)
        outs.append(out[batch["attention_mask"].bool()] if out.ndim == 3 else out)
    out = torch.cat(outs)
    return out.argmax(-1) if out.shape[-1] > 1 else out.squeeze(-1) > 0


def run(args: argparse.Namespace) -> dict:
    from mpismoe_edge.config import QuantConfig
    from mpismoe_edge.model import load_checkpoint, load_float_backbone, save_checkpoint
    from mpismoe_edge.quant.api import quantize_model, selected_linears

    from .report import build_report, write_report

    if min(args.samples, args.max_rows, args.batch_size, args.gain_samples) < 1:
        raise ValueError("--samples, --max-rows, --batch-size and --gain-samples must be >= 1")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = load_checkpoint(args.model)
    if model.tokenizer_json is None or "input_ids" not in model.input_names:
        raise ValueError(
            f"{args.model}: calibration needs a text model with a tokenizer; this backbone takes {model.input_names}"
        )
    from mpismoe_edge.data import load_texts

    texts = load_texts(args.data, limit=args.samples, seed=args.seed)  # ValueError naming the file and line
    quant = model.config.quant or QuantConfig()
    try:
        backbone = load_float_backbone(model.config)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot reload the float backbone from {model.config.backbone!r}: {exc}") from None
    layers = selected_linears(backbone, quant)
    _check_same_layers(model.backbone, backbone, list(layers))
    # fail on a too-small budget before the slow part
    resolve_budget(
        [(m.out_features, m.in_features, m.bias is not None) for m in layers.values()],
        quant.group_size,
        args.widths,
        budget_mb=args.budget_mb,
        avg_bits=args.avg_bits,
    )
    progress = not args.quiet
    quantized: dict = {}
    sens, alloc = calibrate_backbone(
        backbone,
        quant,
        model.tokenizer_json,
        texts,
        model.config.max_length,
        widths=args.widths,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
        seed=args.seed,
        weighting=args.weighting,
        gain_samples=args.gain_samples,
        quantized=quantized,
        progress=progress,
        budget_mb=args.budget_mb,
        avg_bits=args.avg_bits,
    )

    new_quant = dataclasses.replace(quant, bits_map=dict(alloc.bits_map))
    apply_bits(
        backbone, quantized, alloc.bits_map
    )  # = quantize_model(backbone, new_quant) on the Linears, already computed
    quantize_model(
        backbone, dataclasses.replace(new_quant, bits_map={}), progress=False
    )  # embeddings (outside the budget)
    check = text_batches(model.tokenizer_json, texts[:128], model.config.max_length, args.batch_size)
    before = _predictions(model, check)
    model.backbone = backbone.eval().requires_grad_(False)
    model.config.quant = new_quant
    agreement = float((_predictions(model.eval(), check) == before).float().mean())

    report = build_report(
        sens,
        alloc,
        quant.group_size,
        checkpoint=str(args.model),
        output=str(args.output),
        method=quant.method,
        samples=len(texts),
        max_rows=args.max_rows,
        seed=args.seed,
        prediction_agreement=agreement,
    )
    save_checkpoint(model, args.output)  # the calibrated model first: the report is a by-product
    if args.report_dir:
        report["png"] = write_report(report, args.report_dir)[1] is not None
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    used = list(report["bits_map"].values())
    counts = {w: used.count(w) for w in report["widths"] if w in used}
    print(
        f"calibrated {len(report['layers'])} layers: {report['total_mb']:.3f} MB of {report['budget_mb']:.3f} MB "
        f"(min {report['min_mb']:.3f}), {report['avg_bits']:.3f} average bits, widths "
        + ", ".join(f"{w}b x{n}" for w, n in counts.items())
        + f"; {100 * report['prediction_agreement']:.1f}% of predictions on calibration texts unchanged"
        " (per token for token classification)"
    )
    files = (
        ""
        if not args.report_dir
        else f" and {args.report_dir}/calibration." + ("{json,png}" if report["png"] else "json")
    )
    print(f"wrote {args.output}{files}")
    if args.report_dir and not report["png"]:
        print(
            "note: no calibration.png: the plot needs matplotlib (pip install matplotlib, or the 'bench' extra)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
