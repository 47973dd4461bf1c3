"""What differs between LoRA variants, one small unit each: how an adapter's factors start (`Init`) and how it acts
on the layer (`Variant`: its extra parameters, ΔW, its share of the output, merge and unmerge).

With W the layer's (d_out, d_in) matrix, s the adapter's scale and x the input:

    LoRA    y = x Wᵀ + s · x Aᵀ Bᵀ                         ΔW = s · B A
    LoRA with a bias on B (PEFT's lora_bias)
            y = x Wᵀ + s · (x Aᵀ Bᵀ + c)                   ΔW = s · B A, Δbias = s · c (c zero at init)
    DoRA    y = m / ‖W + s·BA‖ ⊙ (x Wᵀ + s · x Aᵀ Bᵀ)      ΔW = m / ‖W + s·BA‖ ⊙ (W + s·BA) − W
            (Liu et al., 2024; m a trainable magnitude per output row, the row norm a constant in backward)
    PiSSA   an Init: A0, B0 from W's top-r singular vectors (Meng et al., 2024), W replaced by its residual
            W − s · B0 A0, so the output is unchanged and training starts on the principal directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layers import LoraLayer


@dataclass
class Adapter:
    """One adapter's settings in one layer (its tensors live in the layer's lora_A / lora_B ParameterDicts)."""

    scale: float
    dropout: float  # on the LoRA branch's input, in training only
    variant: "Variant"
    pissa_start: tuple[torch.Tensor, torch.Tensor] | None = None  # PiSSA's (A0, B0): W holds W0 − s · B0 A0
    merge_state: torch.Tensor | None = None  # what merge keeps to undo itself exactly (DoRA: the row norms)


@dataclass(frozen=True)
class Variant:
    """How an adapter acts on its layer. Each hook takes (layer, adapter name, ...)."""

    name: str
    create: Callable[["LoraLayer", str], None]  # extra parameters, once A and B exist
    delta: Callable[["LoraLayer", str], torch.Tensor]  # ΔW, (d_out, d_in) float32: what merging adds to W
    output: Callable[["LoraLayer", str, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, base y) -> what it adds to y
    merge: Callable[["LoraLayer", str], float]  # W ← W + ΔW in place; returns the rounding error of W's dtype
    unmerge: Callable[["LoraLayer", str], None]
    trainable: Callable[["LoraLayer", str], list[nn.Parameter]]  # parameters beyond A and B
    merge_is_finite: Callable[["LoraLayer", str], bool]  # checked before anything merges
    fusable: bool = False  # forward may use the layer kind's fused path (fused.py)
    added_bias: Callable[["LoraLayer", str], torch.Tensor] | None = None  # what it adds to the bias (fused path)
    row_factor: Callable[["LoraLayer", str], torch.Tensor] | None = None  # mixed batches: F of rows.py, (d_out,)


def lowrank(layer: "LoraLayer", name: str) -> torch.Tensor:
    """s · B A as a (d_out, d_in) float32 matrix."""
    a, b = layer.lora_A[name].detach().flatten(1), layer.lora_B[name].detach().flatten(1)
    return (b.float() @ a.float()) * layer.adapters[name].scale


def dropped(layer: "LoraLayer", name: str, x: torch.Tensor) -> torch.Tensor:
    """The LoRA branch's input: x with the adapter's dropout in training."""
    p = layer.adapters[name].dropout if layer.training else 0.0
    return F.dropout(x, p, training=True) if p > 0 else x


def finite_after_merge(layer: "LoraLayer", name: str) -> bool:
    """Whether W + ΔW is finite everywhere, computed in full."""
    return bool(torch.isfinite(layer.base_matrix().float() + layer.delta(name)).all())


def _copy_into(matrix: torch.Tensor, exact: torch.Tensor) -> float:
    # Write the float32 result into W's view and report what W's dtype rounded away.
    matrix.copy_(exact)
    return 0.0 if matrix.dtype == torch.float32 else (matrix.float() - exact).abs().max().item()


# ---- plain LoRA ----

def _lora_output(layer, name, x, y):
    a, b = layer.lora_A[name], layer.lora_B[name]
    return layer.kind.update(layer, dropped(layer, name, x), a, b) * layer.adapters[name].scale


def _lora_merge(layer, name) -> float:
    if layer.base_matrix().dtype == torch.float32:  # in place with addmm_: no full-size temporary, no rounding
        layer.add_lowrank(layer.lora_A[name], layer.lora_B[name], layer.adapters[name].scale)
        return 0.0
    return _copy_into(layer.base_matrix(), layer.base_matrix().float() + lowrank(layer, name))


def _lora_merge_is_finite(layer, name) -> bool:
    # A cheap sufficient test first: |(B A)_ij| <= ‖B_i‖ · ‖A_:j‖, so max|W| + |s| · max‖B_i‖ · max‖A_:j‖ below the
    # dtype's largest value cannot overflow (NaN or inf in A or B makes the bound non-finite). Only where the bound
    # fails is the merged weight itself checked.
    if not layer.kind.quantized:
        a = layer.lora_A[name].detach().flatten(1).float()
        b = layer.lora_B[name].detach().flatten(1).float()
        low, high = layer.base_matrix().detach().aminmax()
        bound = torch.maximum(high, -low).float() + abs(layer.adapters[name].scale) * b.norm(dim=1).max() * a.norm(dim=0).max()
        value = bound.item()  # one sync for the whole test
        if math.isfinite(value) and value < torch.finfo(layer.base_matrix().dtype).max:
            return True
    return finite_after_merge(layer, name)


LORA = Variant(
    "lora", create=lambda layer, name: None, delta=lowrank, output=_lora_output, merge=_lora_merge,
    unmerge=lambda layer, name: layer.add_lowrank(layer.lora_A[name], layer.lora_B[name], -layer.adapters[name].scale),
    trainable=lambda layer, name: [], merge_is_finite=_lora_merge_is_finite, fusable=True)


# ---- LoRA with a bias on B (PEFT's lora_bias: its lora_B is a Linear with a bias, scaled with B A) ----

def _bias_create(layer, name):
    b = layer.lora_B[name]
    layer.lora_B_bias[name] = nn.Parameter(b.new_zeros(b.shape[0]))  # zero: the output is unchanged at init


def _bias_output(layer, name, x, y):
    a, b, c = layer.lora_A[name], layer.lora_B[name], layer.lora_B_bias[name]
    h = layer.kind.update(layer, dropped(layer, name, x), a, b)
    return (h + layer.kind.bias_shaped(c).to(h.dtype)) * layer.adapters[name].scale  # PEFT: lora_B(·) · scaling


def _bias_delta(layer, name) -> torch.Tensor:
    """s · c: what merging adapter `name` adds to the base layer's bias, float32 (d_out,)."""
    return _bias_added(layer, name).detach().float()


