"""Give freed tensor memory back to the system during training, so that the process's resident memory follows the
tensors alive rather than the most ever allocated.

PyTorch's CPU tensors come from malloc. glibc's malloc serves a request from its heap unless it is at least the
mmap threshold, and that threshold rises (up to 32 MiB on 64-bit) each time a mapped block is freed: after the first
few steps, the activations of a training step (hidden states of 4 × 1024 × 768 floats are 12 MiB) all live in the
heap, whose freed blocks stay resident and fragment. Measured on `lorakit train` (Llama-134M, 4 × 1024 tokens,
gradient checkpointing, benchmarks/losses.py): a peak of 2.67 GiB with glibc's default, 1.51 GiB with a fixed
threshold. A fixed threshold of 1 MiB gives every tensor of 1 MiB or more its own mapping, returned to the system when
it is freed; smaller ones stay in the heap. The price is a page fault per 4 KiB page of each new large tensor.

Hand-written because neither torch nor the standard library exposes mallopt; glibc reads the same setting from the
environment (MALLOC_MMAP_THRESHOLD_) only at start-up, too late for a library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
THRESHOLD = 1 << 20


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `threshold` bytes (fixed, no longer dynamic), unless the environment already sets
    it (MALLOC_MMAP_THRESHOLD_ wins). True if set; False where there is no glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
