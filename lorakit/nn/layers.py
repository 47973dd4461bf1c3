"""LoRA layers: a frozen base layer plus trainable low-rank updates ΔW = scale · B @ A.

A `LoraLayer` wraps any layer kinds.py knows (nn.Linear, GPT-2's Conv1D, nn.Embedding, nn.Conv2d, and NF4Linear,
a Linear held in 4 bits). It takes over the base layer's own tensors under their own names (`weight` and `bias`;
`weight_nf4` for NF4), so the base model's state-dict keys stay where they were and each tensor is held once,
and it holds any number of named adapters:

    lora_A[name]: (r, d_in)     lora_B[name]: (d_out, r)        (Conv2d: (r, C_in, kh, kw) and (C_out, r, 1, 1))
    lora_B_bias[name]: (d_out,)  B's bias, for adapters with lora_bias (PEFT's lora_B.bias)
    adapters[name]: scale, dropout, variant (LoRA, LoRA with a bias on B, or DoRA; variants.py), PiSSA's starting factors

Forward: y = base(x) + Σ over active, unmerged adapters of what each adds (a variant's `output`). Inside
`lorakit.route(model, names)` each row goes through its own adapter instead (routing.py).
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar

import torch
from torch import nn

from .kinds import Kind, check_supported
from .nf4 import NF4Linear
from .variants import INITS, Adapter, variant_for

# {module: its routed forward} while a `routing.route()` call runs in this thread (or asyncio task); None otherwise.
# A context variable, not a layer attribute, so that other threads using the same model are not routed.
ROUTES: ContextVar[dict | None] = ContextVar("lorakit_routes", default=None)
_routing = 0  # route() calls running in any thread; while 0, forward does not read ROUTES (torch.compile cannot trace it)
_ROUTING_COUNT = threading.Lock()


@contextlib.contextmanager
def routing(table: dict):
    """Route the forwards of the modules in `table` ({module: routed forward}) in this thread or task for the
    block (adapters.routing.route builds the table)."""
    global _routing
    token = ROUTES.set({**(ROUTES.get() or {}), **table})  # a route of another model may be running around it
    with _ROUTING_COUNT:
        _routing += 1
    try:
        yield
    finally:
        with _ROUTING_COUNT:
            _routing -= 1
        ROUTES.reset(token)


class LoraLayer(nn.Module):
    """A base layer with named LoRA adapters. See the module docstring for shapes, variants.py for the math."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.kind: Kind = check_supported(base)
        object.__setattr__(self, "base_layer", base)  # outside the module tree: its tensors are held here instead
        self._take_tensors()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.lora_B_bias = nn.ParameterDict()  # lora_bias adapters only
        self.adapters: dict[str, Adapter] = {}
        self.active: tuple[str, ...] = ()  # adapters applied in forward
        self.merged: list[str] = []  # adapters folded into W, in the order they were merged
        self.disabled = False

    def _take_tensors(self) -> None:
        for name in self.kind.held:
            setattr(self, name, getattr(self.base_layer, name, None))
            setattr(self.base_layer, name, None)

    def release(self) -> nn.Module:
        """The base layer with its tensors given back (this layer must not be used afterwards)."""
        for name in self.kind.held:
            setattr(self.base_layer, name, getattr(self, name))
        return self.base_layer

    def _swap_base(self, base: nn.Module) -> None:
        for name in self.kind.held:
            delattr(self, name)
        self.kind = check_supported(base)
        object.__setattr__(self, "base_layer", base)
        self._take_tensors()

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"kind={self.kind.name}, base={self.base_layer!r}, ranks={ranks}, active={self.active}, merged={self.merged}"

    # ---- adapters ----

    @torch.no_grad()
    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: str = "kaiming",
                    use_dora: bool = False, lora_bias: bool = False) -> None:
        """Create lora_A[name] and lora_B[name] (and B's bias with lora_bias) so that the output is unchanged (unless
        init='random'); float32 unless the base is float64. init='pissa' also replaces W by its residual (variants.py)."""
        start, variant = INITS[init], variant_for(use_dora, lora_bias)
        if (use_dora or start.residual) and not self.kind.linear:
            raise ValueError(f"{'DoRA' if use_dora else 'PiSSA'} supports Linear and Conv1D layers, not {self.kind.name}")
        if lora_bias and (start.residual or not self.kind.biased):
            raise ValueError(f"lora_bias is not supported {'with PiSSA' if start.residual else 'on ' + self.kind.name}")
        shape_a, shape_b = self.kind.factor_shapes(self.base_layer, r)
        a, b = start.factors(self, shape_a, shape_b, scale, self._factor_options())
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.adapters[name] = Adapter(scale, float(dropout) if self.kind.dropout else 0.0, variant)  # no dropout on ids
        if start.residual:
            self.adapters[name].pissa_start = (a.clone(), b.clone())
            self.add_lowrank(a, b, -scale)
        variant.create(self, name)

    def _factor_options(self) -> dict:
        # A and B live on W's device, in float32 (float64 beside a float64 base): the trained weights stay exact
        # whatever precision the frozen base is stored in.
        source = self.weight_nf4.packed if self.kind.quantized else self.weight
        dtype = self.weight_nf4.dtype if self.kind.quantized else self.weight.dtype
        return dict(device=source.device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` in this layer: A, B and the variant's own."""
        return [self.lora_A[name], self.lora_B[name], *self.adapters[name].variant.trainable(self, name)]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`, unmerging it first and, for PiSSA, giving W its starting factors back."""
        if name in self.merged:
            self.unmerge(name)
        self.restore_pissa([name], +1)
        del self.lora_A[name], self.lora_B[name], self.adapters[name]
        for extra in (self.lora_magnitude_vector, self.lora_B_bias):
            if name in extra:
                del extra[name]
        self.active = tuple(a for a in self.active if a != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Apply only adapters `names` (those this layer has) in forward."""
        self.active = tuple(n for n in names if n in self.adapters)

    def running(self) -> tuple[str, ...]:
        """The adapters forward adds: active, not merged, and none while disabled."""
        return () if self.disabled else tuple(n for n in self.active if n not in self.merged)

    def restore_pissa(self, names, sign: float) -> None:
        """For PiSSA adapters among `names`: +1 adds their starting factors back into W (W becomes the original base
        weight), −1 takes them out again."""
        for name in names:
            start = self.adapters[name].pissa_start
            if start is not None:
                self.add_lowrank(*start, sign * self.adapters[name].scale)

    # ---- the weight ----

    def base_matrix(self) -> torch.Tensor:
        """W as (d_out, d_in): a view of the stored weight, or a dequantized copy for NF4."""
        return self.kind.matrix(self)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` as (d_out, d_in) float32: what merging it adds to W."""
        return self.adapters[name].variant.delta(self, name)

    @torch.no_grad()
    def add_lowrank(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """W ← W + scale · B A, in place (no full-size temporary when A, B and W share a dtype)."""
        if self.kind.quantized:
            raise ValueError("an NF4 weight cannot be changed in place: dequantize_base() first")
        matrix = self.base_matrix()
        a, b = a.detach().flatten(1).to(matrix.device), b.detach().flatten(1).to(matrix.device)
        if a.dtype == b.dtype == matrix.dtype:
            matrix.addmm_(b, a, alpha=scale)
        else:
            matrix.add_((b.float() @ a.float() * scale).to(matrix.dtype))

    @torch.no_grad()
    def quantize_base(self) -> None:
        """QLoRA: hold the frozen weight as NF4 codes (about 0.13× its fp32 size), dequantized on the fly."""
        if self.kind.quantized:
            return
        if not self.kind.linear:
            raise ValueError(f"NF4 quantization supports Linear and Conv1D layers, not {self.kind.name}")
        if self.merged or any(a.pissa_start is not None for a in self.adapters.values()):
            raise ValueError("cannot quantize a layer with merged or PiSSA adapters: its weight is not the base weight")
        self._swap_base(NF4Linear.from_linear(self.release()))

    @torch.no_grad()
    def dequantize_base(self, dtype: torch.dtype | None = None) -> None:
        """Back to a full-precision frozen weight holding the dequantized NF4 values (merging needs one), in `dtype`
        (default: the dtype it was quantized from)."""
        if self.kind.quantized:
            self._swap_base(self.release().to_dense(dtype))

    @torch.no_grad()
    def merge_stays_finite(self, name: str) -> bool:
        """Whether merging adapter `name` leaves W finite (checked before anything changes)."""
        return self.adapters[name].variant.merge_is_finite(self, name)

    @torch.no_grad()
    def merge(self, name: str) -> float:
        """W ← W + ΔW (idempotent); an NF4 weight is dequantized first. Returns the largest |merged W − (W + ΔW in
        float32)|: what holding the merge in W's dtype rounded away."""
        if name in self.merged:
            return 0.0
        self.dequantize_base()
        error = self.adapters[name].variant.merge(self, name)
        self.merged.append(name)
        return error

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Undo merge(name)."""
        if name in self.merged:
            self.adapters[name].variant.unmerge(self, name)
            self.merged.remove(name)

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routes = ROUTES.get() if _routing else None
        if routes and self in routes:
            return routes[self](x)  # a mixed-adapter batch: each row through its own adapter (routing.py)
        running = self.running()
        if not running:
            return self.kind.base(self, x)
        first = self.adapters[running[0]]
        if len(running) == 1 and first.variant.fusable and self.kind.fused is not None:
            return self._fused_forward(running[0], x)
        y = self.kind.base(self, x)
        out = y
        for name in running:
            out = out + self.adapters[name].variant.output(self, name, x, y)
        return out

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # One adapter through the kind's fused function; a bias the variant adds (lora_bias: s · c) joins W's bias.
        adapter = self.adapters[name]
        bias = self.bias
        if adapter.variant.added_bias is not None:
            added = adapter.variant.added_bias(self, name)
            bias = added.to(x.dtype) if bias is None else bias + added.to(bias.dtype)
        p = adapter.dropout if self.training else 0.0
        return self.kind.fused(self, x, self.lora_A[name], self.lora_B[name], adapter.scale, p, bias)


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
        routes = ROUTES.get() if _routing else None
        if routes and self in routes:
            return routes[self](*args, **kwargs)  # each row through its own adapter's copy (routing.py)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active", "disabled"):
                raise
            # Code that reads e.g. `model.classifier.out_features` or `.weight` sees the module in use.
            return getattr(self.current(), name)
