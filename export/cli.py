"""``mpismoe-export model.pt -o out/``: checkpoint -> validated ONNX directory.

``mpismoe-export a/model.pt b/model.pt ... -o out/`` (or ``NAME=PATH`` to name a task; by
default a task is named after its run folder): several tasks trained on one quantized backbone
(equal fingerprints) -> one backbone pass and each task's side network (:mod:`.multitask`),
as one graph (``--layout merged``) or the backbone's and one per task (``--layout split``).

Exit status: 0 written; 2 bad input (unreadable or foreign checkpoint, bad option, unusable
output path), nothing written; 1 export or validation failed, nothing written.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

from mpismoe_edge.runtime.spec import (
    DEFAULT_TARGET,
    EXPORT_ATOL,
    LAYOUTS,
    MIN_OPSET,
    TARGET_ATOL,
    TARGET_SPECS,
    TARGETS,
)

EXIT_CODES = """exit status:
  0  written (and validated, unless --no-validate)
  1  the export ran and failed: validation against PyTorch past --atol, or the exporter failed; nothing written
  2  bad input: a missing, truncated, corrupt or foreign checkpoint, a bad option or opset, an unusable
     output path; one 'error: ...' line, nothing written"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mpismoe-export",
        description="Export an MP-ISMoE checkpoint to ONNX, validated against PyTorch.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        nargs="+",
        help="model.pt written by mpismoe-train; several (NAME=PATH names a task, default: its run folder's "
        "name) export the tasks on their shared backbone: one backbone pass, one output NAME_logits per task",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="of several tasks: merged, one graph (default); split, onnx/backbone.onnx and one "
        "onnx/side_NAME.onnx per task, so a task is added or updated by shipping its side graph",
    )
    p.add_argument("-o", "--output", required=True, help="output directory (created or replaced atomically)")
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        choices=TARGETS,
        help="ort-int8: ORT's fused BERT backbone with int8 compute and weights, embeddings kept 4-bit "
        "(fastest on CPU and wasm, in the int8 anchor's memory; int8 activations, validated at atol 0.25); "
        "portable: ai.mpismoe functions of standard ONNX ops (any runtime, float-exact); "
        "ort-cpu / ort-cuda: packed layers as com.microsoft.MatMulNBits (float-exact) "
        "(default: portable)",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        default=0,
        choices=range(5),
        metavar="{0..4}",
        help="MatMulNBits compute type on ort-* targets: 0 the input's float type (default), "
        "4 int8 activations (ORT CPU; faster on int8-dot hardware, looser parity)",
    )
    p.add_argument(
        "--inline-functions",
        action="store_true",
        help="write the graph with the ai.mpismoe functions inlined, for runtimes that do not read "
        "model-local functions (OpenVINO); ONNX Runtime inlines them at load either way",
    )
    p.add_argument(
        "--ort-format",
        action="store_true",
        help="also write onnx/model.ort and onnx/required_operators.config for ONNX Runtime Mobile "
        "(a reduced-operator build); the weights stay packed",
    )
    p.add_argument(
        "--float-layers",
        nargs="+",
        default=(),
        metavar="LAYER",
        help="ort-int8 only: backbone MatMul layers to compute in float from their packed codes "
        "(MatMulNBits) instead of in int8, e.g. encoder.layer.0.output.dense; "
        "benchmarks/int8_layers.py ranks them by how much of the int8 error each carries",
    )
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default {MIN_OPSET})")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help=f"max abs diff allowed vs PyTorch (default {EXPORT_ATOL:g}; "
        + "; ".join(f"{atol:g} for {t}" for t, atol in TARGET_ATOL.items())
        + ")",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _exported(export, bad_input: tuple[type[Exception], ...]) -> dict | int:
    """The manifest ``export()`` wrote, or its failure's exit code, said in one line (nothing is
    written): 2 for ``bad_input``, 1 when validation or the exporter failed, 130 interrupted."""
    from .pipeline import ParityError

    try:
        return export()
    except bad_input as e:
        return _fail(str(e), 2)
    except ParityError as e:
        return _fail(f"{e}; nothing written", 1)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing written", 130)
    except Exception as e:  # the exporter or ONNX Runtime failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"export failed: {type(e).__name__}: {first}; nothing written", 1)


def task_checkpoints(args: list[str]) -> dict[str, Path]:
    """Task name -> checkpoint: ``NAME=PATH``, or a path named after its folder (``runs/sentiment/model.pt``
    -> ``sentiment``). ValueError for a name given twice or one that is not a word."""
    from .multitask import check_task_names

    pairs = []
    for arg in args:
        name, sep, rest = arg.partition("=")
        if sep and not Path(arg).is_file():
            pairs.append((name, Path(rest)))
        else:
            path = Path(arg)
            folder = path.resolve().parent.name if path.suffix else path.name
            pairs.append((re.sub(r"\W", "_", folder) or "task", path))
    check_task_names([n for n, _ in pairs])
    return dict(pairs)


def _load(ckpt: Path):
    from mpismoe_edge.model import load_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load chatter about pickle protocols
            return load_checkpoint(ckpt)
    except Exception as e:  # truncated, corrupt, code-carrying pickle, foreign format, bad config
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if str(ckpt) not in msg:
            msg = f"{ckpt}: cannot load checkpoint ({msg})"
        raise ValueError(msg) from None


def _export_tasks(args, models: dict, sources: dict[str, str], out: Path, log) -> int:
    from .multitask import export_tasks
    from .output import OutputError

    if args.inline_functions or args.ort_format:
        return _fail("--inline-functions and --ort-format take one checkpoint", 2)
    manifest = _exported(
        lambda: export_tasks(
            models,
            out,
            target=args.target,
            layout=args.layout or "merged",
            opset=args.opset,
            atol=args.atol,
            validate_export=not args.no_validate,
            accuracy_level=args.accuracy_level,
            sources=sources,
            log=log,
        ),
        (OutputError, ValueError),  # an unusable output, different backbones, a bad task name
    )
    if isinstance(manifest, int):
        return manifest
    tasks = ", ".join(t["name"] for t in manifest["tasks"])
    if manifest.get("parity"):
        print(
            f"ok: {out} ({tasks} on one backbone; target {args.target}, layout {manifest['layout']}, "
            f"max abs diff {manifest['parity']['max_abs_diff']:.3g})"
        )
    else:
        print(f"ok: {out} ({tasks} on one backbone; target {args.target}, layout {manifest['layout']}, not validated)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e), 2)
    if args.opset < MIN_OPSET:
        return _fail(f"opset {args.opset} is too old: the exported graph needs opset >= {MIN_OPSET}", 2)
    import onnx

    if args.opset > onnx.defs.onnx_opset_version():
        return _fail(
            f"opset {args.opset} is newer than the installed onnx supports ({onnx.defs.onnx_opset_version()})", 2
        )
    if args.atol is not None and not args.atol >= 0:
        return _fail(f"--atol must be >= 0, got {args.atol}", 2)
    if args.float_layers and not TARGET_SPECS[args.target].int8:
        return _fail(
            f"--float-layers is an int8-target option; --target {args.target} computes every layer in float", 2
        )
    out = Path(args.output)
    try:
        named = task_checkpoints(args.checkpoint)
    except ValueError as e:
        return _fail(str(e), 2)
    for path in named.values():
        if not path.is_file():
            return _fail(f"checkpoint not found: {path}", 2)
    multi = (
        len(named) > 1 or args.layout is not None or any("=" in c and not Path(c).is_file() for c in args.checkpoint)
    )
    ckpt = next(iter(named.values()))

    from .output import OutputError, check_target

    try:
        check_target(out)
    except OutputError as e:
        return _fail(str(e), 2)

    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    models = {}
    for name, path in named.items():
        log(f"loading {path}...")
        try:
            models[name] = _load(path)
        except ValueError as e:
            return _fail(str(e), 2)
    if multi:
        return _export_tasks(args, models, {n: str(p) for n, p in named.items()}, out, log)
    model = models[next(iter(models))]

    from .model_card import read_metrics
    from .pipeline import export_model

    manifest = _exported(
        lambda: export_model(
            model,
            out,
            target=args.target,
            opset=args.opset,
            atol=args.atol,
            validate=not args.no_validate,
            accuracy_level=args.accuracy_level,
            float_layers=args.float_layers,
            inline=args.inline_functions,
            ort_format=args.ort_format,
            metrics=read_metrics(ckpt),
            log=log,
        ),
        (OutputError,),
    )
    if isinstance(manifest, int):
        return manifest
    if manifest.get("parity"):
        print(f"ok: {out} (target {args.target}, max abs diff {manifest['parity']['max_abs_diff']:.3g})")
    else:
        print(f"ok: {out} (target {args.target}, not validated)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
