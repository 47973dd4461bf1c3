"""LoRA layers: a frozen base layer plus trainable low-rank updates ΔW = scale · B @ A.

One `LoraLayer` wraps any supported base layer (nn.Linear, transformers' GPT-2 Conv1D, nn.Embedding,
nn.Conv2d). It owns the base `weight` and `bias` parameters under their original names, so the base
model's state-dict keys stay where they were, and holds any number of named adapters:

    lora_A[name]: (r, d_in)     lora_B[name]: (d_out, r)        (Conv2d: (r, C_in, kh, kw) and (C_out, r, 1, 1))

Forward: y = base(x) + Σ_{active, unmerged} scale · B @ A @ dropout(x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quant import dequantize_nf4, nf4_linear, quantize_nf4

try:  # GPT-2 style layers store W as (d_in, d_out); optional so that lorakit works without transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding' or 'conv2d' for a layer LoRA can adapt, else None."""
    if isinstance(module, LoraLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer: the sizes A and B map between."""
    if isinstance(module, LoraLayer) and module.weight_nf4 is not None:
        d_out, d_in = module.weight_nf4.shape
        return d_in, d_out
    kind, w = layer_kind(module), module.weight
    if kind == "conv1d":
        return w.shape[0], w.shape[1]
    if kind == "embedding":
        return w.shape[0], w.shape[1]  # A indexes rows (num_embeddings), B produces embedding_dim
    if kind == "conv2d":
        return w[0].numel(), w.shape[0]  # A sees a flattened C_in × kh × kw patch
    return w.shape[1], w.shape[0]  # linear: (d_out, d_in)


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


class LoraLayer(nn.Module):
    """A base layer with named LoRA adapters. See the module docstring for shapes and math.

    Variants, per adapter: DoRA (`lora_magnitude_vector[name]`, a trainable norm per output) rescales each output
    row of W + scale · B @ A to that magnitude; PiSSA starts A and B at W's top-r singular factors A0, B0 and keeps
    the residual W − scale · B0 @ A0 as the frozen weight (A0, B0 are kept to undo that).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(f"LoRA cannot adapt a {type(base).__name__}")
        if kind == "conv2d" and (base.groups != 1 or base.padding_mode != "zeros"):
            raise TypeError(f"LoRA supports Conv2d with groups=1 and padding_mode='zeros', got groups={base.groups}, "
                            f"padding_mode={base.padding_mode!r}")
        # Kept outside the module tree: unload() puts it back, and its parameters are the ones registered below.
        object.__setattr__(self, "base_layer", base)
        self.kind = kind
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.weight_nf4 = None  # QLoRA: the frozen weight as 4-bit NormalFloat codes (weight is None then)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.pissa_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA adapters: (A0, B0)
        self.dora_norm: dict[str, torch.Tensor] = {}  # DoRA adapters merged: the row norms used, to unmerge
        self.active: tuple[str, ...] = ()  # adapters applied in forward
        self.merged: list[str] = []  # adapters folded into weight
        self.disabled = False
        self._run: tuple[str, ...] = ()  # active, unmerged and not disabled: what forward adds

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        weight = f"nf4{tuple(self.weight_nf4.shape)}" if self.weight_nf4 is not None else tuple(self.weight.shape)
        return f"kind={self.kind}, weight={weight}, ranks={ranks}, active={self.active}, merged={self.merged}"

    # ---- adapters ----

    @torch.no_grad()
    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str, use_dora: bool = False) -> None:
        """Create lora_A[name] and lora_B[name] so that the output is unchanged (unless init='random'); fp32
        unless the base is fp64. init='pissa' also replaces W by its residual (see the class docstring)."""
        if (use_dora or init == "pissa") and self.kind not in ("linear", "conv1d"):
            raise ValueError(f"{'DoRA' if use_dora else 'PiSSA'} supports Linear and Conv1D layers, not {self.kind}")
        d_in, d_out = layer_dims(self)
        reference = self.bias if self.weight is None and self.bias is not None else self.dense_weight()
        dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        kw = dict(device=reference.device, dtype=dtype)
        if self.kind == "conv2d":
            a = torch.empty(r, *self.weight.shape[1:], **kw)
            b = torch.zeros(d_out, r, 1, 1, **kw)
        else:
            a, b = torch.empty(r, d_in, **kw), torch.zeros(d_out, r, **kw)
        if init in ("kaiming", "random"):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init, as in loralib and PEFT
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        elif init == "pissa":
            a, b = _pissa_factors(self.dense_weight().to(dtype), r, scale)
        else:
            nn.init.zeros_(a)
        if init == "random":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = scale
        self.dropout[name] = 0.0 if self.kind == "embedding" else float(dropout)  # no dropout on token ids
        if init == "pissa":
            self.pissa_init[name] = (a.clone(), b.clone())
            self._shift_weight(a, b, scale, -1.0)  # the frozen weight becomes the residual
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._row_norms(name).to(dtype))
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`, unmerging it first and, for PiSSA, restoring the original weight."""
        if name in self.merged:
            self.unmerge(name)
        if name in self.pissa_init:
            self._shift_weight(*self.pissa_init.pop(name), self.scaling[name], +1.0)
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active = tuple(a for a in self.active if a != name)
        self._refresh()

    def set_active(self, names: tuple[str, ...]) -> None:
        """Apply only adapters `names` (those this layer has) in forward."""
        self.active = tuple(n for n in names if n in self.lora_A)
        self._refresh()

    def _refresh(self) -> None:
        self._run = () if self.disabled else tuple(n for n in self.active if n not in self.merged)

    def restore_pissa_base(self, sign: float) -> None:
        """Add (+1) or take out again (-1) the PiSSA starting factors, so that W is the original base weight."""
        for name, (a0, b0) in self.pissa_init.items():
            self._shift_weight(a0, b0, self.scaling[name], sign)

    # ---- weights ----

    def dense_weight(self) -> torch.Tensor:
        """The base weight as (d_out, d_in) (a view for Conv1D and Embedding; dequantized for NF4)."""
        if self.weight_nf4 is not None:
            return dequantize_nf4(self.weight_nf4)
        return self.weight.t() if self.kind in ("conv1d", "embedding") else self.weight

    @torch.no_grad()
    def quantize_base(self) -> None:
        """QLoRA: replace the frozen weight by NF4 codes (about 0.13× its fp32 size); forward dequantizes on the fly."""
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"NF4 quantization supports Linear and Conv1D layers, not {self.kind}")
        if self.merged or self.pissa_init:
            raise ValueError("cannot quantize a layer with merged or PiSSA adapters: its weight is not the base weight")
        if self.weight_nf4 is None:
            self.weight_nf4 = quantize_nf4(self.dense_weight().detach())
            self.weight = None
            self.base_layer.weight = None  # drop the full-precision copy for real

    @torch.no_grad()
    def dequantize_base(self) -> None:
        """Back to a full-precision frozen weight holding the dequantized NF4 values (merging needs one)."""
        if self.weight_nf4 is not None:
            w = dequantize_nf4(self.weight_nf4)
            self.weight = nn.Parameter(w.t().contiguous() if self.kind == "conv1d" else w, requires_grad=False)
            self.base_layer.weight = self.weight
            self.weight_nf4 = None

    def _lowrank(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        # scale · B @ A, shaped like `weight`
        if self.kind == "conv2d":
            return (b.flatten(1) @ a.flatten(1)).reshape(self.weight.shape) * scale
        delta = (b @ a) * scale  # (d_out, d_in)
        return delta.t() if self.kind in ("conv1d", "embedding") else delta

    @torch.no_grad()
    def _shift_weight(self, a: torch.Tensor, b: torch.Tensor, scale: float, sign: float) -> None:
        w = self.weight
        a, b = a.to(w.device), b.to(w.device)
        if a.dtype == b.dtype == w.dtype and self.kind != "conv2d":  # in place, no full-size temporary
            if self.kind == "linear":
                w.addmm_(b, a, alpha=scale * sign)
            else:  # Conv1D and Embedding store W transposed
                w.addmm_(a.t(), b.t(), alpha=scale * sign)
        else:
            w.add_(self._lowrank(a, b, scale * sign).to(w.dtype))

    @torch.no_grad()
    def merge_stays_finite(self, name: str) -> bool:
        """Whether merging adapter `name` leaves W finite. For plain LoRA a cheap sufficient test first:
        |(B @ A)_ij| <= ||B_i|| · ||A_:j||, so max|W| + |scale| · max||B_i|| · max||A_:j|| below the dtype's
        largest value cannot overflow (a NaN or inf in A or B makes the bound non-finite); otherwise (or for DoRA
        and NF4) the merged weight itself is checked."""
        if name not in self.lora_magnitude_vector and self.weight_nf4 is None:
            a, b = self.lora_A[name].detach().flatten(1).float(), self.lora_B[name].detach().flatten(1).float()
            low, high = self.weight.detach().aminmax()
            bound = torch.maximum(high, -low).float() + abs(self.scaling[name]) * b.norm(dim=1).max() * a.norm(dim=0).max()
            value = bound.item()  # one sync for the whole test
            if math.isfinite(value) and value < torch.finfo(self.weight.dtype).max:
                return True
        return bool(torch.isfinite(self.merged_weight(name)).all())

    def _row_norms(self, name: str) -> torch.Tensor:
        # DoRA's ||W + scale · B @ A|| per output row (linear kinds only), without gradient: the paper treats
        # the norm as a constant in backward.
        with torch.no_grad():
            lowrank = (self.lora_B[name] @ self.lora_A[name]).float() * self.scaling[name]
            return (self.dense_weight().float() + lowrank).norm(dim=1)

    def _stored_weight(self) -> torch.Tensor:
        # W in its stored layout ((d_in, d_out) for Conv1D), dequantized for NF4
        if self.weight_nf4 is None:
            return self.weight
        return self.dense_weight().t() if self.kind == "conv1d" else self.dense_weight()

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """What merging adds to the stored weight: scale · B @ A, or for DoRA the rescaled weight minus W.
        In W's dtype unless `dtype` is given."""
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        dtype = dtype or self._stored_weight().dtype
        if name not in self.lora_magnitude_vector:
            return self._lowrank(a, b, self.scaling[name]).to(dtype)
        dense = self.dense_weight().float()
        factor = (self.lora_magnitude_vector[name].detach().float() / self._row_norms(name)).unsqueeze(1)  # (d_out, 1)
        delta = (dense + (b @ a).float() * self.scaling[name]) * factor - dense
        return (delta.t() if self.kind == "conv1d" else delta).to(dtype)

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """The stored weight after merging adapter `name`, as a new fp32 tensor."""
        return self._stored_weight().float() + self.delta_weight(name, torch.float32)

    @torch.no_grad()
    def merge(self, name: str) -> float:
        """W ← W + scale · B @ A (DoRA: W ← m / ||W + scale · B @ A|| · (W + scale · B @ A)); idempotent.
        An NF4 weight is dequantized first. Returns the largest |merged W − (W + ΔW in fp32)|: the rounding cost
        of holding the merge in W's dtype."""
        if name in self.merged:
            return 0.0
        self.dequantize_base()
        if name in self.lora_magnitude_vector:
            self.dora_norm[name] = self._row_norms(name)
        elif self.weight.dtype == torch.float32:  # the merge is computed in fp32 anyway: add in place, no rounding to report
            self._shift_weight(self.lora_A[name], self.lora_B[name], self.scaling[name], 1.0)
            self.merged.append(name)
            self._refresh()
            return 0.0
        exact = self.merged_weight(name)
        self.weight.copy_(exact)
        self.merged.append(name)
        self._refresh()
        return (self.weight.float() - exact).abs().max().item()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Undo merge(name)."""
        if name not in self.merged:
            return
        if name in self.lora_magnitude_vector:
            factor = (self.lora_magnitude_vector[name] / self.dora_norm.pop(name)).unsqueeze(1)
            dense = self.dense_weight()
            dense.copy_((dense.float() / factor).to(dense.dtype))
        self._shift_weight(self.lora_A[name], self.lora_B[name], self.scaling[name], -1.0)
        self.merged.remove(name)
        self._refresh()

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._run
        if self.weight_nf4 is not None:
            y = nf4_linear(x, self.weight_nf4, self.bias)
            if not run:
                return y
        elif self.kind in ("linear", "conv1d"):
            weight = self.dense_weight()  # (d_out, d_in) view, no copy
            if not run:
                return F.linear(x, weight, self.bias)
            if len(run) == 1 and run[0] not in self.lora_magnitude_vector:
                return _lora_linear(x, weight, self.bias, self.lora_A[run[0]], self.lora_B[run[0]],
                                    self.scaling[run[0]], self.dropout[run[0]] if self.training else 0.0)
            y = F.linear(x, weight, self.bias)
        else:
            y = self.base_layer(x)
            if not run:
                return y
        out = y
        for name in run:
            out = out + (self._dora_branch(name, x, y) if name in self.lora_magnitude_vector else self._lora_branch(name, x))
        return out

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        p = self.dropout[name] if self.training else 0.0
        if self.kind == "embedding":
            base = self.base_layer
            h = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return (h @ b.t().to(h.dtype)) * scale
        xd = F.dropout(x, p, training=True) if p > 0 else x
        if self.kind == "conv2d":
            base = self.base_layer
            h = F.conv2d(xd, a.to(xd.dtype), None, base.stride, base.padding, base.dilation)
            return F.conv2d(h, b.to(h.dtype)) * scale
        return F.linear(F.linear(xd, a.to(xd.dtype)), b.to(xd.dtype)) * scale

    def _dora_branch(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # DoRA (Liu et al., 2024), as PEFT computes it: with s = m / ||W + scale·BA|| per output (norm detached),
        # the output is s ⊙ (x Wᵀ + scale · x Aᵀ Bᵀ) + bias = y + (s − 1) ⊙ x Wᵀ + s ⊙ scale · x Aᵀ Bᵀ.
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        p = self.dropout[name] if self.training else 0.0
        weight = self.dense_weight()
        if p > 0:
            x = F.dropout(x, p, training=True)
            base = F.linear(x, weight)
        else:
            base = y if self.bias is None else y - self.bias
        lora = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        norm = (weight + (b @ a).to(weight.dtype) * scale).norm(dim=1).detach()
        s = (self.lora_magnitude_vector[name] / norm).to(y.dtype)
        return (s - 1) * base + s * lora * scale


def _pissa_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # PiSSA (Meng et al., 2024): W ≈ U_r S_r V_rᵀ; with scale folded out, B0 = U_r √(S_r/scale), A0 = √(S_r/scale) V_rᵀ,
    # so that scale · B0 @ A0 is W's best rank-r approximation.
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return (root.unsqueeze(1) * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


def _lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p):
    # Run the fused function in one dtype: autocast's if it is on, else the input's. Casting the small A and B
    # (not x) keeps fp32 master copies of the adapter while bf16 activations stay bf16.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return LoraLinearFunction.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                            lora_a.to(dtype), lora_b.to(dtype), scale, dropout_p)
    dtype = x.dtype
    return LoraLinearFunction.apply(x, weight, bias, lora_a.to(dtype), lora_b.to(dtype), scale, dropout_p)


class SavedModule(nn.Module):
    """A module trained in full alongside the adapters (PEFT's modules_to_save): the original stays untouched,
    each adapter gets its own copy, and forward uses the active adapter's copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()  # PEFT's in-model names, so state dicts line up
        self.active: str | None = None
        self.disabled = False

    def current(self) -> nn.Module:
        """The module forward uses now."""
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active", "disabled"):
                raise
            # Code that reads e.g. `model.classifier.out_features` or `.weight` sees the module in use.
            return getattr(self.current(), name)
