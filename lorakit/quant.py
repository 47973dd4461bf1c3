"""NF4 (4-bit NormalFloat) quantization of frozen weights, as in QLoRA (Dettmers et al., 2023), in plain PyTorch.

Layout of a quantized (out, in) weight W with n = out · in elements and block size B (64 by default):

    flatten W row-major and zero-pad it to a multiple of B (`pad` elements, which dequantization drops);
    absmax[k] = max |W| over block k;  code[i] = index of the NF4 value nearest to W[i] / absmax[i // B]
    packed: uint8 (n_padded / 2,), byte j = code[2j] << 4 | code[2j + 1]  (first element in the high nibble,
            as bitsandbytes packs it)

Double quantization of the block scales (bitsandbytes' `compress_statistics=True`): offset = mean(absmax); then
absmax − offset, zero-padded to groups of 256, is stored as 8-bit indices into bitsandbytes' signed dynamic map
(`DYNAMIC_CODE`) times one float32 absmax per group (`absmax2`). The scale error is at most half the widest gap
of that map (0.0070, also the distance from -1 to its lowest value) times absmax2: under 1% of the largest
deviation from the mean in the group, far below NF4's own rounding error.

    W[i] ≈ NF4_CODE[code[i]] · (DYNAMIC_CODE[qscale[k]] · absmax2[k // 256] + offset),  k = i // B

Memory: 0.5 + 1/B + 4/(256 B) bytes per weight, 0.129 × fp32 for B = 64. Against bitsandbytes'
`quantize_4bit(quant_type="nf4", compress_statistics=True)`: the same 4-bit codes, offset and absmax2, and the same
dequantization formula; the 8-bit scale codes are exactly nearest here (as in its PyTorch backend), while its CPU
kernel's approximate search picks the farther neighbour for a fraction of a percent of them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (bitsandbytes' table).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
GROUP = 256  # block scales quantized together in the second level


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`): 0, 1 and ±10^(i−6) · m for i = 0..6, m the
    2^i midpoints of 2^i + 1 points evenly spaced in [0.1, 1]. 256 sorted float32 values in [-1, 1]."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        mids = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2)  # in float32, rounded exactly as bitsandbytes does
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_map()


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per device, built once: the (256, 2) table byte → values of its high and low nibble, and the 8-bit map."""
    pairs = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # byte = hi · 16 + lo
    return pairs.to(device), DYNAMIC_CODE.to(device)


