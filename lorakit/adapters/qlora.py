"""QLoRA at the model level (Dettmers et al., 2023): every frozen Linear of the base model held in NF4, while task
heads, embeddings and modules saved in full keep their own dtype. The 4-bit format itself is in quant.py."""

from __future__ import annotations

from torch import nn

from ..nn.kinds import kind_of
from ..nn.layers import LoraLayer
from ..nn.nf4 import NF4Linear
from .parts import base_modules, base_of, is_output_head, replace_module, unwrap


def plan_quantized(model: nn.Module, saved: list[str]) -> list[str]:
    """Paths of the layers quantize="nf4" puts in NF4: every Linear or Conv1D of the base model (a LoRA layer's base
    included) but the output head and the modules under `saved`. Raises ValueError, before anything changes, for a
    model with nothing to quantize, or a LoRA layer whose weight is not its base weight (merged or PiSSA adapters)."""
    root = unwrap(model)
    found, already = [], False
    for path, module in base_modules(root):
        kind = kind_of(base_of(module))
        already = already or getattr(kind, "quantized", False)
        if kind is None or not kind.linear or kind.quantized or is_output_head(root, path, module):
            continue
        if any(path == s or path.startswith(s + ".") for s in saved):
            continue
        if isinstance(module, LoraLayer) and (module.merged or any(a.pissa_start is not None for a in module.adapters.values())):
            raise ValueError(f"cannot quantize {path!r}: it holds merged or PiSSA adapters, so its weight is not the "
                             f"base weight (unmerge, or delete those adapters first)")
        found.append(path)
    if not found and not already:
        raise ValueError(f"quantize='nf4': {type(root).__name__} has no Linear or Conv1D layer to quantize "
                         f"(only those are held in NF4; heads and embeddings keep their dtype)")
    return found


def quantize_layers(model: nn.Module, paths: list[str]) -> None:
    """Hold the layers at `paths` (plain Linear/Conv1D layers, or LoRA layers over one) in NF4."""
    root = unwrap(model)
    for path in paths:
        module = root.get_submodule(path)
        if isinstance(module, LoraLayer):
            module.quantize_base()
        else:
            replace_module(root, path, NF4Linear.from_linear(module))


def dequantize_model(model: nn.Module) -> None:
    """Every NF4 layer back to the Linear or Conv1D it came from, holding the dequantized weights."""
    root = unwrap(model)
    for path, module in list(base_modules(root)):
        if isinstance(module, LoraLayer):
            module.dequantize_base()
        elif isinstance(module, NF4Linear):
            replace_module(root, path, module.to_dense())
