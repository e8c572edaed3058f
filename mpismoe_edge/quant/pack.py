"""The one packed low-bit weight layout, shared by torch, the exporter and the runtime.

Codes are unsigned integers in [0, 2**bits). A row of codes is written as a little-endian
bitstream: code i occupies bits [i*bits, (i+1)*bits) of the row, so the first code sits in
the lowest bits of the first byte. For 2, 4 and 8 bits this is exactly ONNX Runtime's
``com.microsoft.MatMulNBits`` layout:

* ``qweight``: uint8 ``[N, k_blocks, group_size * bits / 8]`` (codes packed along K, per block)
* ``scales``:  float32 ``[N, k_blocks]``
* ``zeros``:   float32 ``[N, k_blocks]`` (MatMulNBits' "same type as scales" zero points)

and ``W[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]``. Zero points are real
numbers below 8 bits (a symmetric group wants z = 1.5 at 2 bits, which no integer gives);
ORT's CPU kernel takes float zero points only for 2 and 4 bits, so 8-bit zero points are
integers and the exporter hands them over as uint8.
3-bit rows pack 8 codes into 3 bytes (codes cross byte boundaries); no ORT kernel reads
them, the exporter's portable ONNX function does.
"""

from __future__ import annotations

import math

import torch

from ..config import BITS as SUPPORTED_BITS  # noqa: F401  (the widths the layout packs)


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte unit of the bitstream."""
    unit_bits = math.lcm(8, bits)
    return unit_bits // bits, unit_bits // 8


def packed_len(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes occupy (padded to whole units)."""
    n_vals, n_bytes = _unit(bits)
    return -(-n_codes // n_vals) * n_bytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., L]`` into uint8 bytes ``[..., packed_len(L, bits)]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
    *lead, length = codes.shape
    rows = codes.reshape(-1, length)
    step = max(1, _PACK_CODES // max(length, 1))  # bounded int64 temporaries for large tables
    parts = [_pack_rows(rows[a : a + step], bits) for a in range(0, rows.shape[0], step)]
    return torch.cat(parts).reshape(*lead, -1) if parts else codes.new_zeros((*lead, packed_len(length, bits)))


_PACK_CODES = 1 << 20  # codes packed per step


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    n_vals, n_bytes = _unit(bits)
    pad = -codes.shape[-1] % n_vals
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(codes.shape[0], -1, n_vals)
    shifts = torch.arange(n_vals, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(n_bytes, dtype=torch.int64, device=codes.device) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(codes.shape[0], -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., bytes]`` to uint8 codes ``[..., length]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
    n_vals, n_bytes = _unit(bits)
    *lead, nb = packed.shape
    mask = (1 << bits) - 1
    if n_bytes == 1:  # 2, 4, 8 bits: codes never cross a byte, stay in uint8
        # one scalar shift per code of a byte: a shift by a broadcast tensor of shifts was 3-4x
        # slower on CPU, and this runs for every packed layer on every training step
        codes = torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], -1) if bits < 8 else packed.clone()
    else:  # 3 bits: 8 codes in a 24-bit word
        b = packed.reshape(*lead, nb // n_bytes, n_bytes).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(n_vals, dtype=torch.int32, device=packed.device) * bits
        codes = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
    return codes.reshape(*lead, -1)[..., :length]


def pack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes ``[N, K]`` to qweight ``[N, K/G, G*bits/8]`` in the shared layout."""
    n, k = codes.shape
    return pack_bits(codes.reshape(n, k // group_size, group_size), bits)


def unpack_codes(qweight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """qweight ``[N, K/G, G*bits/8]`` to codes ``[N, K]``."""
    n, k_blocks, _ = qweight.shape
    return unpack_bits(qweight, bits, group_size).reshape(n, k_blocks * group_size)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Float weight ``[N, K]`` from the packed layout (one float temporary: this runs on every
    forward of a packed layer). ``scratch`` (2, 4 and 8 bits): flat uint8 and float buffers of
    at least ``N*K`` elements to unpack and dequantize into, so that a frozen forward allocates
    nothing; the result is then a view of the float buffer."""
    n, k_blocks, _ = qweight.shape
    if scratch is None:
        w = unpack_bits(qweight, bits, group_size).to(scales.dtype)  # [N, k_blocks, G]
    else:
        w = _unpack_into(scratch[1][: n * k_blocks * group_size], qweight, bits, scratch[0])
    w.sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1))
    return w.reshape(n, k_blocks * group_size)


def _unpack_into(out: torch.Tensor, packed: torch.Tensor, bits: int, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_bits` of whole-byte codes (2, 4, 8 bits) as floats in ``out`` (viewed as
    ``[..., bytes * 8 / bits]``), through the uint8 buffer ``tmp``: each code slot of a byte is
    shifted and masked contiguously, then copied to its strided place (3x faster on CPU than
    writing the shifted codes to strided places)."""
    n_vals, n_bytes = _unit(bits)
    if n_bytes != 1:
        raise ValueError(f"unpacking into a buffer takes 2, 4 or 8-bit codes, not {bits}")
    slots, code = out.view(*packed.shape, n_vals), tmp[: packed.numel()].view(packed.shape)
    for i in range(n_vals):
        torch.bitwise_right_shift(packed, i * bits, out=code).bitwise_and_((1 << bits) - 1)
        slots[..., i].copy_(code)
    return slots.flatten(-2)
