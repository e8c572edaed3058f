"""One training step, MP-ISMoE vs LST: operators and bytes allocated, and where the time goes.

Counts every aten call (a ``TorchDispatchMode``) of one forward and backward on 32 default
tweets with the real MiniLM-L6 backbone: backbone forward, side forward, side backward. On a
shared CPU each small op costs tens of microseconds, so the count is what the time per step
follows when the matmuls are small; it does not depend on the machine's load.

``--top K`` also lists the K operators with the most big calls. ``--time N`` also times N
training steps of each method interleaved (backbone forward, side forward, backward, AdamW step,
gradient clipping and the heap trim; median per phase) and, with ``--top K``, the K operators with the most
self CPU time in one more step of each (torch profiler). Times depend on the machine's load:
only the side-by-side ratio of one run means anything.

Like ``mpismoe-train``, the process gives freed memory back to the system (every allocation of
128 KiB and more is a fresh mapping, its pages faulted in on first touch) and trims the heap after
each timed step (``mpismoe_edge.memory``); ``--keep-freed-memory`` leaves glibc's defaults, where
freed blocks are reused.

``--layer N`` also times N interleaved forward and backward passes of one side feed-forward
layer, on the inputs the model's first block gives it: MP-ISMoE's whole layer and its parts
(router, expert stacking with fake quantization, the routed experts, the balance losses) next
to LST's dense FFN (median ms each).

``--side NAME=JSON`` adds an MP-ISMoE arm with those ``SideConfig`` fields changed (e.g.
``'r2={"expert_ratio": 2}'``); ``--rows`` sets the tweets per step (a rank's share of a batch).

    python benchmarks/step_ops.py [--methods mp-ismoe lst] [--side NAME=JSON ...] [--rows 32]
                                  [--threads 1] [--time 5] [--layer 30] [--top 12] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.variants import parse_variant

PHASES = ("backbone", "side forward", "backward", "optimizer")


GRAIN = 32768  # ATen's parallel grain size: ops on fewer elements run on the calling thread alone


class OpCount(TorchDispatchMode):
    """Counts aten calls (by name), the bytes of their tensor outputs, and the "big" calls: those
    with an output of at least :data:`GRAIN` elements, which run as a parallel region (every
    thread of the process must get the CPU before it ends; on an oversubscribed CPU each costs a
    scheduling wait, so a process with more threads than free cores runs at this count's pace)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.big = 0, 0, 0
        self.by_name: collections.Counter = collections.Counter()
        self.big_by_name: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.by_name[str(func.overloadpacket)] += 1
        tensors = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        self.bytes += sum(o.numel() * o.element_size() for o in tensors)
        fresh = all(r.alias_info is None for r in func._schema.returns)  # views and in-place ops return an input
        if fresh and any(o.numel() >= GRAIN for o in tensors):
            self.big += 1
            self.big_by_name[str(func.overloadpacket)] += 1
        return out


ARMS = {  # name: (SideConfig fields, a 4-bit backbone)
    "mp-ismoe": ({"expert_bits": 4, "init": "random"}, True),
    "lst": ({"dense_ffn": True, "expert_bits": None, "init": "random"}, False),
}


def setup(method: str, rows: int = 32):
    """(model in training mode, its AdamW, the encoded batch of ``rows`` default tweets, their targets)."""
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.data import load_default
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.model import build_model, default_backbone_path, load_backbone
    from mpismoe_edge.train import TrainConfig, make_optimizer

    train_ds, _ = load_default(max(64, rows), 10)
    backbone, tok_json = load_backbone(default_backbone_path())
    fields, packed = ARMS[method]
    side = SideConfig(**fields)
    quant = QuantConfig(bits=4, method="rtn") if packed else None  # RTN builds fast; the step is GNP-IQ's
    torch.manual_seed(0)
    model = build_model(
        backbone, ModelConfig(labels=train_ds.labels, max_length=64, side=side, quant=quant), tok_json, progress=False
    )
    feed = encode(make_tokenizer(tok_json, 64), train_ds.texts[:rows], model.input_names)
    opt, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=1e-4), steps=1)
    return model.train(), opt, feed, torch.tensor(train_ds.targets[:rows])


def _loss(model, states, feed, target):
    return torch.nn.functional.cross_entropy(model.side(states, feed["attention_mask"]), target) + model.aux_loss()


def count(method: str, rows: int = 32) -> dict:
    model, _, feed, target = setup(method, rows)
    with OpCount() as c:
        states = model.backbone_states(**feed)
        backbone = c.ops, c.big
        loss = _loss(model, states, feed, target)
        forward = c.ops, c.big
        loss.backward()
    return {
        "method": method,
        "backbone": backbone,
        "side_forward": (forward[0] - backbone[0], forward[1] - backbone[1]),
        "side_backward": (c.ops - forward[0], c.big - forward[1]),
        "total": (c.ops, c.big),
        "mb": c.bytes / 2**20,
        "big_by_name": c.big_by_name,
    }


