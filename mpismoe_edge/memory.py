"""Resident memory of a training process: what glibc's malloc keeps after PyTorch frees.

glibc serves blocks above its mmap threshold (128 KiB at start) with mmap and gives them back on
free, but each such free raises the threshold to that block's size (up to 32 MiB). After a few
training steps a step's activations come from the heap instead, and freed heap memory mostly
stays resident. Setting the thresholds explicitly turns that adaptation off, so freed
activations go back to the system, at the price of fresh pages for each large allocation: on
MP-ISMoE's training (1,000 tweets, one epoch, 2 threads) peak RSS above the starting point went
from 585 to 299 MB and the training time from 20 to 29 s.

Blocks below the threshold still come from the heap, and a training step's thousands of small
tensors leave it fragmented: free pages between live blocks stay resident and pile up over the
steps. :func:`release_free_pages` (``malloc_trim``) hands those pages back; ``train()`` calls it
after every step. Measured on MP-ISMoE's first 60 steps on the tweets (2 threads): resident
memory between steps 207 -> 128 MB above the start, peak 298 -> 244 MB; the call takes ~10 ms.

oneDNN (PyTorch's CPU kernels for some matmuls) caches a compiled primitive per shape, 1,024 of
them by default, each with its own buffers; the experts see a different token count at every
call, so the cache fills and stays full. :func:`bound_kernel_cache` caps it (same 60 steps:
between steps 128 -> 87 MB, peak 245 -> 233 MB, no slower). oneDNN reads the cap once, at its
first primitive, so it only works before the process's first torch computation; ``mpismoe-train``
sets it at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc with ``mallopt`` and ``malloc_trim`` typed, loaded once; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Have glibc's malloc return freed blocks of ``threshold`` bytes and more to the system
    (fixed mmap and trim thresholds, no top pad). False where malloc is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    return all(
        libc.mallopt(opt, value) == 1
        for opt, value in ((_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, threshold), (_M_TOP_PAD, 0))
    )


def release_free_pages() -> bool:
    """Give the free pages inside glibc's heaps back to the system now (``malloc_trim(0)``).
    False where malloc is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_kernel_cache(capacity: int = 64) -> None:
    """Cap oneDNN's primitive cache at ``capacity`` entries unless the environment already sets
    it. Takes effect only when called before the process's first torch computation."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))
