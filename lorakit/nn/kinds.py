"""Layer kinds: for each type of base layer LoRA adapts, how it stores W, how it runs, and how B·A attaches to it.

Every kind answers the same questions in one place:

    dims(base)          (d_in, d_out): the sizes A and B map between, from the layer's own hyperparameters
    factor_shapes       A: (r, d_in) and B: (d_out, r); Conv2d's A is (r, C_in, kh, kw), its B (d_out, r, 1, 1)
    matrix(layer)       W as a (d_out, d_in) matrix: a view of the stored weight (writing to it changes W),
                        or for NF4 a freshly dequantized copy
    base(layer, x)      the base layer's output, computed from the tensors the LoRA layer holds
    update(layer, x, a, b)   B·A applied to x, unscaled: (..., d_out) (Conv2d: (N, C_out, H', W'))
    held                the base layer's own tensor names, which the LoRA layer holds under the same names
    file_keys           PEFT's names of A and B inside adapter files
    biased              whether B may carry a bias (PEFT's lora_bias; B·A's output gets it per output channel)

The base layer's hyperparameters (stride, padding_idx, ...) are read from the base module itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused import lora_linear
from .nf4 import NF4Linear, dequantize_nf4, nf4_linear
from .rows import conv2d_rows, embedding_rows, linear_rows

try:  # GPT-2 style layers store W as (d_in, d_out); optional so that lorakit works without transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


@dataclass(frozen=True)
class Kind:
    """How one type of base layer holds W and runs (see the module docstring)."""

    name: str
    dims: Callable[[nn.Module], tuple[int, int]]
    matrix: Callable[[nn.Module], torch.Tensor]
    base: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    update: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    held: tuple[str, ...] = ("weight", "bias")
    file_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    linear: bool = False  # y = x Wᵀ + b: DoRA and PiSSA apply, and the fused path below
    fused: Callable | None = None  # (layer, x, a, b, scale, dropout_p, bias) -> y, one adapter in one autograd node
    quantized: bool = False  # W cannot be written in place: merging dequantizes first
    dropout: bool = True  # dropout on the LoRA branch's input (not on an Embedding's ids)
    transposed: bool = False  # W is stored (d_in, d_out), PEFT's fan_in_fan_out (GPT-2's Conv1D)
    shapes: Callable[[nn.Module, int], tuple[tuple[int, ...], tuple[int, ...]]] = None  # A's, B's at rank r
    check: Callable[[nn.Module], None] = lambda base: None  # TypeError for a base of this type LoRA cannot adapt
    rows: Callable = linear_rows  # (layer, Stack, idx, x) -> y: each row through its own adapter (rows.py)
    check_routable: Callable[[nn.Module], None] = lambda base: None  # ValueError where rows cannot route it
    biased: bool = True  # lora_B may carry a bias (PEFT's lora_bias): not on an Embedding, whose B is a bare tensor
    spatial: int = 0  # dimensions after the output channel in update's output (Conv2d: H', W'), for B's bias

    def bias_shaped(self, bias: torch.Tensor) -> torch.Tensor:
        """A (d_out,) bias shaped to broadcast over update's output (Conv2d: (d_out, 1, 1))."""
        return bias.view(-1, *([1] * self.spatial))

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B at rank r for `base`."""
        if self.shapes is not None:
            return self.shapes(base, r)
        d_in, d_out = self.dims(base)
        return (r, d_in), (d_out, r)


def _linear_update(layer, x, a, b):
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


def _fused(layer, x, a, b, scale, p, bias):
    return lora_linear(x, layer.kind.matrix(layer), bias, a, b, scale, p)


def _embedding_base(layer, x):
    e = layer.base_layer
    return F.embedding(x, layer.weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)


def _embedding_update(layer, x, a, b):
    # A is (r, num_embeddings): its columns are looked up like embedding rows, then B maps r -> embedding_dim.
    e = layer.base_layer
    h = F.embedding(x, a.t(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
    return h @ b.t().to(h.dtype)


def _check_conv2d(base):
    if base.groups != 1 or base.padding_mode != "zeros":
        raise TypeError(f"LoRA supports Conv2d with groups=1 and padding_mode='zeros', got groups={base.groups}, "
                        f"padding_mode={base.padding_mode!r}")


def _check_routable_embedding(base):
    if base.max_norm is not None:
        raise ValueError("route(): Embedding layers with max_norm are not supported")


def _conv2d_base(layer, x):
    c = layer.base_layer
    return F.conv2d(x, layer.weight, layer.bias, c.stride, c.padding, c.dilation)


def _conv2d_update(layer, x, a, b):
    c = layer.base_layer
    h = F.conv2d(x, a.to(x.dtype), None, c.stride, c.padding, c.dilation)  # (N, r, H', W')
    return F.conv2d(h, b.to(h.dtype))


LINEAR = Kind("linear", dims=lambda m: (m.in_features, m.out_features), matrix=lambda layer: layer.weight,
              base=lambda layer, x: F.linear(x, layer.weight, layer.bias), update=_linear_update, linear=True,
              fused=_fused)
CONV1D = Kind("conv1d", dims=lambda m: (m.nx, m.nf), matrix=lambda layer: layer.weight.t(),
              base=lambda layer, x: F.linear(x, layer.weight.t(), layer.bias), update=_linear_update, linear=True,
              fused=_fused, transposed=True)
EMBEDDING = Kind("embedding", dims=lambda m: (m.num_embeddings, m.embedding_dim), matrix=lambda layer: layer.weight.t(),
                 base=_embedding_base, update=_embedding_update, held=("weight",),
                 file_keys=("lora_embedding_A", "lora_embedding_B"), dropout=False, rows=embedding_rows,
                 check_routable=_check_routable_embedding, biased=False)
CONV2D = Kind("conv2d", dims=lambda m: (m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels),
              matrix=lambda layer: layer.weight.view(layer.weight.shape[0], -1), base=_conv2d_base,
              update=_conv2d_update, check=_check_conv2d, rows=conv2d_rows, spatial=2,
              shapes=lambda base, r: ((r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)))
NF4 = Kind("nf4", dims=lambda m: (m.in_features, m.out_features), matrix=lambda layer: dequantize_nf4(layer.weight_nf4),
           base=lambda layer, x: nf4_linear(x, layer.weight_nf4, layer.bias), update=_linear_update,
           held=("weight_nf4", "bias"), linear=True, quantized=True)

# Looked up by isinstance, in this order (subclasses of nn.Linear are Linear layers).
KINDS: list[tuple[type, Kind]] = [(NF4Linear, NF4), (nn.Linear, LINEAR), (nn.Embedding, EMBEDDING), (nn.Conv2d, CONV2D)]
if Conv1D is not None:
    KINDS.append((Conv1D, CONV1D))
FILE_KEYS: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(kind.file_keys for _, kind in KINDS))  # PEFT's A/B names
BIAS_FILE_KEY = "lora_B.bias"  # PEFT's name of B's bias (lora_bias=True), for every kind that is `biased`


def kind_of(module: nn.Module) -> Kind | None:
    """The Kind of a plain layer LoRA can adapt, else None."""
    return next((kind for cls, kind in KINDS if isinstance(module, cls)), None)


def check_supported(base: nn.Module) -> Kind:
    """The Kind of `base`; TypeError for a layer LoRA cannot adapt."""
    kind = kind_of(base)
    if kind is None:
        raise TypeError(f"LoRA cannot adapt a {type(base).__name__}")
    kind.check(base)
    return kind