# A layer without a bias of its own takes only a zero c (merging.check_mergeable refuses any other): nothing to add.

def _bias_merge(layer, name) -> float:
    error = _lora_merge(layer, name)
    if layer.bias is None:
        return error
    return max(error, _copy_into(layer.bias.data, layer.bias.float() + _bias_delta(layer, name)))


def _bias_unmerge(layer, name):
    LORA.unmerge(layer, name)
    if layer.bias is not None:
        layer.bias.data.copy_(layer.bias.float() - _bias_delta(layer, name))


def _bias_merge_is_finite(layer, name) -> bool:
    if not _lora_merge_is_finite(layer, name):
        return False
    return layer.bias is None or bool(torch.isfinite(layer.bias.float() + _bias_delta(layer, name)).all())


def _bias_added(layer, name) -> torch.Tensor:
    # s · c with its gradient: the fused path adds it to the layer's bias (dropout never reaches c, as in PEFT).
    return layer.lora_B_bias[name] * layer.adapters[name].scale


LORA_BIAS = Variant("lora_bias", create=_bias_create, delta=lowrank, output=_bias_output, merge=_bias_merge,
                    unmerge=_bias_unmerge, trainable=lambda layer, name: [layer.lora_B_bias[name]],
                    merge_is_finite=_bias_merge_is_finite, fusable=True, added_bias=_bias_added)


# ---- DoRA ----

@torch.no_grad()
def row_norms(layer: "LoraLayer", name: str) -> torch.Tensor:
    """‖W + s · B A‖ per output row, float32 (d_out,)."""
    return (layer.base_matrix().float() + lowrank(layer, name)).norm(dim=1)


def _dora_create(layer, name):
    magnitude = row_norms(layer, name).to(layer.lora_A[name].dtype)  # m = ‖W‖ at init (B = 0): output unchanged
    layer.lora_magnitude_vector[name] = nn.Parameter(magnitude)


def _dora_delta(layer, name):
    w = layer.base_matrix().float()
    factor = layer.lora_magnitude_vector[name].detach().float() / row_norms(layer, name)
    return (w + lowrank(layer, name)) * factor.unsqueeze(1) - w


