"""PyTorch operators and bytes allocated by one training step, MP-ISMoE vs LST (no timing).

Counts every aten call (a ``TorchDispatchMode``) of one forward and backward on 32 default
tweets with the real MiniLM-L6 backbone: backbone forward, side forward, side backward. On a
shared CPU each small op costs tens of microseconds, so the count is what the time per step
follows when the matmuls are small; it does not depend on the machine's load.

    python benchmarks/step_ops.py [--methods mp-ismoe lst]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0
        self.by_name: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.by_name[str(func.overloadpacket)] += 1
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.bytes += o.numel() * o.element_size()
        return out


def count(method: str) -> dict:
    from mpismoe_edge.cli import default_backbone_path
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.data import load_default
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.model import build_model, load_backbone

    train_ds, _ = load_default(64, 10)
    backbone, tok_json = load_backbone(default_backbone_path())
    if method == "lst":
        side, quant = SideConfig(dense_ffn=True, init="random"), None
    else:  # RTN builds fast; the packed layout and the step are those of GNP-IQ
        side, quant = SideConfig(expert_bits=4, init="random"), QuantConfig(bits=4, method="rtn")
    torch.manual_seed(0)
    model = build_model(
        backbone, ModelConfig(labels=train_ds.labels, max_length=64, side=side, quant=quant), tok_json, progress=False
    )
    feed = encode(make_tokenizer(tok_json, 64), train_ds.texts[:32], model.input_names)
    target = torch.tensor(train_ds.targets[:32])
    model.train()
    with _Count() as c:
        states = model.backbone_states(**feed)
        backbone_ops, backbone_bytes = c.ops, c.bytes
        loss = torch.nn.functional.cross_entropy(model.side(states, feed["attention_mask"]), target) + model.aux_loss()
        forward_ops = c.ops
        loss.backward()
    return {
        "method": method,
        "backbone": backbone_ops,
        "backbone_mb": backbone_bytes / 2**20,
        "side_forward": forward_ops - backbone_ops,
        "side_backward": c.ops - forward_ops,
        "total": c.ops,
        "mb": c.bytes / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["mp-ismoe", "lst"], choices=["mp-ismoe", "lst"])
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [count(m) for m in args.methods]
    print("| method | backbone ops | side forward ops | side backward ops | all ops | MB allocated (all outputs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['backbone']} | {r['side_forward']} | {r['side_backward']} | "
            f"{r['total']} | {r['mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
