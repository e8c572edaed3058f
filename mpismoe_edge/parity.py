"""``mpismoe-parity model.pt out/``: the accuracy-parity gate for users' CI.

Runs the PyTorch checkpoint and the exported ONNX model (through the torch-free runtime) on
the same texts, then reports max abs diff of the logits, label agreement and both accuracies;
exits 1 when a bar is missed, 2 on bad input. For a token-classification model the logits of
every real token are compared and the agreement is per token (no accuracies: gold tags are not
read); its data may also be the training JSONL, whose "tokens" (words) are joined by spaces.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpismoe-parity", description=__doc__)
    p.add_argument("checkpoint", help="model.pt written by mpismoe-train")
    p.add_argument("onnx_dir", help="directory written by mpismoe-export")
    p.add_argument("--data", help="CSV/JSONL with a text column (and optional label column; a token-classification "
                   "model also takes JSONL with a 'tokens' list per line); default: the bundled test split")
    p.add_argument("--limit", type=int, default=500, help="at most this many rows (default 500)")
    p.add_argument("--atol", type=float, default=1e-3, help="max allowed |logit difference| (default 1e-3)")
    p.add_argument("--min-agreement", type=float, default=0.999, help="min fraction of equal argmax labels (default 0.999)")
    p.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _texts_and_labels(path: str | None, limit: int, labels: list[str],
                      task: str = "classification") -> tuple[list[str], list[int] | None]:
    from .data import _read_rows, load_default

    token_task = task == "token-classification"
    if path is None:
        test = load_default()[1]
        return test.texts[:limit], None if token_task else list(test.targets[:limit])
    rows = _read_rows(Path(path))[:limit]
    if token_task and rows and "text" not in rows[0] and "tokens" in rows[0]:
        return _joined_words(path, rows), None
    if not rows or "text" not in rows[0]:
        alternative = " (or 'tokens')" if token_task else ""
        raise ValueError(f"{path}: parity data needs a non-empty 'text'{alternative} column")
    texts = [str(r["text"]) for r in rows]
    if token_task or "label" not in rows[0] or not labels:  # per-word tags are not compared
        return texts, None
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for n, r in enumerate(rows, 1):
        v = str(r["label"])
        if v not in index and not (v.isdigit() and int(v) < len(labels)):
            raise ValueError(f"{path}: row {n}: label {v!r} not in {labels}")
        ids.append(index[v] if v in index else int(v))
    return texts, ids


def _joined_words(path: str, rows: list[dict]) -> list[str]:
    """The training JSONL of a token-classification model as parity texts: each row's words
    joined by spaces."""
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("tokens"), list):
            raise ValueError(f"{path}: row {n}: 'tokens' must be a list of words")
    return [" ".join(map(str, r["tokens"])) for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}")
        from .model import load_checkpoint
        from .runtime import Predictor
        from .runtime.parity import compare_logits
        from .train import make_tokenizer, predict

        model = load_checkpoint(args.checkpoint)
        predictor = Predictor.from_dir(args.onnx_dir, provider=args.provider)
        texts, labels = _texts_and_labels(args.data, args.limit, model.config.labels, model.config.task)
        torch_logits = predict(model, make_tokenizer(model.tokenizer_json, model.config.max_length), texts,
                               model.input_names, args.batch_size)
        # token classification: one [tokens, labels] tensor per text, as the runtime returns them
        torch_logits = [t.numpy() for t in torch_logits] if isinstance(torch_logits, list) else torch_logits.numpy()
        onnx_logits = predictor.predict_logits(texts, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = compare_logits(torch_logits, onnx_logits, labels, task=model.config.task,
                            atol=args.atol, min_agreement=args.min_agreement)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    if not report.passed:
        print("parity FAILED: " + "; ".join(report.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