def _dora_output(layer, name, x, y):
    # As PEFT computes it: with f = m / ‖W + s·BA‖ (norm detached), the layer gives f ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias
    # = y + (f − 1) ⊙ x Wᵀ + f ⊙ s · x Aᵀ Bᵀ.
    a, b, scale = layer.lora_A[name], layer.lora_B[name], layer.adapters[name].scale
    weight = layer.base_matrix()
    xd = dropped(layer, name, x)
    if xd is not x:
        base = F.linear(xd, weight)
    else:
        base = y if layer.bias is None else y - layer.bias
    lora = F.linear(F.linear(xd, a.to(xd.dtype)), b.to(xd.dtype))
    norm = (weight + (b @ a).to(weight.dtype) * scale).norm(dim=1).detach()
    factor = (layer.lora_magnitude_vector[name] / norm).to(y.dtype)
    return (factor - 1) * base + factor * lora * scale


def _dora_merge(layer, name) -> float:
    norm = row_norms(layer, name)
    layer.adapters[name].merge_state = norm
    factor = layer.lora_magnitude_vector[name].detach().float() / norm
    matrix = layer.base_matrix()
    return _copy_into(matrix, (matrix.float() + lowrank(layer, name)) * factor.unsqueeze(1))


def _dora_unmerge(layer, name):
    factor = layer.lora_magnitude_vector[name].detach().float() / layer.adapters[name].merge_state
    layer.adapters[name].merge_state = None
    matrix = layer.base_matrix()
    matrix.copy_(matrix.float() / factor.unsqueeze(1))
    LORA.unmerge(layer, name)


def _dora_row_factor(layer, name) -> torch.Tensor:
    # m / ‖W + s·BA‖ per output row, in W's dtype as _dora_output computes it: a routed row's factor.
    a, b, scale = layer.lora_A[name], layer.lora_B[name], layer.adapters[name].scale
    weight = layer.base_matrix()
    norm = (weight + (b @ a).to(weight.dtype) * scale).norm(dim=1)
    return layer.lora_magnitude_vector[name] / norm


DORA = Variant("dora", create=_dora_create, delta=_dora_delta, output=_dora_output, merge=_dora_merge,
               unmerge=_dora_unmerge, trainable=lambda layer, name: [layer.lora_magnitude_vector[name]],
               merge_is_finite=finite_after_merge, row_factor=_dora_row_factor)


def variant_for(use_dora: bool, lora_bias: bool = False) -> Variant:
    """DORA, LORA_BIAS or LORA (LoraConfig refuses DoRA with lora_bias, as PEFT does)."""
    if use_dora and lora_bias:
        raise ValueError("lora_bias is not supported with DoRA")
    return DORA if use_dora else LORA_BIAS if lora_bias else LORA


# ---- how A and B start ----

@dataclass(frozen=True)
class Init:
    """Starting factors (A, B) for a layer; `residual`: W gives up s · B0 A0 so that the output is unchanged."""

    factors: Callable[["LoraLayer", tuple, tuple, float, dict], tuple[torch.Tensor, torch.Tensor]]
    residual: bool = False


def _drawn(shape, kw, fill) -> torch.Tensor:
    """A tensor filled by `fill` from the CPU's generator, then moved to kw's device: one seed gives one adapter on
    every device (CUDA draws from a generator of its own, so drawing there would not)."""
    t = torch.empty(shape, dtype=kw["dtype"])
    fill(t)
    return t.to(kw["device"])


def _kaiming_uniform(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's own init, as in loralib and PEFT


def _kaiming(layer, shape_a, shape_b, scale, kw):
    return _drawn(shape_a, kw, _kaiming_uniform), torch.zeros(shape_b, **kw)


def _gaussian(layer, shape_a, shape_b, scale, kw):
    return _drawn(shape_a, kw, lambda t: nn.init.normal_(t, std=1.0 / shape_a[0])), torch.zeros(shape_b, **kw)


def _random(layer, shape_a, shape_b, scale, kw):
    # For tests: B random too, so the adapter changes the output from the start.
    return _drawn(shape_a, kw, _kaiming_uniform), _drawn(shape_b, kw, _kaiming_uniform)


def _pissa(layer, shape_a, shape_b, scale, kw):
    # W ≈ U_r S_r V_rᵀ; with the scale folded out, B0 = U_r √(S_r/s), A0 = √(S_r/s) V_rᵀ, so s · B0 A0 is W's best
    # rank-r approximation.
    u, s, vh = torch.linalg.svd(layer.base_matrix().to(kw["dtype"]), full_matrices=False)
    r = shape_a[0]
    root = (s[:r] / scale).sqrt()
    return (root.unsqueeze(1) * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


INITS = {
    "kaiming": Init(_kaiming),
    "gaussian": Init(_gaussian),
    "zeros": Init(lambda layer, sa, sb, scale, kw: (torch.zeros(sa, **kw), torch.zeros(sb, **kw))),
    "random": Init(_random),
    "pissa": Init(_pissa, residual=True),
}
