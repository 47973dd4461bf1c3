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
    kind, w = layer_kind(module), module.weight
    if kind == "conv1d":
        return w.shape[0], w.shape[1]
    if kind == "embedding":
        return w.shape[0], w.shape[1]  # A indexes rows (num_embeddings), B produces embedding_dim
    if kind == "conv2d":
        return w[0].numel(), w.shape[0]  # A sees a flattened C_in × kh × kw patch
    return w.shape[1], w.shape[0]  # linear: (d_out, d_in)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ, with a lean backward.

    Saves x, a bool dropout mask and h = dropout(x) Aᵀ (N × r), instead of a full-size dropout copy per layer:
    layers reading the same x (query, key, value) share one saved x. The scale and the add are fused into
    `addmm`. W is frozen in normal use, so no weight gradient is computed unless W requires it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        mask = None
        if dropout_p > 0:
            xd = F.dropout(x2, dropout_p, training=True)
            mask = xd != 0  # where x2 is 0 the mask does not matter: x2 · mask is 0 either way
        else:
            xd = x2
        h = xd @ lora_a.t()  # (N, r)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, d_out)
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, mask, h, weight, lora_a, lora_b)
        ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, mask, h, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        gh = (g @ lora_b).mul_(ctx.scale)  # (N, r): gradient reaching h
        grad_x = grad_w = grad_b = grad_a = grad_lb = None
        if need_lb:
            grad_lb = (g.t() @ h).mul_(ctx.scale)
        if need_a:
            xd = x2 if mask is None else x2 * mask * (1.0 / (1.0 - ctx.dropout_p))
            grad_a = gh.t() @ xd
        if need_x:
            lora_part = gh @ lora_a  # (N, d_in)
            if mask is not None:
                lora_part.mul_(mask).mul_(1.0 / (1.0 - ctx.dropout_p))
            grad_x = torch.addmm(lora_part, g, weight).reshape(*grad.shape[:-1], x2.shape[-1])
        if need_w:
            grad_w = g.t() @ x2
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_a, grad_lb, None, None


class LoraLayer(nn.Module):
    """A base layer with named LoRA adapters. See the module docstring for shapes and math."""

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
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: tuple[str, ...] = ()  # adapters applied in forward
        self.merged: list[str] = []  # adapters folded into weight
        self.disabled = False
        self._run: tuple[str, ...] = ()  # active, unmerged and not disabled: what forward adds

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"kind={self.kind}, weight={tuple(self.weight.shape)}, ranks={ranks}, active={self.active}, merged={self.merged}"

    # ---- adapters ----

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        """Create lora_A[name] and lora_B[name] so that ΔW = 0 (unless init='random'), in fp32 unless the base is fp64."""
        d_in, d_out = layer_dims(self)
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        kw = dict(device=self.weight.device, dtype=dtype)
        if self.kind == "conv2d":
            a = torch.empty(r, *self.weight.shape[1:], **kw)
            b = torch.zeros(d_out, r, 1, 1, **kw)
        else:
            a, b = torch.empty(r, d_in, **kw), torch.zeros(d_out, r, **kw)
        if init in ("kaiming", "random"):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init, as in loralib and PEFT
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.zeros_(a)
        if init == "random":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = scale
        self.dropout[name] = 0.0 if self.kind == "embedding" else float(dropout)  # no dropout on token ids
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`, unmerging it first if it is folded into the weight."""
        if name in self.merged:
            self.unmerge(name)
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        self.active = tuple(a for a in self.active if a != name)
        self._refresh()

    def set_active(self, names: tuple[str, ...]) -> None:
        """Apply only adapters `names` (those this layer has) in forward."""
        self.active = tuple(n for n in names if n in self.lora_A)
        self._refresh()

    def _refresh(self) -> None:
        self._run = () if self.disabled else tuple(n for n in self.active if n not in self.merged)

    # ---- merging ----

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale · B @ A, shaped and typed like `weight`."""
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        if self.kind == "conv2d":
            delta = (b.flatten(1) @ a.flatten(1)).reshape(self.weight.shape)
        else:
            delta = b @ a  # (d_out, d_in)
            if self.kind in ("conv1d", "embedding"):
                delta = delta.t()
        return (delta * self.scaling[name]).to(self.weight.dtype)

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """W + scale · B @ A, as a new tensor."""
        return self.weight + self.delta_weight(name)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W ← W + scale · B @ A (idempotent)."""
        if name not in self.merged:
            self.weight.copy_(self.merged_weight(name))
            self.merged.append(name)
            self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W ← W − scale · B @ A."""
        if name not in self.merged:
            return
        self.weight.sub_(self.delta_weight(name))
        self.merged.remove(name)
        self._refresh()

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._run
        if self.kind in ("linear", "conv1d"):
            weight = self.weight.t() if self.kind == "conv1d" else self.weight  # (d_out, d_in) view, no copy
            if not run:
                return F.linear(x, weight, self.bias)
            if len(run) == 1:
                return _lora_linear(x, weight, self.bias, self.lora_A[run[0]], self.lora_B[run[0]],
                                    self.scaling[run[0]], self.dropout[run[0]] if self.training else 0.0)
            y = F.linear(x, weight, self.bias)
        else:
            y = self.base_layer(x)
            if not run:
                return y
        for name in run:
            y = y + self._lora_branch(name, x)
        return y

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
