"""Model-level LoRA: add adapters to a model, choose which ones run, and delete them.

Every function here takes the model (a torch.nn.Module, usually a Hugging Face model) and works in place. The
adapters' configs live on the model as `model.lora_configs` ({name: LoraConfig}) and the active names as
`model.lora_active`; the layers hold the weights (layers.py). Merging and unloading are in merging.py.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..nn.layers import LoraLayer, SavedModule
from ..nn.nf4 import NF4Weight
from .config import LoraConfig, replace
from .locks import exclusive
from .merging import is_merged, merge, unmerge
from .parts import (
    active_adapters,
    base_biases,
    configs,
    default_task_type,
    lora_layers,
    plan_saved_modules,
    plan_targets,
    replace_module,
    saved_modules,
    task_heads,
    unwrap,
)
from .qlora import plan_quantized, quantize_layers


@exclusive
def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the layers `config` targets, freeze every other parameter, make it the active
    adapter, and return the model (changed in place). The output is unchanged until B is trained (B = 0).
    With modules_to_save=None a task model's head (parts.TASK_HEADS) trains too, as in PEFT; [] keeps it frozen."""
    root = unwrap(model)
    check_new_name(root, name)
    plan = plan_targets(root, config)
    config = with_task_head(root, config, plan)
    saved = plan_saved_modules(root, config)
    overlap = [p for p in plan if any(p == s or p.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap} are both LoRA targets and inside modules_to_save; choose one")
    add_adapter_layers(root, config, name, plan, saved)
    set_adapter(root, name)
    mark_trainable(root, name)
    return model


def with_task_head(model: nn.Module, config: LoraConfig, plan: dict) -> LoraConfig:
    """`config` with modules_to_save=None resolved as PEFT resolves it: the task model's head, unless LoRA adapts it."""
    if config.modules_to_save is not None:
        return config
    heads = task_heads(model, config.task_type or default_task_type(model))
    heads = [h for h in heads if not any(p == h or p.startswith(h + ".") for p in plan)]
    return replace(config, modules_to_save=heads or None)


def check_new_name(model: nn.Module, name: str) -> None:
    """Raise unless `name` can name a new adapter on `model`."""
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete_adapter() it or pick another name")
    if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter name {name!r} must be a Python identifier that is not a dict method name")


def add_adapter_layers(root: nn.Module, config: LoraConfig, name: str, plan: dict[str, tuple[int, float]],
                       saved: list[str]) -> None:
    """Give adapter `name` to the planned layers (wrapping each in a LoraLayer once) and a copy of each saved
    module; with quantize="nf4", every frozen Linear of the model is held in NF4 first. Records the config."""
    if config.quantize == "nf4":
        quantize_layers(root, plan_quantized(root, saved))  # raises before changing anything
    for path, (r, scale) in plan.items():
        layer = root.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            replace_module(root, path, layer)
        layer.add_adapter(name, r, scale, config.dropout, config.init, config.use_dora, config.lora_bias)
    for path in saved:
        wrapper = root.get_submodule(path)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper)
            replace_module(root, path, wrapper)
        wrapper.modules_to_save[name] = copy.deepcopy(wrapper.original_module)
    root.lora_configs = {**configs(root), name: config}


def mark_trainable(model: nn.Module, name: str) -> None:
    """Only adapter `name` trains: its LoRA tensors, its modules_to_save copies and, per its config's bias
    setting, the biases of the layers it adapts ("lora_only") or of the whole base model ("all")."""
    root = unwrap(model)
    root.requires_grad_(False)
    bias = configs(root)[name].bias
    for layer in lora_layers(root).values():
        if name in layer.adapters:
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
            if bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    for wrapper in saved_modules(root).values():
        if name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        for p in base_biases(root).values():
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter counted once (NF4 weights count their elements, not
    their storage, which sharding makes Parameters)."""
    nf4 = quantized_weights(model)
    storage = {id(t) for q in nf4 for t in q.parameters()}
    params = [p for p in unwrap(model).parameters() if id(p) not in storage]
    quantized = sum(q.shape.numel() for q in nf4)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def quantized_weights(model: nn.Module) -> list:
    """Every NF4Weight in the model."""
    return [m for m in unwrap(model).modules() if isinstance(m, NF4Weight)]


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s); their updates are summed in forward. If the model is merged, the old
    adapters are unmerged and the new ones merged, so the model stays merged (zero added latency)."""
    root = unwrap(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in configs(root)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs(root))}")
    was_merged = is_merged(root)
    if was_merged:
        unmerge(root)
    root.lora_active = names
    for layer in lora_layers(root).values():
        layer.set_active(names)
    for wrapper in saved_modules(root).values():
        wrapper.active = next((n for n in names if n in wrapper.modules_to_save), None)
    if was_merged:
        merge(root)


@exclusive
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerging it first). Layers left with no adapter become plain layers again."""
    root = unwrap(model)
    if name not in configs(root):
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs(root))}")
    for path, layer in lora_layers(root).items():
        if name in layer.adapters:
            layer.delete_adapter(name)
            if not layer.adapters:
                replace_module(root, path, layer.release())
    for path, wrapper in saved_modules(root).items():
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
            if wrapper.active == name:
                wrapper.active = None
            if not len(wrapper.modules_to_save):
                replace_module(root, path, wrapper.original_module)
    root.lora_configs = {k: v for k, v in configs(root).items() if k != name}
    root.lora_active = tuple(a for a in active_adapters(root) if a != name)


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them (Hugging Face models'
    own checkpointing, reentrant or not), with the input-gradient fix a frozen base needs (enable_input_grads)."""
    root = unwrap(model)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(root, "activation_checkpointing_enable"):  # transformers >= 5.x
        root.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(root, "gradient_checkpointing_enable"):
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(root).__name__} has no gradient checkpointing of its own (a Hugging Face model has)")
    enable_input_grads(root)
    _keep_dequantized_in_checkpointed_blocks(root)


def _keep_dequantized_in_checkpointed_blocks(root: nn.Module) -> None:
    # An NF4 weight inside a checkpointed block is dequantized twice a step instead of three times: its recompute
    # keeps the weight for its backward (one block's weights at a time). transformers < 4.52 marks no such blocks:
    # there every weight is dequantized again in backward, as without checkpointing.
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return
    for block in root.modules():
        if isinstance(block, GradientCheckpointingLayer) and getattr(block, "gradient_checkpointing", False) and \
                not hasattr(block, "lorakit_nf4_weights"):
            weights = [m for m in block.modules() if isinstance(m, NF4Weight)]  # found once, not every forward
            if weights:  # a block without NF4 weights gets no hook: nothing to decide on its forward
                block.lorakit_nf4_weights = weights
                block.register_forward_pre_hook(_keep_if_checkpointed)


def _keep_if_checkpointed(block: nn.Module, args) -> None:
    # As each forward of the block starts, from its live state, as transformers decides whether to checkpoint it:
    # a block whose checkpointing was turned off, or run in eval mode with grad, keeps no weight (else it would keep
    # every one of the forward until the backward). Both passes of a checkpoint see the same choice.
    keep = bool(block.gradient_checkpointing and block.training and torch.is_grad_enabled())
    for weight in block.lorakit_nf4_weights:
        weight.keep_for_backward = keep


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so that gradient checkpointing with a frozen base still
    back-propagates into the adapters (the usual pitfall of checkpointing a model whose first layers are frozen)."""
    root = unwrap(model)
    embeddings = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    if embeddings is None:
        warnings.warn("model has no get_input_embeddings(); gradient checkpointing may see no gradient", stacklevel=2)
        return
    embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
