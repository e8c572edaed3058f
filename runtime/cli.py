"""``mpismoe-run``: run an exported model on texts, print one JSON line per input.

    mpismoe-run out/ --text "great phone" --text "awful battery"
    mpismoe-run out/ --input data.jsonl --provider auto --batch-size 64

Input files: JSONL, one JSON object per line with a string "text" field (other fields are
ignored; blank lines are skipped; ``-`` reads stdin), or a ``.csv`` file with a header line and a
"text" column (the one reader of ``records``). The whole file is checked before any prediction:
a line that is not UTF-8, not a JSON object, or lacks a string "text" is an error naming its line
number. Errors go to stderr as one ``error: ...`` line with exit status 2 (bad input, or a broken
export file, named); warnings as ``warning: ...``.
Each output line is the prediction (see ``Predictor.predict``) plus "index" (0-based position
among the inputs) and, for --input, "line" (1-based line number in the file); for a
token-classification model the prediction is {"words": [{"word", "start", "end", "label",
"score"}, ...], "truncated"}, all of a text's words on its one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from . import records
from .checks import positive_int
from .spec import DEFAULT_BATCH_SIZE, GRAPH_OPTIMIZATIONS, PROVIDERS

EXIT_CODES = """exit status:
  0  every input was predicted
  2  bad input (arguments, an input file) or a missing or broken export file; one 'error: ...' line
  130 interrupted"""


def read_input(path: str) -> list[tuple[int, str]]:
    """[(line_number, text)] of an input file: a ``.csv`` file's "text" column, else JSONL
    ('-': stdin), each line's string "text" field."""
    rows = records.read_csv(path) if path != "-" and path.lower().endswith(".csv") else records.read_jsonl(path)
    return list(zip((no for no, _ in rows), records.texts(rows, "<stdin>" if path == "-" else path)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpismoe-run",
        description="Run an exported mpismoe-edge model (numpy + onnxruntime + tokenizers only); prints JSON lines.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", help="exported directory (model.onnx, tokenizer.json, manifest.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to run the model on (repeatable)")
    src.add_argument(
        "--input",
        help='JSONL file with a "text" field per line (\'-\' for stdin), or a .csv file with a "text" column',
    )
    p.add_argument(
        "--tasks",
        help="of a multi-task export: the tasks to run, comma-separated (default: all); each line holds one "
        "result per task, by name",
    )
    p.add_argument("--provider", choices=PROVIDERS, default=PROVIDERS[0], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
    p.add_argument(
        "--graph-optimization", choices=GRAPH_OPTIMIZATIONS, default=GRAPH_OPTIMIZATIONS[0], help="default: %(default)s"
    )
    return p


def _run(args) -> int:
    positive_int("--batch-size", args.batch_size)
    positive_int("--threads", args.threads, optional=True)
    items: list[tuple[int | None, str]]
    if args.input is not None:
        items = list(read_input(args.input))
    else:
        items = [(None, t) for t in args.text]

    from .session import Predictor  # imported late: argument errors stay fast

    predictor = Predictor.from_dir(
        args.model_dir,
        provider=args.provider,
        threads=args.threads,
        graph_optimization=args.graph_optimization,
        batch_size=args.batch_size,
        tasks=[t.strip() for t in args.tasks.split(",")] if args.tasks is not None else None,
    )
    chunk = max(args.batch_size * 16, 512)  # bound memory; output flows while we work
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        results = predictor.predict([t for _, t in part])
        for k, ((line, _), res) in enumerate(zip(part, results)):
            out = {"index": start + k}
            if line is not None:
                out["line"] = line
            out.update(res)
            sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


def run_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits 2 with a usage message itself

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        return _run(args)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly (see Python's signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ORT's own exception types do not derive from RuntimeError
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = old


def main() -> None:
    sys.exit(run_main())


if __name__ == "__main__":
    main()
