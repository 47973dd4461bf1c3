"""The fused LoRA linear: one autograd function for y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ.

Hand-written because autograd's composition of the same ops saves a float copy of dropout(x) per layer and
computes the frozen weight's gradient; this one saves x once (shared by layers reading the same input), a bool
mask and the small (N, r) projection, and skips what W does not need.
"""

from __future__ import annotations

import torch

from .autocasting import autocast_dtype


def drop_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout's mask of dropped elements (bool, x's shape, True with probability p), and the rescale 1 / (1 − p).

    On CPU, bernoulli_ costs more than a matmul of the same size; 16 random bits per element from 64-bit draws are
    about 6× cheaper, with p rounded to a multiple of 1/65536 (the rescale uses the rounded p, so E[dropout(x)] = x).
    A drop mask (not a keep mask) so that applying it is one masked_fill, not a bool-to-float conversion and a multiply.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # CUDA's and compiled RNG are fast already
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(p), 1.0 / (1.0 - p)
    dropped = round(p * 65536)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    return (bits < dropped - 32768).view(x.shape), 65536 / (65536 - dropped)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ, with a lean backward.

    Saves x, a bool dropout mask and h = dropout(x) Aᵀ (N × r), instead of a float dropout copy per layer:
    layers reading the same x (query, key, value) share one saved x. The dropout rescale is applied to the small
    (N × r) side, the LoRA scale and the add are fused into `addmm`. W is frozen in normal use, so no weight
    gradient is computed unless W requires it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        mask, keep_scale = drop_mask(x2, dropout_p) if dropout_p > 0 else (None, 1.0)
        h = (x2 if mask is None else x2.masked_fill(mask, 0)) @ lora_a.t()  # (N, r)
        if mask is not None:
            h.mul_(keep_scale)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, d_out)
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, mask, h, weight, lora_a, lora_b)
        ctx.scale, ctx.keep_scale, ctx.has_bias = scale, keep_scale, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, mask, h, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        grad_x = grad_w = grad_b = grad_a = grad_lb = None
        if need_lb:
            grad_lb = (g.t() @ h).mul_(ctx.scale)
        gh = (g @ lora_b).mul_(ctx.scale * ctx.keep_scale)  # (N, r): gradient reaching dropout(x) Aᵀ, rescale folded in
        if need_a:
            grad_a = gh.t() @ (x2 if mask is None else x2.masked_fill(mask, 0))
        if need_x:
            lora_part = gh @ lora_a  # (N, d_in)
            if mask is not None:
                lora_part.masked_fill_(mask, 0)
            grad_x = lora_part.addmm_(g, weight).reshape(*grad.shape[:-1], x2.shape[-1])  # in place: no copy
        if need_w:
            grad_w = g.t() @ x2
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_a, grad_lb, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ through LoraLinearFunction. W is (d_out, d_in)."""
    # Run the fused function in one dtype: autocast's if it is on, else the input's. Casting the small A and B
    # (not x) keeps fp32 master copies of the adapter while bf16 activations stay bf16.
    device_type, dtype = x.device.type, autocast_dtype(x.device.type)
    if dtype is not None:
        with torch.autocast(device_type, enabled=False):
            return LoraLinearFunction.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                            lora_a.to(dtype), lora_b.to(dtype), scale, dropout_p)
    dtype = x.dtype
    return LoraLinearFunction.apply(x, weight, bias, lora_a.to(dtype), lora_b.to(dtype), scale, dropout_p)
