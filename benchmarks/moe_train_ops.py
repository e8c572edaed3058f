"""One side-MoE layer in training (forward + backward): grouped matmuls vs a wide FFN vs an expert loop.

Why eager ISMoE runs its experts as grouped matmuls (``side/moe.py``, ``routed_mixture``): this
times forward + backward of the expert mixture of one layer at the quickstart's shapes (32 texts
x 40 tokens, about a tenth of them padding; side width 48, 8 experts of hidden 192, top-2; 4-bit
quantization-aware experts in groups of 16, fake-quantized once per step in every form), in four
forms that compute the same sum ``sum_e w_e * expert_e(x)``:

* **routed, grouped matmul** (now): (token, expert) pairs sorted by expert, the routed tokens
  gathered once, each expert layer of all experts one ``grouped_mm`` over the jagged slices;
* **wide FFN** (the export's form): every token through all ``E*H`` hidden units in two
  matmuls, each expert's units scaled by the token's routing weight (zero for unpicked experts):
  exactly top-k routing, but ``E/k`` times the work and the activations;
* **padded bmm**: the routed tokens in ``[E, C, D]`` padded to the busiest expert's count ``C``,
  two ``baddbmm``;
* **per-expert loop** (before): the same sorted dispatch, each expert's two linears on its slice;

and, for scale, LST's one dense side FFN (48 -> 192 -> 48, float). Every form is checked against
the routed one (outputs, gradients of the input, the routing weights the token picked and the
experts), then all are timed interleaved (median of ``--repeats``); the operator count (aten
calls of forward + backward; big: an output of >= 32768 elements, a parallel region, as
``step_ops.OpCount`` counts them) does not depend on the machine's load; the saved activations
(bytes the autograd graph holds after the forward) are what the form adds to peak memory.

    python benchmarks/moe_train_ops.py [--repeats 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from benchmarks.step_ops import OpCount
from mpismoe_edge.side.experts import Expert
from mpismoe_edge.side.moe import expert_stack, routed_mixture, wide_mixture

B, T, D, E, H, K, BITS, G = 32, 40, 48, 8, 192, 2, 4, 16


def routed(x, w, experts):
    return routed_mixture(x, w, *expert_stack(experts))


def wide(x, w, experts):
    w1, b1, w2, b2 = expert_stack(experts)
    fc1, fc2 = w1.flatten(0, 1), w2.permute(1, 0, 2).flatten(1)  # [E*H, D], [D, E*H]
    return wide_mixture(
        x, w, lambda h: nn.functional.linear(h, fc1, b1.flatten()), lambda h: nn.functional.linear(h, fc2), b2
    )


def _pairs(w):
    """Flat tokens' (expert, token) pairs sorted by expert, with each pair's gate and each expert's count."""
    expert, token = torch.nonzero(w.t() > 0, as_tuple=True)
    gate = w.reshape(-1).index_select(0, token * w.shape[1] + expert).unsqueeze(-1)
    return expert, token, gate, torch.bincount(expert, minlength=w.shape[1])


def padded_bmm(x, w, experts):
    flat, w = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1])
    expert, token, gate, sizes = _pairs(w)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(len(expert)) - starts.index_select(0, expert)
    cap = int(sizes.max())
    w1, b1, w2, b2 = expert_stack(experts)  # [E, H, D], [E, H], [E, D, H], [E, D]
    routed = flat.new_zeros(E * cap, flat.shape[-1]).index_copy(0, expert * cap + slot, flat.index_select(0, token))
    h = torch.baddbmm(b1.unsqueeze(1), routed.view(E, cap, -1), w1.transpose(1, 2))
    y = torch.baddbmm(b2.unsqueeze(1), nn.functional.gelu(h), w2.transpose(1, 2))
    y = y.reshape(E * cap, -1).index_select(0, expert * cap + slot) * gate
    return torch.zeros_like(flat).index_add(0, token, y).reshape(x.shape)