def _nearest(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the code value nearest to each element of x (rows, cols) divided by its row's absmax."""
    scaled = (x * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # clamp: an all-zero row has absmax 0
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # midpoints: bitsandbytes' rounding


class NF4Weight(nn.Module):
    """A quantized weight of `shape` (out, in) and original `dtype`, as buffers (so `.to(device)`, `state_dict()`):

        packed   uint8 (n_padded / 2,)    two NF4 codes per byte, first element in the high nibble
        qscale   uint8 (n_groups · 256,)  dynamic-map index of absmax − offset, one per block of `block_size`
        absmax2  (n_groups,), offset ()   float32 values kept as their int32 bits, so that `.half()` or
                                          `.to(torch.bfloat16)` on a parent module cannot round them

    `NF4Weight(shape, dtype)` allocates zeroed buffers to `load_state_dict` into; `quantize_nf4` fills them.
    """

    def __init__(self, shape, dtype: torch.dtype = torch.float32, block_size: int = 64, device=None):
        super().__init__()
        self.shape, self.dtype, self.block_size = torch.Size(shape), dtype, block_size
        self.pad = -self.shape.numel() % block_size  # zeros appended to fill the last block
        self.n_blocks = (self.shape.numel() + self.pad) // block_size
        n_groups = math.ceil(self.n_blocks / GROUP)
        self.register_buffer("packed", torch.zeros(self.n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("qscale", torch.zeros(n_groups * GROUP, dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.zeros(n_groups, dtype=torch.int32, device=device))
        self.register_buffer("offset", torch.zeros((), dtype=torch.int32, device=device))

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized representation: codes and all scales (the shared code tables excluded); also
        once sharding.shard made them frozen Parameters, so that FSDP shards them."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, pad={self.pad}"


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> NF4Weight:
    """NF4 codes of a 2-D float weight (out, in), in blocks of `block_size` consecutive row-major elements, with
    double-quantized block scales (see the module docstring), on weight's device. A size that is not a multiple
    of `block_size` is zero-padded at the end; `q.pad` records how much, and dequantize_nf4 drops it."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes 2-D floating-point weights, got shape "
                         f"{tuple(getattr(weight, 'shape', ()))} and dtype {getattr(weight, 'dtype', type(weight))}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number (two codes per byte), got {block_size}")
    q = NF4Weight(weight.shape, weight.dtype, block_size, device=weight.device)
    blocks = F.pad(weight.reshape(-1).float(), (0, q.pad)).view(-1, block_size)  # zero padding leaves absmax as is
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    codes = _nearest(blocks, absmax, NF4_CODE.to(weight.device)).view(-1, 2)
    q.packed.copy_(codes[:, 0] << 4 | codes[:, 1])

    # The scales are positive and alike: centred, their 8-bit codes spend no range on the common part.
    offset = absmax.mean()
    groups = F.pad(absmax - offset, (0, q.qscale.numel() - q.n_blocks)).view(-1, GROUP)
    absmax2 = groups.abs().amax(dim=1)
    q.qscale.copy_(_nearest(groups, absmax2, DYNAMIC_CODE.to(weight.device)).view(-1))
    q.absmax2.copy_(absmax2.view(torch.int32))
    q.offset.copy_(offset.view(torch.int32))
    return q


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight W[i] = NF4_CODE[code[i]] · scale[i // block_size] in `dtype` (default: the original
    dtype), computed in float32 on q's device by two table lookups, with no loop over blocks."""
    pairs, dynamic = _tables(q.packed.device)
    scales = dynamic[q.qscale.long()].view(-1, GROUP) * q.absmax2.view(torch.float32)[:, None]
    scales = scales.view(-1)[:q.n_blocks] + q.offset.view(torch.float32)  # (n_blocks,)
    # One lookup decodes both nibbles of a byte; index_select with int32 indices is the fastest gather on CPU.
    w = pairs.index_select(0, q.packed.int()).view(-1, q.block_size).mul_(scales[:, None])
    return w.view(-1)[:q.shape.numel()].view(q.shape).to(dtype or q.dtype)


class _NF4Linear(torch.autograd.Function):
    """y = x Wᵀ + b, W = dequantize_nf4(q). Saves only q: W is rebuilt in backward rather than kept alive."""

    @staticmethod
    def forward(ctx, x, q, bias):
        ctx.q, ctx.has_bias = q, bias is not None
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ dequantize_nf4(ctx.q, grad.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias  # the quantized weight is frozen: no gradient for it


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequantize_nf4(q).T + bias (out,) → (..., out), computed in x's dtype (autocast's under
    autocast, like F.linear). Gradients reach x and bias, never q; the full weight exists only transiently."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # a custom Function is not autocast: cast here, as F.linear would
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _NF4Linear.apply(x.to(dtype), q, None if bias is None else bias.to(dtype))
    return _NF4Linear.apply(x, q, None if bias is None else bias.to(x.dtype))


class NF4Linear(nn.Module):
    """A frozen Linear whose (out, in) weight is held as NF4 codes: y = x · dequantize(weight_nf4)ᵀ + bias.

    `transposed` records a GPT-2 Conv1D source (W stored as (in, out)), so that `to_dense` gives that layer back.
    """

    def __init__(self, weight_nf4: NF4Weight, bias: torch.Tensor | None = None, transposed: bool = False):
        super().__init__()
        self.weight_nf4 = weight_nf4
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight_nf4.shape
        self.transposed = transposed

    @classmethod
    def from_linear(cls, module: nn.Module) -> "NF4Linear":
        """Quantize an nn.Linear, or a GPT-2 Conv1D (which stores W as (in, out))."""
        transposed = not isinstance(module, nn.Linear)
        weight = module.weight.detach()
        return cls(quantize_nf4(weight.t() if transposed else weight), module.bias, transposed)

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The layer this was quantized from (nn.Linear or Conv1D), holding the dequantized weight in `dtype`
        (default: the original dtype)."""
        weight = dequantize_nf4(self.weight_nf4, dtype)
        with torch.device("meta"):  # the skeleton only: its weights are replaced below
            if self.transposed:
                from transformers.pytorch_utils import Conv1D

                dense = Conv1D(self.out_features, self.in_features)
                weight = weight.t().contiguous()
            else:
                dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(weight, requires_grad=False)
        dense.bias = None if self.bias is None else nn.Parameter(self.bias.detach().to(weight.dtype),
                                                                 requires_grad=self.bias.requires_grad)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
