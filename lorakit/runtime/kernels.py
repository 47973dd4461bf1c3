"""`--kernels auto|liger|none`: Liger Kernel's Triton kernels for a Llama-family model on CUDA.

Liger (the optional extra `lorakit[liger]`) replaces a model's RMSNorm, rotary embedding and SwiGLU MLP with fused
Triton kernels (`liger_kernel.transformers.apply_liger_kernel_to_<family>(model=...)`, applied to the loaded
instance), and its fused linear cross-entropy takes the place of lorakit's chunked loss (training/chunked_loss.py):
both compute the head and the loss a chunk at a time without the whole logits, Liger's in Triton. Liger patches the
MLP's forward, not its Linear layers, so LoRA layers injected there still run. Its rotary embedding (and the RMSNorm
and MLP classes) are replaced in the family's transformers module: every model of that family in the same process
uses them afterwards (a `lorakit train` process trains one model).

    choose(requested, device, config)   which kernels a run uses and why (KernelsError where `liger` cannot run)
    apply(kernels, model)               patch the model in place (nothing for "none")
    liger_linear_cross_entropy(...)     the fused loss, called by chunked_loss when the run uses Liger

Which families Liger patches is a table of transformers config classes (FAMILIES), matched by type.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..errors import KernelsError

KERNELS = ("auto", "liger", "none")
# transformers config class -> Liger's function for that family: the Llama-shaped decoders (RMSNorm, RoPE, SwiGLU)
FAMILIES = {"LlamaConfig": "apply_liger_kernel_to_llama", "MistralConfig": "apply_liger_kernel_to_mistral",
            "Qwen2Config": "apply_liger_kernel_to_qwen2"}


@dataclass(frozen=True)
class Kernels:
    """The kernels a run uses: "liger" (with Liger's function for the model's family) or "none", and why."""

    name: str
    why: str
    patch: str | None = None  # liger_kernel.transformers' apply_liger_kernel_to_<family>

    @property
    def liger(self) -> bool:
        return self.name == "liger"


def installed() -> bool:
    """Whether liger-kernel can be imported (pip install 'lorakit[liger]')."""
    return importlib.util.find_spec("liger_kernel") is not None


def family(config) -> str | None:
    """Liger's function for the family of a model with this transformers config (matched by type), or None."""
    import transformers

    for name, patch in FAMILIES.items():
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(config, cls):
            return patch
    return None


def choose(requested: str, device: torch.device, config, available: bool | None = None) -> Kernels:
    """The kernels for `requested` ("auto" | "liger" | "none") on `device` for a model with transformers config
    `config`: Liger where it is installed (`available`, default: `installed()`), the device is CUDA and the family
    is in FAMILIES; else none, saying why. KernelsError when "liger" is asked for where it cannot run."""
    if requested not in KERNELS:
        raise KernelsError(f"kernels must be one of {KERNELS}, got {requested!r}")
    if requested == "none":
        return Kernels("none", "--kernels none")
    available = installed() if available is None else available
    patch = family(config)
    reasons = [(device.type == "cuda", f"Liger's kernels are Triton kernels for CUDA; this run is on {device.type}"),
               (available, "liger-kernel is not installed (pip install 'lorakit[liger]')"),
               (patch is not None, f"Liger has no kernels lorakit applies to {type(config).__name__} (lorakit applies "
                                   f"them to {', '.join(FAMILIES)})")]
    missing = [why for ok, why in reasons if not ok]
    if missing and requested == "liger":
        raise KernelsError(f"--kernels liger: {'; '.join(missing)}; --kernels auto uses them only where they run")
    if missing:
        return Kernels("none", missing[0])
    return Kernels("liger", f"{patch.removeprefix('apply_liger_kernel_to_')} family on CUDA, liger-kernel installed",
                   patch)


def apply(kernels: Kernels, model: torch.nn.Module) -> None:
    """Patch `model` in place with its family's Liger kernels (RMSNorm, RoPE, SwiGLU); the loss is not patched:
    lorakit computes it (chunked_loss, with liger_linear_cross_entropy). Nothing for Kernels("none")."""
    if not kernels.liger:
        return
    import liger_kernel.transformers as liger

    getattr(liger, kernels.patch)(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                  fused_linear_cross_entropy=False)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, dtype: torch.dtype | None, cap: float | None) -> torch.Tensor:
    """Mean cross-entropy of cap · tanh((hidden·weightᵀ + bias) / cap) (no tanh when cap is None) against `targets`
    (every row has one), by Liger's fused linear cross-entropy, the product in `dtype` (autocast's; None: the
    weight's)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    dtype = dtype or weight.dtype
    loss = LigerFusedLinearCrossEntropyLoss(softcap=cap)
    return loss(weight.to(dtype), hidden.to(dtype), targets, None if bias is None else bias.to(dtype))