def per_expert(x, w, experts):
    flat, w = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1])
    expert, token, gate, sizes = _pairs(w)
    sizes = sizes.tolist()
    used = [e for e, n in enumerate(sizes) if n]
    w1, b1, w2, b2 = expert_stack(experts)
    routed = flat.index_select(0, token).split([sizes[e] for e in used])
    ys = [
        nn.functional.linear(nn.functional.gelu(nn.functional.linear(chunk, w1[e], b1[e])), w2[e], b2[e])
        for e, chunk in zip(used, routed)
    ]
    return torch.zeros_like(flat).index_add(0, token, torch.cat(ys) * gate).reshape(x.shape)


def lst(x, w, ffn):
    return ffn(x)


def _inputs(gen):
    x = torch.randn(B, T, D, generator=gen, requires_grad=True)
    logits = torch.randn(B, T, E, generator=gen)
    vals, idx = logits.topk(K, -1)
    w = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))
    lengths = torch.randint(T * 3 // 4, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).float()
    return x, (w * mask.unsqueeze(-1)).requires_grad_(), torch.randn(B, T, D, generator=gen)


def _saved_bytes(form, module, x, w) -> int:
    """Bytes of the distinct tensors the autograd graph of one forward saves for its backward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        form(x, w, module)
    return sum(seen.values())


def _step(form, module, x, w, probe):
    """Forward + backward of one layer's mixture; returns (output, gradients of x, w and parameters)."""
    out = form(x, w, module)
    return out, torch.autograd.grad((out * probe).sum(), [x, w, *module.parameters()], allow_unused=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    experts = nn.ModuleList(Expert(D, H, BITS, G) for _ in range(E))
    with torch.no_grad():
        for q in experts.parameters():
            q.add_(torch.randn_like(q) * 0.01)  # nonzero biases
    x, w, probe = _inputs(gen)
    forms = {
        "routed, grouped matmul (now)": (routed, experts),
        "wide FFN (export form)": (wide, experts),
        "padded bmm": (padded_bmm, experts),
        "per-expert loop (before)": (per_expert, experts),
        "LST dense FFN (float, for scale)": (lst, Expert(D, H)),
    }
    picked = (w > 0).float()  # the router's top-k backward gives the unpicked weights no gradient
    ref_out, ref_grads = _step(routed, experts, x, w, probe)
    diffs, ops, saved = {}, {}, {}
    for name, (form, module) in forms.items():
        out, (gx, gw, *gp) = _step(form, module, x, w, probe)
        if module is experts:
            rx, rw, *rp = ref_grads
            pairs = [(out, ref_out), (gx, rx), (gw * picked, rw * picked), *zip(gp, rp)]
            diffs[name] = max((g - r).abs().max().item() for g, r in pairs)
        with OpCount() as c:
            _step(form, module, x, w, probe)
        ops[name] = (c.ops, c.big)
        saved[name] = _saved_bytes(form, module, x, w) / 2**20
    times = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, (form, module) in forms.items():
            t0 = time.perf_counter()
            _step(form, module, x, w, probe)
            times[name].append(time.perf_counter() - t0)
    real = int((w.detach().sum(-1) > 0).sum())
    print(
        f"\nOne side-MoE layer, forward + backward: {B}x{T} tokens ({real} real), {E} experts {D}->{H}->{D}, "
        f"top-{K}, {BITS}-bit fake-quantized experts (groups of {G}); torch {torch.__version__} CPU, "
        f"{args.threads} threads, median of {args.repeats} interleaved runs\n"
    )
    print("| form | ms | aten calls (big) | saved activations (MB) | max abs diff vs routed (outputs, gradients) |")
    print("|---|---|---|---|---|")
    for name in forms:
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | {ops[name][0]} ({ops[name][1]}) | "
            f"{saved[name]:.1f} | {diff} |"
        )


if __name__ == "__main__":
    main()
