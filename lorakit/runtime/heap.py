"""Give freed tensor memory back to the system during training, so that the process's resident memory follows the
tensors alive rather than the most ever allocated, without paying for it in the backward pass.

PyTorch's CPU tensors come from malloc. glibc's malloc serves a request from its heap unless it is at least the
mmap threshold, and that threshold rises (up to 32 MiB on 64-bit) each time a mapped block is freed: after the first
few steps, the activations of a training step (hidden states of 4 × 1024 × 768 floats are 12 MiB) all live in the
heap, whose freed blocks stay resident and fragment. Measured on `lorakit train` (Llama-134M, 4 × 1024 tokens,
gradient checkpointing, benchmarks/losses.py): a peak of 2.67 GiB with glibc's default, 1.41 GiB with a fixed
threshold of 1 MiB, which gives every tensor of 1 MiB or more its own mapping, returned to the system when freed.

Its price is the kernel zero-filling every page of every new large tensor: a checkpointed step allocates gigabytes
of them, and the step took 25% longer (BENCHMARKS §14). So the two phases of a step are treated apart:

- forward (the 1 MiB threshold): what it makes lives on into backward (checkpointed hidden states, saved
  activations), each in its own mapping unless a free heap block fits it, so little of it pins heap pages;
- backward, inside `reusing_freed_memory()`: blocks under 32 MiB come from the heap, where each block's recompute
  and gradients reuse the blocks the previous one freed, without zero-filling; on leaving, the heap's free pages go
  back to the system (malloc_trim), so the next forward starts from the live tensors only.

Measured the same way: 2.1-2.3 GiB, and about the step time of glibc's default (BENCHMARKS §14).

Hand-written because neither torch nor the standard library exposes mallopt or malloc_trim; glibc reads the
threshold from the environment (MALLOC_MMAP_THRESHOLD_) only at start-up, too late for a library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Iterator

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
THRESHOLD = 1 << 20
REUSE_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (64-bit)
_state = {"threshold": None}  # the threshold release_freed_memory set; None: glibc's defaults are left alone


@functools.cache  # find_library runs ldconfig: about 1 ms, and backward asks every micro-batch
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `threshold` bytes (fixed, no longer dynamic), unless the environment already sets
    it (MALLOC_MMAP_THRESHOLD_ wins). True if set; False where there is no glibc (macOS, Windows, musl)."""
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        return False
    _state["threshold"] = threshold
    return True


@contextlib.contextmanager
def reusing_freed_memory(device: torch.device) -> Iterator[None]:
    """Within: tensors under 32 MiB come from malloc's heap and reuse its freed blocks (no fresh, zero-filled pages);
    on leaving, release_freed_memory's threshold again and the heap's free pages returned to the system. For a
    backward pass on `device`; nothing changes unless release_freed_memory set a threshold in this process, nor for
    a device other than the CPU (its tensors are not malloc's)."""
    threshold, libc = _state["threshold"], _libc()
    if threshold is None or libc is None or device.type != "cpu":
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, REUSE_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.malloc_trim(0)


def trim() -> None:
    """Hand the heap's free pages back to the operating system (glibc's malloc_trim); nothing without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