def step(model, opt, feed, target, after_step: Callable[[], Any] | None = None) -> list[float]:
    """One training step (as the training loop runs it, ``after_step`` last as mpismoe-train's
    loop calls it); seconds per phase of :data:`PHASES`."""
    marks = [time.perf_counter()]
    states = model.backbone_states(**feed)
    marks.append(time.perf_counter())
    loss = _loss(model, states, feed, target)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def timed(
    methods: list[str], steps: int, top: int, rows: int = 32, after_step: Callable[[], Any] | None = None
) -> None:
    runs = {m: setup(m, rows) for m in methods}
    for run in runs.values():
        step(*run, after_step)  # warm-up
    seconds = {m: [] for m in methods}
    for _ in range(steps):
        for m, run in runs.items():
            seconds[m].append(step(*run, after_step))
    print(f"\n| method | {' | '.join(f'{p} (ms)' for p in PHASES)} | step (ms) | vs {methods[-1]} |")
    print("|---|" + "---|" * (len(PHASES) + 2))
    total = {m: statistics.median(sum(s) for s in seconds[m]) for m in methods}
    for m in methods:
        phases = [statistics.median(s[i] for s in seconds[m]) * 1e3 for i in range(len(PHASES))]
        print(
            f"| {m} | {' | '.join(f'{v:.0f}' for v in phases)} | {total[m] * 1e3:.0f} | "
            f"{total[m] / total[methods[-1]]:.2f}x |"
        )
    for m, run in runs.items() if top else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(*run, after_step)
        print(f"\n{m}: top {top} operators by self CPU time in one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def _ffn_inputs(model, feed) -> tuple:
    """The first side block's feed-forward layer and the (x, bb_token, bb_hidden, mask) it gets."""
    ffn, got = model.side.blocks[0].ffn, []
    handle = ffn.register_forward_pre_hook(lambda _, args: got.append([a if a is None else a.detach() for a in args]))
    with torch.no_grad():
        model.side(model.backbone_states(**feed), feed["attention_mask"])
    handle.remove()
    return ffn, got[0]


def _backward(*outs: torch.Tensor) -> None:
    sum(o.float().sum() for o in outs).backward()


def _layer_parts(method: str, rows: int) -> dict[str, Callable[[], None]]:
    """One forward and backward pass of ``method``'s first side FFN layer, and of each of its parts."""
    from mpismoe_edge.side.moe import expert_stack, routed_mixture
    from mpismoe_edge.side.router import load_balance_loss, z_loss

    model, _, feed, _ = setup(method, rows)
    ffn, (x, token, hidden, mask) = _ffn_inputs(model, feed)
    x = x.requires_grad_()
    if not hasattr(ffn, "router"):
        return {f"{method}: dense FFN": lambda: _backward(ffn(x, token, hidden, mask))}
    weights, logits = (t.detach().requires_grad_() for t in ffn.router(x, token, hidden, mask))
    gate = (weights * mask.unsqueeze(-1)).detach().requires_grad_()
    stacked = [t.detach().requires_grad_() for t in expert_stack(ffn.experts)]
    return {
        f"{method}: whole layer": lambda: _backward(ffn(x, token, hidden, mask), ffn.aux_loss, ffn.z_loss),
        f"{method}: router": lambda: _backward(*ffn.router(x, token, hidden, mask)),
        f"{method}: expert stacking": lambda: _backward(*expert_stack(ffn.experts)),
        f"{method}: routed experts": lambda: _backward(routed_mixture(x, gate, *stacked)),
        f"{method}: balance losses": lambda: _backward(load_balance_loss(logits, weights, mask), z_loss(logits, mask)),
    }


def layer_parts(methods: list[str], steps: int, rows: int, after_step: Callable[[], Any] | None) -> None:
    """Median ms of a forward and backward pass of one side FFN layer and of its parts, interleaved."""
    parts = {name: run for m in methods for name, run in _layer_parts(m, rows).items()}
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(steps + 2):  # two warm-up rounds
        for name, run in parts.items():
            start = time.perf_counter()
            run()
            if i >= 2:
                seconds[name].append(time.perf_counter() - start)
            if after_step is not None:
                after_step()
    print(f"\none side FFN layer, forward and backward ({rows} tweets, median of {steps}):\n")
    print("| part | ms |\n|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {statistics.median(s) * 1e3:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["mp-ismoe", "lst"], choices=["mp-ismoe", "lst"])
    p.add_argument("--side", nargs="+", default=[], metavar="NAME=JSON", help="MP-ISMoE arms with SideConfig changes")
    p.add_argument("--rows", type=int, default=32, help="tweets per step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N interleaved training steps")
    p.add_argument(
        "--layer", type=int, default=0, metavar="N", help="also time one side FFN layer and its parts N times"
    )
    p.add_argument("--top", type=int, default=0, metavar="K", help="the K operators with most big calls (and time)")
    p.add_argument("--keep-freed-memory", action="store_true", help="glibc's defaults, as mpismoe-train's option")
    args = p.parse_args()
    after_step = None
    if not args.keep_freed_memory:
        from mpismoe_edge.memory import bound_kernel_cache, release_free_pages, return_freed_memory

        bound_kernel_cache()
        return_freed_memory()
        after_step = release_free_pages
    methods = list(args.methods)
    for text in args.side:
        name, fields = parse_variant(text, "step_ops")
        if name in ARMS:
            raise SystemExit(f"step_ops: variant {name!r}: the name of an arm already there")
        ARMS[name] = ({**ARMS["mp-ismoe"][0], **fields}, True)
        methods.insert(len(methods) - 1 if "lst" in methods else len(methods), name)
    torch.set_num_threads(args.threads)
    rows = [count(m, args.rows) for m in methods]
    print("aten calls (of which big: an output of >= 32768 elements, a parallel region):\n")
    print("| method | backbone | side forward | side backward | all | MB allocated (all outputs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k][0]} ({r[k][1]})" for k in ("backbone", "side_forward", "side_backward", "total")]
        print(f"| {r['method']} | {' | '.join(cells)} | {r['mb']:.0f} |")
    if args.top:
        for r in rows:
            print(f"\n{r['method']}: big calls by operator: {dict(r['big_by_name'].most_common(args.top))}")
    if args.time:
        timed(methods, args.time, args.top, args.rows, after_step)
    if args.layer:
        layer_parts(methods, args.layer, args.rows, after_step)


if __name__ == "__main__":
    main()
