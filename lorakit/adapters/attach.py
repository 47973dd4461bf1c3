"""Attaching an adapter that was read from files (files.read_adapter) to a model: every tensor's key and shape
checked against the model before it changes, LoRA layers injected, the tensors copied in, and the model put back as
it was if anything fails."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..nn.kinds import BIAS_FILE_KEY, kind_of
from ..nn.layers import LoraLayer, SavedModule
from .config import LoraConfig, replace
from .files import adapter_tensors, bias_tensors, check_converted, read_adapter
from .inject import add_adapter_layers, check_new_name, delete_adapter, mark_trainable, set_adapter
from .locks import exclusive
from .parts import configs, plan_saved_modules, plan_targets, unwrap


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load the adapter in directory `path` (written by lorakit or PEFT) as adapter `name`, injecting LoRA layers
    where needed. It becomes active if no adapter was active. Everything is checked before the model changes;
    if anything fails the model is left exactly as it was."""
    check_new_name(unwrap(model), name)
    return attach(model, *read_adapter(path), name=name, trainable=trainable, where=path)


@exclusive
def attach(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], name: str = "default",
           trainable: bool = False, where: str | os.PathLike = "adapter") -> nn.Module:
    """load_adapter for an adapter already read (files.read_adapter: its config and its tensors under file keys);
    `where` names it in messages."""
    root, path = unwrap(model), where
    check_new_name(root, name)
    check_converted(config, path)
    try:
        plan = plan_targets(root, config)
    except ValueError as e:
        raise ValueError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    saved = plan_saved_modules(root, config, strict=False)  # PEFT lists e.g. "score" beside "classifier"
    try:
        expected = _expected_shapes(root, config, plan, saved, set(tensors))
    except ValueError as e:
        raise ValueError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    _check_tensors(path, expected, tensors)
    first = not configs(root)
    _fill_new_adapter(root, replace(config, init="zeros"), name, plan, saved, tensors)
    if trainable:
        mark_trainable(root, name)
    else:
        for tensor in adapter_tensors(root, name).values():
            tensor.requires_grad_(False)
        if first:
            root.requires_grad_(False)
    set_adapter(root, getattr(root, "lora_active", None) or name)
    return model


def _expected_shapes(root: nn.Module, config: LoraConfig, plan: dict, saved: list[str],
                     present: set[str]) -> dict[str, tuple]:
    # {file key without prefix: shape} for everything `config` puts in a file, from the model before it changes.
    # B's bias may be absent where the layer has no bias of its own (mergekit writes none there): it stays zero.
    expected = {}
    for path, (r, _) in plan.items():
        module = root.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = kind_of(base)
        key_a, key_b = kind.file_keys
        expected[f"{path}.{key_a}"], expected[f"{path}.{key_b}"] = kind.factor_shapes(base, r)
        if config.use_dora and not kind.linear:  # e.g. PEFT's Conv2d DoRA: say so, not "wrong shape"
            raise ValueError(f"DoRA supports Linear and Conv1D layers, not {kind.name} ({path!r})")
        if config.use_dora:
            expected[f"{path}.lora_magnitude_vector"] = (kind.dims(base)[1],)
        key = f"{path}.{BIAS_FILE_KEY}"
        if config.lora_bias and (getattr(module, "bias", None) is not None or key in present):
            expected[key] = (kind.dims(base)[1],)
    for path in saved:
        module = root.get_submodule(path)
        module = module.original_module if isinstance(module, SavedModule) else module
        for key, value in module.state_dict().items():
            expected[f"{path}.{key}"] = tuple(value.shape)
    for key, bias in bias_tensors(root, config.bias, set(plan)).items():
        expected[key] = tuple(bias.shape)
    return expected


def _fill_new_adapter(root, config: LoraConfig, name: str, plan: dict, saved: list[str], tensors: dict) -> None:
    # Inject adapter `name` and copy the file's tensors in; on any failure the model is put back as it was (trained
    # biases are base parameters: their old values are kept to undo a failed load).
    old_biases = {key: b.detach().clone() for key, b in bias_tensors(root, config.bias, set(plan)).items()}
    try:
        add_adapter_layers(root, config, name, plan, saved)
        targets = adapter_tensors(root, name)
        with torch.no_grad():
            for key, value in tensors.items():
                targets[key].copy_(value)
    except BaseException:
        with torch.no_grad():
            for key, old in old_biases.items():
                bias_tensors(root, config.bias, set(plan))[key].copy_(old)
        if name in configs(root):
            delete_adapter(root, name)
        raise


def _check_tensors(path, expected: dict, tensors: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {str(path)!r} does not fit this model: "
                         + (f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; " if missing else "")
                         + (f"tensors for no target {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}" if unexpected else ""))
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if found != shape:
            raise ValueError(f"adapter {str(path)!r} does not fit this model: {key} has shape {found}, "
                             f"this model expects {shape}")
