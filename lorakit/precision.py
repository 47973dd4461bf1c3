"""Numeric precision of a run: the autocast dtype for each --precision."""

from __future__ import annotations

import contextlib

import torch

# --precision -> the dtype autocast computes in; None: plain fp32, no autocast.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def autocast(precision: str, device: torch.device | str):
    """torch.autocast to bf16 for "bf16"; a no-op context for "fp32"."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
