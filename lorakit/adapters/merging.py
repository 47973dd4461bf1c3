"""Merging adapters into the base weights and back, running the base model, and unloading lorakit from a model."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from torch import nn

from .locks import exclusive
from .parts import lora_layers, replace_module, saved_modules, unwrap
from .qlora import dequantize_model

if TYPE_CHECKING:
    from ..nn.layers import LoraLayer

log = logging.getLogger("lorakit")


def is_merged(model: nn.Module) -> bool:
    """True when any adapter is folded into the base weights."""
    return any(layer.merged for layer in lora_layers(model).values())


@exclusive
def merge(model: nn.Module) -> None:
    """Fold ΔW of the active adapters into the base weights (idempotent). Forward then costs what the base model
    costs. Raises, with nothing merged, if an adapter would make a weight non-finite or shares a tied weight."""
    root = unwrap(model)
    for path, layer, name in check_mergeable(root):
        quantized = layer.kind.quantized
        error = layer.merge(name)
        if quantized:
            log.info("merged adapter %r into NF4 layer %r: dequantized to %s; max |merged W - (dequantized W + "
                     "ΔW)| = %.3g", name, path, layer.weight.dtype, error)


merge_active = merge  # unload's `merge` flag shadows the function there


def check_mergeable(model: nn.Module) -> list[tuple[str, "LoraLayer", str]]:
    """The (path, layer, adapter) merges that merging the active adapters would do, each checked first (tied weights,
    non-finite results), so that a refusal changes nothing. Raises ValueError naming the layer and adapter."""
    root = unwrap(model)
    pending = [(path, layer, name) for path, layer in lora_layers(root).items()
               for name in layer.active if name not in layer.merged]
    owners = {}  # parameter id -> every module holding it (more than one: tied weights)
    for param_name, p in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name.rpartition(".")[0])
    for path, layer, name in pending:
        tied = [o for o in owners.get(id(getattr(layer, "weight", None)), []) if o != path]
        if tied:
            raise ValueError(f"cannot merge adapter {name!r} into {path!r}: its weight is shared with {tied} "
                             f"(tied weights), which would change too; keep it unmerged")
        if name in layer.lora_B_bias and layer.bias is None and layer.lora_B_bias[name].any():
            # PEFT refuses even a zero one; lorakit merges that (it adds nothing), e.g. where mergekit wrote none
            raise ValueError(f"cannot merge adapter {name!r} into {path!r}: the adapter has a non-zero bias on "
                             f"lora_B (lora_bias) but the layer has no bias to fold it into; keep it unmerged")
        if not layer.merge_stays_finite(name):
            raise ValueError(f"merging adapter {name!r} into {path!r} gives non-finite weights; the adapter is broken")
    return pending


@exclusive
def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights, the last merged first."""
    for layer in lora_layers(model).values():
        for name in reversed(layer.merged):
            layer.unmerge(name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model behaves as the base model: no LoRA update, original modules_to_save modules.
    Merged adapters are unmerged for the block and merged again after it. (Biases trained with bias='all' or
    'lora_only' stay trained: they are base parameters.)"""
    root = unwrap(model)
    was_merged = is_merged(root)
    if was_merged:
        unmerge(root)
    modules = list(lora_layers(root).values()) + list(saved_modules(root).values())
    for layer in lora_layers(root).values():
        layer.restore_pissa(layer.adapters, +1)
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False
        for layer in lora_layers(root).values():
            layer.restore_pissa(layer.adapters, -1)
        if was_merged:
            merge(root)


@exclusive
def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit module and return a plain model. merge=True folds the active adapters into the weights
    and keeps their modules_to_save copies (the trained heads); merge=False restores the base model (merged adapters
    are taken out first, original modules_to_save modules put back). NF4 layers come back dequantized."""
    root = unwrap(model)
    if merge:
        merge_active(root)
    else:
        unmerge(root)
    for path, layer in lora_layers(root).items():
        layer.restore_pissa([n for n in layer.adapters if n not in layer.merged], +1)  # merged: W0 + ΔW already
        replace_module(root, path, layer.release())
    for path, wrapper in saved_modules(root).items():
        replace_module(root, path, wrapper.current() if merge else wrapper.original_module)
    dequantize_model(root)
    for attr in ("lora_configs", "lora_active"):
        if attr in root.__dict__:
            delattr(root, attr)
    return model
