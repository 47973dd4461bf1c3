"""Optimizers for adapters: AdamW over the trainable parameters, with LoRA+ learning rates on request."""

from __future__ import annotations

import torch
from torch import nn

from .parts import lora_layers


def optimizer(model: nn.Module, lr: float, lr_ratio: float = 1.0, weight_decay: float = 0.0,
              **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters in named groups: "lora_A", "lora_B", "lora_B_bias" (lora_bias) and
    "other" (heads, biases, DoRA magnitudes). LoRA+ (Hayou et al., 2024): with lr_ratio > 1, B and its bias learn at
    lr · lr_ratio (16 is the paper's usual choice; PEFT's LoRA+ treats lora_B.bias so too), A and the rest at lr.
    Biases and magnitude vectors get no weight decay."""
    if lr_ratio <= 0:
        raise ValueError(f"lr_ratio must be > 0, got {lr_ratio}")
    b_ids, a_ids, c_ids = set(), set(), set()
    for layer in lora_layers(model).values():
        b_ids |= {id(p) for p in layer.lora_B.values()}
        a_ids |= {id(p) for p in layer.lora_A.values()}
        c_ids |= {id(p) for p in layer.lora_B_bias.values()}
    groups = {"lora_A": [], "lora_B": [], "lora_B_bias": [], "other": [], "other_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in b_ids:
            groups["lora_B"].append(p)
        elif id(p) in a_ids:
            groups["lora_A"].append(p)
        elif id(p) in c_ids:
            groups["lora_B_bias"].append(p)
        elif p.ndim < 2:
            groups["other_no_decay"].append(p)
        else:
            groups["other"].append(p)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters: inject() an adapter first")
    rates = {"lora_A": lr, "lora_B": lr * lr_ratio, "lora_B_bias": lr * lr_ratio, "other": lr, "other_no_decay": lr}
    no_decay = ("lora_B_bias", "other_no_decay")
    param_groups = [{"name": k, "params": v, "lr": rates[k], "weight_decay": 0.0 if k in no_decay else weight_decay}
                    for k, v in groups.items() if v]
    return torch.optim.AdamW(param_groups, lr=lr, **adamw_kwargs)
