"""The side MoE layer on ONNX Runtime CPU: our dense stacked form vs com.microsoft.QMoE.

Why the exporter keeps ISMoE in its dense stacked form (``ISMoE.prepare_export``) instead of
lowering it to ORT's ``QMoE``: this builds one side-MoE layer of the default MP-ISMoE shape
(8 experts, side width 48 -> 192 -> 48, top-2, 4-bit experts in groups of 16, random codes and
integer zero points, which QMoE needs) both ways, checks them against a float reference, and
times them side by side on the same inputs:

* dense stacked: ``TopKRoute`` (our function), ``MatMulNBits`` over all 8 experts' ``fc1`` at
  once, GELU, routing weights, ``MatMulNBits`` over the stacked ``fc2``, bias mix;
* ``QMoE`` (``k=2``, ``normalize_routing_weights=1`` = softmax over the top-k logits, block-wise
  4-bit weights with uint8 zero points, ``activation_type=gelu``).

The reference is computed with exact (erf) GELU, which MP-ISMoE's experts use, and with the tanh
approximation, to show which one each graph computes.

    python benchmarks/moe_ops.py [--repeats 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from mpismoe_edge.export import functions as F
from mpismoe_edge.quant.pack import dequantize, pack_bits

E, D, H, G, BITS, K = 8, 48, 192, 16, 4, 2


def _experts(n: int, k: int, gen: torch.Generator):
    """Packed codes [E, n, k/G, G/2], scales and integer zero points [E, n, k/G], float weights [E, n, k]."""
    codes = torch.randint(0, 1 << BITS, (E, n, k // G, G), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, BITS)
    scales = torch.rand(E, n, k // G, generator=gen) * 0.05 + 0.01
    zeros = torch.randint(0, 1 << BITS, (E, n, k // G), generator=gen).float()
    weights = torch.stack([dequantize(packed[e], scales[e], zeros[e], BITS, G) for e in range(E)])
    return packed, scales, zeros, weights


def _model(nodes, inits, extra_domains=()) -> bytes:
    graph = helper.make_graph(
        nodes,
        "moe",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", D]),
            helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["T", E]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", D])],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
    )
    imports = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), *extra_domains]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def qmoe_model(fc1, fc2, b1, b2) -> onnx.ModelProto:
    (p1, s1, z1, _), (p2, s2, z2, _) = fc1, fc2
    inits = {
        "w1": p1.reshape(E, H, -1).numpy(),
        "s1": s1.numpy(),
        "b1": b1,
        "w2": p2.reshape(E, D, -1).numpy(),
        "s2": s2.numpy(),
        "b2": b2,
        "z1": pack_bits(z1.to(torch.uint8), BITS).numpy(),
        "z2": pack_bits(z2.to(torch.uint8), BITS).numpy(),
    }
    node = helper.make_node(
        "QMoE",
        ["x", "logits", "w1", "s1", "b1", "w2", "s2", "b2", "", "", "", "z1", "z2"],
        ["y"],
        domain="com.microsoft",
        k=K,
        activation_type="gelu",
        expert_weight_bits=BITS,
        block_size=G,
        normalize_routing_weights=1,
    )
    return _model([node], inits)


def dense_model(fc1, fc2, b1, b2) -> onnx.ModelProto:
    """The exported ISMoE layer after fusion: fc1 rows and fc2 input blocks of all experts stacked."""
    (p1, s1, z1, _), (p2, s2, z2, _) = fc1, fc2
    inits = {
        "w1": p1.reshape(E * H, D // G, -1).numpy(),
        "s1": s1.reshape(E * H, -1).numpy(),
        "b1": b1.reshape(-1),
        "z1": pack_bits(z1.reshape(E * H, -1).to(torch.uint8), BITS).numpy(),
        # fc2 [D, E*H]: expert e's input columns are the e-th block of K
        "w2": p2.permute(1, 0, 2, 3).reshape(D, E * H // G, -1).numpy(),
        "s2": s2.permute(1, 0, 2).reshape(D, -1).numpy(),
        "z2": pack_bits(z2.permute(1, 0, 2).reshape(D, -1).to(torch.uint8), BITS).numpy(),
        "b2": b2,
        "hidden": np.array([0, E, H], np.int64),
        "flat": np.array([0, E * H], np.int64),
        "last": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("TopKRoute", ["logits"], ["route"], domain=F.DOMAIN, k=K),
        helper.make_node(
            "MatMulNBits",
            ["x", "w1", "s1", "z1", "", "b1"],
            ["h1"],
            domain="com.microsoft",
            K=D,
            N=E * H,
            bits=BITS,
            block_size=G,
        ),
        helper.make_node("Gelu", ["h1"], ["h2"], domain="com.microsoft"),
        helper.make_node("Reshape", ["h2", "hidden"], ["h3"]),
        helper.make_node("Unsqueeze", ["route", "last"], ["route3"]),
        helper.make_node("Mul", ["h3", "route3"], ["h4"]),
        helper.make_node("Reshape", ["h4", "flat"], ["h5"]),
        helper.make_node(
            "MatMulNBits",
            ["h5", "w2", "s2", "z2"],
            ["y0"],
            domain="com.microsoft",
            K=E * H,
            N=D,
            bits=BITS,
            block_size=G,
        ),
        helper.make_node("MatMul", ["route", "b2"], ["yb"]),
        helper.make_node("Add", ["y0", "yb"], ["y"]),
    ]
    model = _model(nodes, inits, [helper.make_opsetid(F.DOMAIN, F.DOMAIN_VERSION)])
    model.functions.extend(f for f in F.function_protos() if f.name == "TopKRoute")
    return model


def reference(x, logits, fc1, fc2, b1, b2, approximate: str) -> np.ndarray:
    vals, idx = logits.topk(K, -1)
    route = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))
    bias1, bias2 = torch.from_numpy(b1).double(), torch.from_numpy(b2).double()
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for e in range(E):
        h = torch.nn.functional.gelu(x.double() @ fc1[3][e].double().T + bias1[e], approximate=approximate)
        out += route[:, e : e + 1].double() * (h @ fc2[3][e].double().T + bias2[e])
    return out.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    F.register_schemas()
    gen = torch.Generator().manual_seed(0)
    fc1, fc2 = _experts(H, D, gen), _experts(D, H, gen)
    b1 = (torch.randn(E, H, generator=gen) * 0.1).numpy()
    b2 = (torch.randn(E, D, generator=gen) * 0.1).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: ort.InferenceSession(build(fc1, fc2, b1, b2).SerializeToString(), so, providers=["CPUExecutionProvider"])
        for name, build in (("dense stacked (exporter)", dense_model), ("com.microsoft.QMoE", qmoe_model))
    }
    print(
        f"\nOne side-MoE layer: {E} experts {D}->{H}->{D}, top-{K}, {BITS}-bit groups of {G}; "
        f"ORT {ort.__version__} CPU, {args.threads} threads, median of {args.repeats} interleaved runs\n"
    )
    print("| form | max abs diff vs exact GELU | vs tanh GELU | 128 tokens (ms) | 2048 tokens (ms) |")
    print("|---|---|---|---|---|")
    feeds = {}
    for tokens in (128, 2048):
        x = torch.randn(tokens, D, generator=gen)
        logits = torch.randn(tokens, E, generator=gen)
        feeds[tokens] = (x, logits, {"x": x.numpy(), "logits": logits.numpy()})
    x, logits, feed = feeds[128]
    exact, tanh = (reference(x, logits, fc1, fc2, b1, b2, a) for a in ("none", "tanh"))
    times = {name: {t: [] for t in feeds} for name in sessions}
    for tokens, (_, _, f) in feeds.items():
        for sess in sessions.values():
            sess.run(None, f)
        for _ in range(args.repeats):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, f)
                times[name][tokens].append(time.perf_counter() - t0)
    for name, sess in sessions.items():
        y = sess.run(None, feed)[0]
        med = {t: statistics.median(v) * 1e3 for t, v in times[name].items()}
        print(
            f"| {name} | {np.abs(y - exact).max():.2g} | {np.abs(y - tanh).max():.2g} | {med[128]:.2f} | "
            f"{med[2048]:.2f} |"
        )


if __name__ == "__main__":
    main()
