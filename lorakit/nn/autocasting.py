"""The one place lorakit asks torch which dtype autocast computes in (nf4_linear, the fused LoRA matmul and the
chunked loss: code that runs outside autocast's own casting and must cast as it would)."""

from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type` ("cpu", "cuda", ...), or None when autocast is off there.
    The device-type forms of these torch calls are torch >= 2.4's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
