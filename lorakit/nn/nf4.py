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

Speed (CPU): both directions work slice by slice (CHUNK elements) so that temporaries stay in cache; quantizing finds
each code by two lookups in tiny tables (see CELLS) rather than a binary search, dequantizing decodes a byte into
both its values by one gather. Exactness is kept: the same codes and the same float32 products as the plain formulas.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .autocasting import autocast_dtype

log = logging.getLogger(__name__)

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


CHUNK = 1 << 18  # elements per slice on the CPU: enough to amortise each op's overhead, small enough to stay in cache

# Nearest NF4 code without a search: cut [-1, 1] into 32 cells of width 1/16. Each cell holds at most one of the 15
# midpoints between NF4 values (the closest two are 0.08 apart) and none lies within 0.07 cell widths of a cell edge,
# so the cell of s needs no exact arithmetic; then code(s) = #midpoints below the cell + (s > the midpoint in it).
CELLS = 16  # cells per unit of s: cell(s) = floor((s + 1) · 16), 0..32 (s = 1 falls in cell 32)


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per device, built once: the byte → (high, low) NF4 values table as 256 int64 (two float32 bit patterns each:
    one gather decodes a byte, and an integer gather copies bits exactly), NF4_CODE, the 8-bit map, and the cell
    tables (#midpoints below each cell as uint8, the midpoint in each cell or 2.0 where there is none)."""
    pairs = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # byte = hi · 16 + lo
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # bitsandbytes' rounding: nearest value, ties to the lower one
    edges = torch.arange(2 * CELLS + 1) / CELLS - 1  # lower edge of each cell
    below = (mids[None, :] < edges[:, None]).sum(1).to(torch.uint8)
    mid_in = torch.full((2 * CELLS + 1,), 2.0).index_put_((((mids + 1) * CELLS).floor().long(),), mids)
    return tuple(t.to(device) for t in (pairs.view(torch.int64).view(-1), NF4_CODE, DYNAMIC_CODE, below, mid_in))


def _nearest(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the code value nearest to each element of x (rows, cols) divided by its row's absmax."""
    scaled = (x * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # clamp: an all-zero row has absmax 0
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # midpoints: bitsandbytes' rounding


def _encode(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """NF4-encode blocks x (rows, block) of any float dtype into out (uint8, rows · block / 2), two codes a byte,
    the first in the high nibble; returns the blocks' absmax (rows,) in float32. The codes are those of
    `_nearest(x, absmax, NF4_CODE)`, found by two table lookups instead of a binary search."""
    *_, below, mid_in = _tables(x.device)
    x = x.float()  # a copy of this slice only, for 16-bit weights
    absmax = x.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("NF4 cannot quantize a weight holding inf or NaN")
    s = (x * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)  # in [-1, 1] up to rounding, as bitsandbytes scales
    cell = s.mul(CELLS).add_(CELLS).to(torch.int32)  # truncation: floor, as s + 1 >= 0 up to a rounding error
    codes = below.index_select(0, cell).add_(torch.gt(s, mid_in.index_select(0, cell)).view(torch.uint8))
    pairs = codes.view(torch.int16)  # element 2j in the low byte (little-endian), 2j + 1 in the high byte
    out.copy_(((pairs & 15) << 4) | (pairs >> 8))  # a byte: code[2j] << 4 | code[2j + 1]
    return absmax


class NF4Weight(nn.Module):
    """A quantized weight of `shape` (out, in) and original `dtype`, as buffers (so `.to(device)`, `state_dict()`):

        packed   uint8 (n_padded / 2,)    two NF4 codes per byte, first element in the high nibble
        qscale   uint8 (n_groups · 256,)  dynamic-map index of absmax − offset, one per block of `block_size`
        absmax2  (n_groups,), offset ()   float32 values kept as their int32 bits, so that `.half()` or
                                          `.to(torch.bfloat16)` on a parent module cannot round them

    `NF4Weight(shape, dtype)` allocates zeroed buffers to `load_state_dict` into; `quantize_nf4` fills them.
    `keep_for_backward`: nf4_linear keeps the dequantized weight for its backward instead of dequantizing it again.
    Only for layers inside checkpointed blocks (set as each forward of the block starts, from the block's live state,
    by the hook enable_gradient_checkpointing adds): the checkpoint drops what the first forward saves and the
    recompute holds one block's weights at a time; elsewhere it would hold every one.
    """

    def __init__(self, shape, dtype: torch.dtype = torch.float32, block_size: int = 64, device=None):
        super().__init__()
        self.shape, self.dtype, self.block_size = torch.Size(shape), dtype, block_size
        self.pad = -self.shape.numel() % block_size  # zeros appended to fill the last block
        self.keep_for_backward = False
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
    flat, absmax = weight.reshape(-1), torch.empty(q.n_blocks, device=weight.device)
    whole = flat.numel() - flat.numel() % block_size  # elements in whole blocks; the rest is zero-padded below
    step = max(CHUNK // block_size, 1) * block_size if weight.is_cpu else max(whole, 1)
    for start in range(0, whole, step):  # on the CPU slice by slice: every temporary stays small and in cache
        end = min(start + step, whole)
        absmax[start // block_size:end // block_size] = _encode(flat[start:end].view(-1, block_size),
                                                                q.packed[start // 2:end // 2])
    if q.pad:  # zero padding leaves the last block's absmax as it is
        absmax[-1:] = _encode(F.pad(flat[whole:].float(), (0, q.pad)).view(1, -1), q.packed[whole // 2:])

    # The scales are positive and alike: centred, their 8-bit codes spend no range on the common part.
    # The mean is taken on the CPU: a float32 sum rounds by its order, which differs between devices, and one bit of
    # the offset changes every scale; this way a weight quantizes to the same bytes wherever it is.
    offset = absmax.cpu().mean().to(absmax.device)
    groups = F.pad(absmax - offset, (0, q.qscale.numel() - q.n_blocks)).view(-1, GROUP)
    absmax2 = groups.abs().amax(dim=1)
    q.qscale.copy_(_nearest(groups, absmax2, DYNAMIC_CODE.to(weight.device)).view(-1))
    q.absmax2.copy_(absmax2.view(torch.int32))
    q.offset.copy_(offset.view(torch.int32))
    return q


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The (n_blocks,) float32 scales DYNAMIC_CODE[qscale[k]] · absmax2[k // 256] + offset, rounded after the product
    and again after the sum, as bitsandbytes computes them (so never fused into one multiply-add)."""
    dynamic = _tables(q.packed.device)[2]
    scales = dynamic[q.qscale.long()].view(-1, GROUP) * q.absmax2.view(torch.float32)[:, None]
    return scales.view(-1)[:q.n_blocks] + q.offset.view(torch.float32)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight W[i] = NF4_CODE[code[i]] · scale[i // block_size] in `dtype` (default: the original
    dtype): the float32 product, rounded once to dtype. By the fastest path that reproduces `_dequantize_torch` bit
    for bit on q's device (`_fast_dequantizer`: on CUDA bitsandbytes' kernel, else a torch.compile'd decode; on the
    CPU, for weights of COMPILED_MIN elements or more, the C kernel of nf4_cpu, else the compiled decode); else by
    `_dequantize_torch`."""
    dtype = dtype or q.dtype
    if q.packed.is_cuda or q.shape.numel() >= COMPILED_MIN:
        return _fast_dequantizer(q.packed.device)(q, dtype)
    return _dequantize_torch(q, dtype)


def _dequantize_torch(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Pure PyTorch, slice by slice on the CPU (one slice elsewhere): one int64 gather decodes a byte into its two
    float32 values, then one multiply by the block scale writes the slice of the output in dtype."""
    pairs, scales, size = _tables(q.packed.device)[0], block_scales(q), q.block_size
    out = torch.empty(q.n_blocks * size, dtype=dtype, device=q.packed.device)
    step = max(CHUNK // size, 1) * size if out.is_cpu else out.numel()
    for start in range(0, out.numel(), step):
        end = min(start + step, out.numel())
        w = pairs.index_select(0, q.packed[start // 2:end // 2].int()).view(torch.float32).view(-1, size)
        # Computed in float32 and rounded once into out's dtype, like (w * s).to(dtype), without the float32 copy.
        torch.mul(w, scales[start // size:end // size, None], out=out[start:end].view(-1, size))
    return out[:q.shape.numel()].view(q.shape)


# ---- Fused paths (CUDA: issue 14; CPU: issue 25). Each must equal _dequantize_torch bit for bit, which
# _fast_dequantizer checks. On the CPU the C kernel (nf4_cpu.py: a vector table lookup into reused memory) is 8-10x
# the compiled decode at 7B's shapes, and the compiled decode (one loop over the bytes, where the eager path makes an
# int64 and a float32 temporary per slice) 1.3-7x the eager one (BENCHMARKS §17). Small weights stay eager, so that a
# tiny model never waits for a compiler.
COMPILED_MIN = 1 << 20  # elements
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept


def to_bitsandbytes(q: NF4Weight, dtype: torch.dtype | None = None):
    """q as the (packed, QuantState) pair of bitsandbytes' `quantize_4bit(W, blocksize, quant_type="nf4",
    compress_statistics=True)`, sharing q's memory: packed = the first ceil(n / 2) bytes as (ceil(n / 2), 1);
    absmax = qscale[:n_blocks] (uint8 indices into the nested code DYNAMIC_CODE); state2 = absmax2 as float32 in
    groups of 256; offset = the float32 offset. `dtype` is what bitsandbytes dequantizes to (default q.dtype)."""
    from bitsandbytes.functional import QuantState

    tables = _tables(q.packed.device)
    nested = QuantState(absmax=q.absmax2.view(torch.float32), code=tables[2], blocksize=GROUP, dtype=torch.float32)
    state = QuantState(absmax=q.qscale[:q.n_blocks], shape=q.shape, code=tables[1], blocksize=q.block_size,
                       quant_type="nf4", dtype=dtype or q.dtype, offset=q.offset.view(torch.float32), state2=nested)
    return q.packed[:(q.shape.numel() + 1) // 2].view(-1, 1), state


def _dequantize_bnb(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit kernel on q's bytes (no copy); the pure-torch path where it cannot."""
    if q.block_size not in BNB_BLOCK_SIZES or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return _dequantize_torch(q, dtype)
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(*to_bitsandbytes(q, dtype)).reshape(q.shape)  # reshape: bnb transposes 1-row input


def _decode(packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n_blocks · B,) values code[nibble] · scales[block] in dtype, nibbles high first: the whole-tensor form of
    _dequantize_torch's loop, which torch.compile turns into one kernel (no multiply-add to contract)."""
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).view(scales.shape[0], -1).long()  # (n_blocks, B)
    return (code[nibbles] * scales[:, None]).to(dtype).view(-1)


@functools.cache
def _compiled_decode():
    return torch.compile(_decode, dynamic=True)


def _dequantize_c(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    from .nf4_cpu import decode  # compiles the kernel on first use

    out = decode(q.packed, block_scales(q), _tables(q.packed.device)[1], q.block_size, dtype)
    return out[:q.shape.numel()].view(q.shape)


def _dequantize_compiled(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    out = _compiled_decode()(q.packed, block_scales(q), _tables(q.packed.device)[1], dtype)
    return out[:q.shape.numel()].view(q.shape)


@functools.cache
def _fast_dequantizer(device: torch.device):
    """The first fused path that runs on `device` and equals the pure-torch path bit for bit on a probe weight (odd
    size: a padded last block; three output dtypes): on CUDA bitsandbytes' kernel, on the CPU the C kernel, then the
    torch.compile'd decode. Else the pure-torch path. Decided once per device."""
    probe = quantize_nf4(torch.randn(67, 129, generator=torch.Generator().manual_seed(0)).to(device))
    paths = (("bitsandbytes", _dequantize_bnb),) if device.type == "cuda" else (("C kernel", _dequantize_c),)
    for name, fn in (*paths, ("torch.compile", _dequantize_compiled)):
        try:
            same = all(torch.equal(fn(probe, dt), _dequantize_torch(probe, dt))
                       for dt in (torch.float32, torch.bfloat16, torch.float16))
        except Exception as e:  # not installed, no kernels for this GPU, no compiler: try the next
            log.info("NF4 dequantize on %s: %s unavailable (%s: %s)", device, name, type(e).__name__, e)
            continue
        if same:
            log.info("NF4 dequantize on %s: %s", device, name)
            return fn
        log.warning("NF4 dequantize on %s: %s differs from the pure-torch path; not used", device, name)
    return _dequantize_torch


class _NF4Linear(torch.autograd.Function):
    """y = x Wᵀ + b, W = dequantize_nf4(q). Saves q, and W itself only when q.keep_for_backward: otherwise W is
    rebuilt in backward rather than kept alive."""

    @staticmethod
    def forward(ctx, x, q, bias):
        weight = dequantize_nf4(q, x.dtype)
        ctx.q, ctx.has_bias, ctx.kept = q, bias is not None, q.keep_for_backward and ctx.needs_input_grad[0]
        if ctx.kept:
            ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.saved_tensors[0] if ctx.kept else dequantize_nf4(ctx.q, grad.dtype)
            grad_x = grad @ weight  # (..., in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias  # the quantized weight is frozen: no gradient for it


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequantize_nf4(q).T + bias (out,) → (..., out), computed in x's dtype (autocast's under
    autocast, like F.linear). Gradients reach x and bias, never q; the full weight exists only transiently."""
    device_type, dtype = x.device.type, autocast_dtype(x.device.type)
    if dtype is not None:  # a custom Function is not autocast: cast here, as F.linear would
        with torch.autocast(device_type, enabled=False):
            return _NF4Linear.apply(x.to(dtype), q, None if bias is None else bias.to(dtype))
    return _NF4Linear.apply(x, q, None if bias is None else bias.to(x.dtype))


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored in NF4: y = x · dequantize_nf4(weight_nf4)ᵀ + bias, x (..., in_features)
    → (..., out_features), in x's dtype (autocast's under autocast). For every frozen Linear of a QLoRA base model,
    not only the adapted ones. The weight is buffers only; bias, if any, is a frozen Parameter in its own dtype.
    State dict: weight_nf4.{packed, qscale, absmax2, offset} and bias. `transposed` records a GPT-2 Conv1D source
    (which stores W as (in, out)), so that `to_dense` gives that layer back.

        NF4Linear(quantize_nf4(w), b)    from tensors (say, read from a checkpoint shard), no nn.Linear built
        NF4Linear.from_linear(module)    from an nn.Linear or transformers' Conv1D
        layer.to_dense(dtype)            back to the layer it came from, holding the dequantized weight
    """

    def __init__(self, weight_nf4: NF4Weight, bias: torch.Tensor | None = None, transposed: bool = False):
        super().__init__()
        if not isinstance(weight_nf4, NF4Weight) or len(weight_nf4.shape) != 2:
            raise TypeError(f"NF4Linear needs a 2-D NF4Weight, got {weight_nf4!r}")
        self.out_features, self.in_features = weight_nf4.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {self.out_features} output features")
        self.weight_nf4 = weight_nf4
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.transposed = transposed

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, transposed: bool = False,
                     block_size: int = 64) -> NF4Linear:
        """Quantize `weight` as its source layer stores it: (out, in) for nn.Linear, (in, out) for a GPT-2 Conv1D
        (`transposed`). The one place that decides the orientation: the codes always hold (out, in)."""
        return cls(quantize_nf4((weight.t() if transposed else weight).detach(), block_size), bias, transposed)

    @classmethod
    def from_linear(cls, module: nn.Module, block_size: int = 64) -> NF4Linear:
        """Quantize an nn.Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
        from transformers.pytorch_utils import Conv1D

        if not isinstance(module, (nn.Linear, Conv1D)):
            raise TypeError(f"NF4Linear.from_linear takes nn.Linear or Conv1D, got {type(module).__name__}")
        return cls.from_tensors(module.weight, module.bias, isinstance(module, Conv1D), block_size)

    @property
    def source_shape(self) -> torch.Size:
        """The weight's shape as the source layer stores it."""
        shape = self.weight_nf4.shape
        return torch.Size(reversed(shape)) if self.transposed else shape

    def source_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight as the source layer stores it, in `dtype` (default: its original dtype)."""
        weight = dequantize_nf4(self.weight_nf4, dtype)
        return weight.t().contiguous() if self.transposed else weight

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The layer this was quantized from (nn.Linear, or Conv1D when transposed) holding the dequantized weight in
        `dtype` (default: the weight's original dtype) and the bias (in dtype too when given), frozen as here."""
        with torch.device("meta"):  # the skeleton only: its tensors are replaced below
            if self.transposed:
                from transformers.pytorch_utils import Conv1D

                dense = Conv1D(self.out_features, self.in_features)
            else:
                dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(self.source_weight(dtype), requires_grad=False)
        dense.bias = None if self.bias is None else nn.Parameter(self.bias.detach().to(dtype or self.bias.dtype,
                                                                                      copy=True),
                                                                 requires_grad=self.bias.requires_grad)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{', transposed' if self.transposed else ''}")
