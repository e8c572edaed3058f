"""``mpismoe-parity model.pt out/``: the accuracy-parity gate for users' CI.

Runs the PyTorch checkpoint and the exported ONNX model (through the torch-free runtime) on
the same texts, then reports max abs diff of the logits, label agreement and both accuracies;
exits 1 when a bar is missed, 2 on bad input. A text whose logits are past ``--atol`` because one
token's top-k expert choice fell the other way on a near tie (a routing flip, confirmed by
pinning that choice: ``route_flips``) is counted and reported apart and judged by the label
agreement; every other text must stay within ``--atol``. For a token-classification model the logits of
every real token are compared and the agreement is per token (no accuracies: gold tags are not
read); its data may also be the training JSONL, whose "tokens" (words) are joined by spaces.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .runtime.spec import DEFAULT_BATCH_SIZE, DEFAULT_PARITY_BARS, PARITY_BARS, PROVIDERS
from .runtime.tasks import kind

EXIT_CODES = """exit status:
  0  parity passed
  1  parity FAILED: the check ran and a bar was missed (logits past --atol, label agreement below --min-agreement)
  2  bad input or a broken file (checkpoint, export, data), named in one 'error: ...' line; no check ran"""


def _bar_help(what: str, bar: int) -> str:
    """``--help`` of one of the parity bars: its default and each target's own (runtime.spec)."""
    own = "; ".join(f"{bars[bar]:g} for an {t} export" for t, bars in PARITY_BARS.items())
    return f"{what} (default {DEFAULT_PARITY_BARS[bar]:g}; {own})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpismoe-parity",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        nargs="+",
        help="model.pt written by mpismoe-train; for a multi-task export, one per task (NAME=PATH, or named "
        "after its run folder as mpismoe-export names it): every task is checked",
    )
    p.add_argument("onnx_dir", help="directory written by mpismoe-export")
    p.add_argument(
        "--data",
        help="CSV/JSONL with a text column (and optional label column; a token-classification "
        "model also takes JSONL with a 'tokens' list per line); default: the bundled test split",
    )
    p.add_argument("--limit", type=int, default=500, help="at most this many rows (default 500)")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help=_bar_help("max allowed |logit difference|", 0),
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help=_bar_help("min fraction of equal labels", 1),
    )
    p.add_argument("--provider", choices=PROVIDERS, default=PROVIDERS[0], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _texts_and_labels(
    path: str | None, limit: int, labels: list[str], task: str = "classification"
) -> tuple[list[str], list[int] | None]:
    from .data import load_default
    from .runtime import records

    task_kind = kind(task)
    if path is None:
        test = load_default()[1]
        return test.texts[:limit], list(test.targets[:limit]) if task_kind.one_label else None
    rows = records.read_rows(path)[:limit]
    first = rows[0][1]
    if task_kind.token_level and "text" not in first and "tokens" in first:
        return _joined_words(path, rows), None
    texts = records.texts(rows, path)
    if not task_kind.one_label or "label" not in first or not labels:  # per-word tags, label sets: not compared
        return texts, None
    return texts, records.label_ids(
        records.column(rows, "label", path), labels, [f"{path} line {no}" for no, _ in rows]
    )


def _joined_words(path: str, rows: list) -> list[str]:
    """The training JSONL of a token-classification model as parity texts: each row's words
    joined by spaces."""
    from .runtime import records

    words = records.column(rows, "tokens", path)
    for (no, _), w in zip(rows, words):
        if not isinstance(w, list):
            raise ValueError(f"{path} line {no}: 'tokens' must be a list of words")
    return [" ".join(map(str, w)) for w in words]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from .runtime.manifest import load_manifest

        manifest = load_manifest(args.onnx_dir)
        if manifest.tasks:
            return _main_tasks(args, manifest)
        if len(args.checkpoint) > 1:
            raise ValueError(f"{args.onnx_dir} is a single-task export: give one checkpoint")
        args.checkpoint = args.checkpoint[0]
    except (ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from .runtime.checks import positive_int

        positive_int("--limit", args.limit)
        positive_int("--batch-size", args.batch_size)
        from .model import load_checkpoint
        from .runtime import Predictor
        from .runtime.parity import compare_logits

        model = load_checkpoint(args.checkpoint)
        predictor = Predictor.from_dir(args.onnx_dir, provider=args.provider)
        texts, labels = _texts_and_labels(args.data, args.limit, model.config.labels, model.config.task)
        torch_logits = model.predict_logits(texts, args.batch_size)
        # token classification: one [tokens, labels] tensor per text, as the runtime returns them
        torch_logits = [t.numpy() for t in torch_logits] if isinstance(torch_logits, list) else torch_logits.numpy()
        onnx_logits = predictor.predict_logits(texts, batch_size=args.batch_size)
    except (ValueError, OSError, TypeError) as exc:  # FileNotFoundError, ExportFileError among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. ONNX Runtime failing on a graph it loaded: not a parity verdict
        print(
            f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            file=sys.stderr,
        )
        return 2
    from .runtime.spec import DEFAULT_PARITY_BARS, PARITY_BARS

    atol, min_agreement = PARITY_BARS.get(predictor.manifest.target, DEFAULT_PARITY_BARS)
    atol = atol if args.atol is None else args.atol
    flips = _routing_flips(model, texts, torch_logits, onnx_logits, atol)
    report = compare_logits(
        torch_logits,
        onnx_logits,
        labels,
        task=model.config.task,
        atol=atol,
        min_agreement=min_agreement if args.min_agreement is None else args.min_agreement,
        routing_flips=list(flips),
    )
    if args.json:
        print(json.dumps({**report.to_dict(), "routing_flip_details": [f.to_dict() for f in flips.values()]}))
    else:
        print(report.summary())
    for flip in list(flips.values())[:10]:
        print(
            f"note: text {flip.index}: max abs diff {flip.max_abs_diff:.3g} past atol is a routing flip: in MoE layer "
            f"{flip.layer}, {'several tokens' if flip.token < 0 else f'token {flip.token}'} picks expert "
            f"{flip.experts[0]} over {flip.experts[1]} by {flip.margin:.2g} in PyTorch and the other in the export; "
            f"pinned the other way PyTorch matches the export to {flip.pinned_abs_diff:.2g}",
            file=sys.stderr,
        )
    if not report.passed:
        print("parity FAILED: " + "; ".join(report.failures), file=sys.stderr)
        return 1
    return 0


def _main_tasks(args, manifest) -> int:
    """Parity of every task of a multi-task export against its own checkpoint, on the same texts
    (gold labels are not read: the tasks label different things)."""
    from .export.cli import task_checkpoints
    from .model import load_checkpoint
    from .runtime import Predictor
    from .runtime.checks import positive_int
    from .runtime.parity import compare_logits
    from .runtime.spec import DEFAULT_PARITY_BARS, PARITY_BARS

    try:
        positive_int("--limit", args.limit)
        positive_int("--batch-size", args.batch_size)
        named = task_checkpoints(args.checkpoint)
        tasks = [h.name for h in manifest.tasks]
        unknown, missing = [n for n in named if n not in tasks], [t for t in tasks if t not in named]
        if unknown or missing:
            raise ValueError(
                f"{args.onnx_dir} holds tasks {tasks}; "
                + (f"no such task {unknown} " if unknown else "")
                + (f"no checkpoint for {missing} " if missing else "")
                + "(name them NAME=CHECKPOINT)"
            )
        token_level = [h.task for h in manifest.tasks if kind(h.task).token_level]  # its data may be word lists
        texts, _ = _texts_and_labels(args.data, args.limit, [], token_level[0] if token_level else "regression")
        predictor = Predictor.from_dir(args.onnx_dir, provider=args.provider)
        onnx_logits = predictor.predict_logits(texts, batch_size=args.batch_size)
        models = {}
        for name in tasks:
            models[name] = load_checkpoint(named[name])
            found, want = models[name].backbone_fingerprint, manifest.raw.get("backbone_fingerprint")
            if want and found != want:
                raise ValueError(f"{named[name]}'s backbone ({found}) is not the export's ({want})")
    except (ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atol, min_agreement = PARITY_BARS.get(manifest.target, DEFAULT_PARITY_BARS)
    atol = atol if args.atol is None else args.atol
    min_agreement = min_agreement if args.min_agreement is None else args.min_agreement
    reports, failed = {}, []
    for name, model in models.items():
        torch_logits = model.predict_logits(texts, args.batch_size)
        torch_logits = [t.numpy() for t in torch_logits] if isinstance(torch_logits, list) else torch_logits.numpy()
        flips = _routing_flips(model, texts, torch_logits, onnx_logits[name], atol)
        report = compare_logits(
            torch_logits,
            onnx_logits[name],
            None,
            task=model.config.task,
            atol=atol,
            min_agreement=min_agreement,
            routing_flips=list(flips),
        )
        reports[name] = report.to_dict()
        if not args.json:
            print(f"{name}: {report.summary()}")
        if not report.passed:
            failed.append(f"{name}: " + "; ".join(report.failures))
    if args.json:
        print(json.dumps({"tasks": reports, "passed": not failed}))
    if failed:
        print("parity FAILED: " + " | ".join(failed), file=sys.stderr)
        return 1
    return 0


def _routing_flips(model, texts, torch_logits, onnx_logits, atol: float) -> dict:
    """The texts past ``atol`` whose difference is a confirmed routing flip (``route_flips``);
    none looked for when more texts than ``route_flips.MAX_TEXTS`` are past it (then the export
    differs in more than near ties)."""
    from .route_flips import MAX_TEXTS, find_routing_flips
    from .runtime.parity import text_abs_diffs

    diffs = text_abs_diffs(torch_logits, onnx_logits, model.config.task)
    over = [int(i) for i in (~(diffs <= atol)).nonzero()[0] if np.isfinite(diffs[i])]
    if not over or len(over) > MAX_TEXTS or atol < 0:
        return {}
    return find_routing_flips(model, texts, onnx_logits, over, atol)


if __name__ == "__main__":
    sys.exit(main())
