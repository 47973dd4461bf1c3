"""Mixed-adapter batches inside one layer: each row of a batch through its own adapter (adapters.routing stacks the
adapters and chooses the rows; see its docstring for the math). One forward per way a kind computes: x Wᵀ
(Linear, Conv1D, NF4), an id lookup (Embedding), a convolution (Conv2d); each Kind names its own (kinds.py), and a
Variant whose output is more than B·A adds a per-row factor (DoRA's, variants.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .layers import LoraLayer


@dataclass
class Stack:
    """One layer's adapters for one routed call; slot 0 is the base model (zeros). Shapes as the layer holds them,
    one more dimension in front: a (k+1, R, d_in) (Conv2d: (k+1, R, C_in, kh, kw); Embedding: (k+1, R, vocab))."""

    a: torch.Tensor | None
    b: torch.Tensor | None  # (k+1, d_out, R), each adapter's scale folded in
    factor: torch.Tensor | None  # DoRA's (k+1, d_out); None when no adapter here is DoRA
    bias: torch.Tensor | None  # B's biases (lora_bias), each adapter's scale folded in: (k+1, d_out); None when none
    rank: int  # R; 0 when no routed adapter is in this layer (the layer runs its base alone)


def groups(idx: torch.Tensor, x: torch.Tensor) -> int:
    """How many consecutive entries of x's leading dimension belong to each row (1 for an (N, ...) batch)."""
    n, rows = x.shape[0], idx.shape[0]
    if x.dim() == 0 or n % rows:
        raise ValueError(f"route(): a layer got input of shape {tuple(x.shape)}, whose leading dimension is not a "
                         f"multiple of the {rows} routed rows")
    return n // rows


def linear_rows(layer: "LoraLayer", s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Linear, Conv1D and NF4: x (N·m, ..., d_in) viewed as (N, M, d_in), one bmm pair for every row at once.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    groups(idx, x)
    rows = x.reshape(idx.shape[0], -1, x.shape[-1])
    a, b = s.a[idx].to(x.dtype), s.b[idx].to(x.dtype)  # (N, R, d_in), (N, d_out, R)
    lora = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))  # (N, M, d_out)
    if s.bias is not None:
        lora = lora + s.bias[idx].to(lora.dtype).unsqueeze(1)
    if s.factor is None:
        return y + lora.view(y.shape)
    base = y if layer.bias is None else y - layer.bias  # x Wᵀ
    f = s.factor[idx].to(y.dtype).unsqueeze(1)  # (N, 1, d_out); 1 in the rows of an adapter with a bias
    return y + ((f - 1) * base.reshape(lora.shape) + f * lora).view(y.shape)


def embedding_rows(layer: "LoraLayer", s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # ids (N·m, ...) viewed as (N, M): each row looks its ids up in its own A, then one bmm with its own B.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    groups(idx, x)
    ids = x.reshape(idx.shape[0], -1)
    h = s.a.transpose(1, 2)[idx.unsqueeze(1), ids]  # A's columns looked up by id: (N, M, R)
    return y + torch.bmm(h.to(y.dtype), s.b[idx].to(y.dtype).transpose(1, 2)).view(y.shape)


def conv2d_rows(layer: "LoraLayer", s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Images (L, C, H, W): a grouped convolution with one group per image applies each image's own A, then one bmm.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    c, n = layer.base_layer, x.shape[0]
    per = idx.repeat_interleave(groups(idx, x))  # (L,) slot of each image
    a = s.a[per].to(x.dtype).flatten(0, 1)  # (L·R, C, kh, kw)
    h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), a, None, c.stride, c.padding, c.dilation, groups=n)
    lora = torch.bmm(s.b[per].to(x.dtype), h.view(n, s.rank, -1))  # (L, d_out, H'·W')
    if s.bias is not None:
        lora = lora + s.bias[per].to(lora.dtype).unsqueeze(2)
    return y + lora.view(y.shape)
