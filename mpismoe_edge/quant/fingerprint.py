"""The fingerprint of a frozen (packed) backbone: which tasks may share one backbone pass.

Side-tuning never changes the backbone, so tasks trained on bit-identical backbones can run one
backbone pass and each its own side network. The fingerprint is a SHA-256 over every tensor of
the backbone's state (packed codes, scales, zeros, and the float tensors left unpacked), each
with its name, dtype and shape, plus the bit map (layer -> bits, group size): equal fingerprints
mean equal backbones. Quantization is deterministic, so two runs with the same backbone folder,
bit map and quantizer settings get the same one, even when trained apart.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

PREFIX = "sha256:"
DIGITS = 16  # hex digits kept: 64 bits tell backbones apart and stay readable in an error message


def bit_map(backbone: nn.Module) -> dict[str, list[int]]:
    """Layer name -> ``[bits, group_size]`` of every packed layer of ``backbone``."""
    from .embedding import QuantEmbedding
    from .linear import QuantLinear

    return {
        name: [int(m.bits), int(m.group_size)]
        for name, m in backbone.named_modules()
        if isinstance(m, (QuantLinear, QuantEmbedding))
    }


@torch.no_grad()
def fingerprint(backbone: nn.Module) -> str:
    """``sha256:<16 hex digits>`` of ``backbone``'s state and bit map (see the module doc)."""
    h = hashlib.sha256()
    h.update(json.dumps(bit_map(backbone), sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\n{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return PREFIX + h.hexdigest()[:DIGITS]


def check_same(fingerprints: dict[str, str]) -> str:
    """The one fingerprint that every named source (a checkpoint, a task) shares; ValueError
    naming two that differ otherwise."""
    items = list(fingerprints.items())
    first_name, first = items[0]
    for name, value in items[1:]:
        if value != first:
            raise ValueError(
                f"{first_name} and {name} are trained on different backbones (fingerprints {first} and {value}); "
                "tasks run together must share one quantized backbone: train each on it with "
                "mpismoe-train --backbone-from CHECKPOINT"
            )
    return first
