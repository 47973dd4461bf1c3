"""Which dtypes a run stores and computes in.

Storage: `--dtype auto|bf16|fp16|fp32` is the dtype the base model's weights are held in (auto: the checkpoint's
own, as transformers' dtype="auto"); never an fp32 copy of a bf16 checkpoint unless asked for.
Compute: `--precision auto|fp32|bf16` is the dtype the matrix multiplies run in. auto picks bf16 where the device
multiplies bf16 fast (CUDA GPUs with bf16 support; CPUs with AVX-512 BF16 or AMX, which PyTorch's oneDNN kernels
use) and fp32 elsewhere: on a CPU without those instructions a bf16 matmul falls back to a scalar reference loop
that is many times slower than fp32.

The CPU's answer comes from its flags in /proc/cpuinfo, unless the environment variable LORAKIT_CPU_BF16 says
otherwise: "1" treats the CPU as multiplying bf16 fast, "0" as not. That variable is the one place the detection is
overridden (the test suite sets it to "0" so that its runs compute alike on every CPU, and fakes each answer where
it tests the decision).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path

import torch

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAMES = {dtype: name for name, dtype in DTYPES.items() if dtype is not None}
# --precision -> the dtype autocast computes in; None: plain fp32, no autocast. "auto" is resolved per device.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)
CPU_BF16_OVERRIDE = "LORAKIT_CPU_BF16"  # "1" / "0": what the CPU is taken to report (see the module docstring)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices fast (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_instructions()


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX, or what LORAKIT_CPU_BF16 says it has."""
    override = os.environ.get(CPU_BF16_OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ValueError(f"{CPU_BF16_OVERRIDE}={override!r}: expected 1 (fast bf16) or 0 (not), or unset")
    return _cpu_flags_say_bf16()


@functools.cache
def _cpu_flags_say_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16": --precision with "auto" decided for `device`."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """torch.autocast to bf16 for "bf16" (and "auto" where bf16 is fast); a no-op context for fp32."""
    dtype = AUTOCAST_DTYPES[resolve(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype of `--precision` on `device`; bf16 asked for where it is slow gives a warning saying why."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not fast_bf16(device):
        warnings.warn(f"--precision bf16 on {torch.device(device).type} without fast bf16 matrix multiplies (no "
                      f"AVX-512 BF16 or AMX on this CPU): PyTorch falls back to a reference bf16 kernel many times "
                      f"slower than fp32; --precision auto picks fp32 here", stacklevel=2)
    return AUTOCAST_DTYPES[resolve(precision, device)] or torch.float32


def storage_dtype(dtype: str, device: torch.device | str) -> torch.dtype | str:
    """The torch dtype of `--dtype` ("auto" stays "auto": transformers resolves it to the checkpoint's own). Raises
    ValueError for a dtype `device` cannot compute in (bf16 on a GPU without bf16 support)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32")
    return DTYPES[dtype] or "auto"
