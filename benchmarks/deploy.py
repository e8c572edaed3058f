"""One export in every runtime its target states: file sizes, max abs diff of the logits against
Python ONNX Runtime, load time and the median time of a batch.

    python benchmarks/deploy.py OUT [--inlined OUT_INLINED] [--texts N]

OUT is an export made with --ort-format; OUT_INLINED the same checkpoint exported with
--inline-functions (for OpenVINO). Node clients run through tests/js/run.mjs (install them with
``cd tests/js && npm ci``); their time includes starting node, so only their diff is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpismoe_edge.export.ort_format import ORT_FILE
from mpismoe_edge.export.runtimes import OPENVINO_CONFIG
from mpismoe_edge.runtime.manifest import find_model, load_manifest
from mpismoe_edge.runtime.text import TextEncoder

RUNNER = Path(__file__).resolve().parents[1] / "tests" / "js" / "run.mjs"
TEXTS = [
    "I love my new self-driving car",
    "autonomous cars scare me",
    "the bus was late again today",
    "what a wonderful morning",
    "this phone keeps crashing",
    "meh, it is fine I guess",
    "best concert of my life",
    "I can't believe they cancelled the show",
]


def _timed(load, run, repeats: int = 5):
    t0 = time.perf_counter()
    session = load()
    load_s = time.perf_counter() - t0
    out, times = None, []
    for _ in range(repeats):
        t1 = time.perf_counter()
        out = run(session)
        times.append(time.perf_counter() - t1)
    return np.asarray(out, dtype=np.float32), load_s, statistics.median(times) * 1e3


def _node(client: str, model: Path, feed: dict) -> np.ndarray:
    request = {
        "client": client,
        "model": str(model),
        "feed": {k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in feed.items()},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    proc = subprocess.run(["node", str(RUNNER), f.name], capture_output=True, text=True, check=True)
    reply = json.loads(proc.stdout)["logits"]
    return np.asarray(reply["data"], dtype=np.float32).reshape(reply["dims"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--inlined")
    p.add_argument("--texts", type=int, default=8)
    args = p.parse_args(argv)
    import onnxruntime as ort

    out = Path(args.out)
    manifest = load_manifest(out)
    model = find_model(out)
    feed = TextEncoder(out / "tokenizer.json", manifest.max_length).encode((TEXTS * 4)[: args.texts]).arrays()
    cpu = ["CPUExecutionProvider"]

    def ort_run(path):
        return _timed(lambda: ort.InferenceSession(str(path), providers=cpu), lambda s: s.run(["logits"], feed)[0])

    ref, load_s, run_ms = ort_run(model)
    rows = [("onnxruntime", model.relative_to(out), model.stat().st_size, 0.0, load_s, run_ms)]
    if (model.with_name(ORT_FILE)).is_file():
        got, load_s, run_ms = ort_run(model.with_name(ORT_FILE))
        rows.append(
            (
                "onnxruntime-mobile (.ort)",
                model.with_name(ORT_FILE).relative_to(out),
                model.with_name(ORT_FILE).stat().st_size,
                float(np.abs(got - ref).max()),
                load_s,
                run_ms,
            )
        )
    if args.inlined:
        import openvino as ov

        inl = find_model(args.inlined)
        got, load_s, run_ms = _timed(
            lambda: ov.Core().compile_model(str(inl), "CPU", dict(OPENVINO_CONFIG)),
            lambda c: c(feed)[c.output("logits")],
        )
        rows.append(
            (
                "openvino (inlined)",
                "inlined " + str(inl.relative_to(args.inlined)),
                inl.stat().st_size,
                float(np.abs(got - ref).max()),
                load_s,
                run_ms,
            )
        )
        got, load_s, run_ms = ort_run(inl)
        rows.append(
            (
                "onnxruntime (inlined)",
                "inlined " + str(inl.relative_to(args.inlined)),
                inl.stat().st_size,
                float(np.abs(got - ref).max()),
                load_s,
                run_ms,
            )
        )
    if manifest.target == "portable":
        from onnx.reference import ReferenceEvaluator

        got, load_s, run_ms = _timed(lambda: ReferenceEvaluator(str(model)), lambda e: e.run(["logits"], feed)[0], 1)
        rows.append(
            (
                "onnx-reference",
                model.relative_to(out),
                model.stat().st_size,
                float(np.abs(got - ref).max()),
                load_s,
                run_ms,
            )
        )
    for client in ("onnxruntime-node", "onnxruntime-web"):
        got = _node(client, model, feed)
        rows.append((client, model.relative_to(out), model.stat().st_size, float(np.abs(got - ref).max()), None, None))

    print(f"{out} (target {manifest.target}), batch {feed['input_ids'].shape}")
    print("| runtime | file | MB | max abs diff vs onnxruntime | load s | run ms |")
    print("|---|---|---|---|---|---|")
    for name, file, size, diff, load_s, run_ms in rows:
        timing = "| - | - |" if load_s is None else f"| {load_s:.2f} | {run_ms:.1f} |"
        print(f"| {name} | {file} | {size / 1e6:.2f} | {diff:.2g} " + timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
