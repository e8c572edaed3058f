"""Where training runs and in what precision: device choice, autocast, loss scaling, peak memory.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the side network under autocast
and the packed backbone's matmuls in that dtype (``QuantLinear`` dequantizes its weight straight
to the compute dtype); parameters, optimizer state and the loss stay float32. ``fp16`` scales the
loss (``GradScaler``) so that small gradients do not underflow; bf16 needs no scaling.
"""

from __future__ import annotations

import contextlib

import torch

from .config import DEVICES, PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this node's GPU ``local_rank``) or ``auto`` (CUDA when there is one).
    ValueError for an unknown name or CUDA on a machine without it."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to PyTorch here (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context: autocast to bf16/fp16, or nothing for fp32."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (a no-op otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the process's peak RSS (MB, since it started) and on CUDA the peak of
    allocated accelerator memory (MB, since :func:`reset_peak_memory`)."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
