"""Mixed-adapter batches: every row of a batch through its own adapter, in one forward pass.

    with lorakit.route(model, ["news", "sentiment", None, "news"]):   # None: the base model
        logits = model(**batch).logits                              # also model.generate(**batch)

At entry, each LoRA layer stacks the adapters the call uses, once: ranks zero-padded to the largest r (R), each
adapter's scale folded into B, slot 0 all zeros for the base model. With idx (N,) the slot of each row:

    A: (k+1, R, d_in)    B: (k+1, d_out, R)    F: (k+1, d_out) DoRA's m / ‖W + s·BA‖ (1 for LoRA and the base)

and each row gathers its own factors, applied with batched matmuls (bmm) instead of a Python loop over adapters:

    LoRA    y[n] = base(x[n]) + x[n] A[idx[n]]ᵀ B[idx[n]]ᵀ
    DoRA    y[n] = base(x[n]) + (F[idx[n]] − 1) ⊙ x[n] Wᵀ + F[idx[n]] ⊙ x[n] A[idx[n]]ᵀ B[idx[n]]ᵀ

x[n] is everything of row n: (T, d_in) tokens for a sequence, also when a model flattens its input to (N·T, d_in)
or generate() repeats each row for beams; any leading dimension that is a multiple of N is read as N groups of
consecutive entries (Embedding: ids; Conv2d: images, convolved per image as groups of one grouped convolution).

Task heads (modules_to_save) are whole modules, not low-rank factors: a routed head runs each adapter's own copy on
that adapter's rows, once per forward (a loop over the distinct heads in the batch, at one place in the model).
Heads may have different numbers of outputs: a row's logits beyond its own head's width are −inf, so softmax gives
them probability 0 and `logits[i, :len(labels_i)]` are row i's own logits. `load_adapter_with_head` loads an
adapter whose head is sized for its own label set.

Thread safety: route() holds the model's lock (locks.py) for the whole call, so adapters added, deleted, merged or
unmerged from other threads wait until it ends; the route itself lives in a context variable, so forwards of the
same model in other threads are not routed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .files import WEIGHTS_NAME, _parse_file_key, load_adapter, read_adapter_config
from ..nn import layers
from ..nn.kinds import CONV2D, EMBEDDING
from ..nn.layers import ROUTES, LoraLayer, SavedModule
from .locks import model_lock
from .parts import configs, lora_layers, plan_saved_modules, replace_module, saved_modules, unwrap
from ..nn.variants import DORA


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]):
    """Run row i of every forward inside the block through adapter `names[i]` (None: the base model, heads
    included), for any layer kind, LoRA or DoRA, any ranks and scales. Inference only (eval mode, adapters
    unmerged). The adapters are stacked once at entry; the block holds the model's lock (see the module docstring)."""
    root = unwrap(model)
    with model_lock(root):
        table = routes(root, list(names))
        token = ROUTES.set({**(ROUTES.get() or {}), **table})  # a route of another model may be running around it
        _count_routing(+1)
        try:
            yield
        finally:
            _count_routing(-1)
            ROUTES.reset(token)


_COUNTING = threading.Lock()


def _count_routing(step: int) -> None:
    # layers.routing counts the route() calls running in all threads, so that forward reads ROUTES only when one is.
    with _COUNTING:
        layers.routing += step


def routes(root: nn.Module, names: list[str | None]) -> dict[nn.Module, Callable]:
    """{LoRA layer or saved module: its routed forward} for rows routed to `names`; checks first."""
    layers = list(lora_layers(root).values())
    _check(root, names, layers)
    used = list(dict.fromkeys(n for n in names if n is not None))  # distinct adapters, in order of first use
    slot = {n: i for i, n in enumerate([None] + used)}
    idx = torch.tensor([slot[n] for n in names], device=next(root.parameters()).device)
    table = {}
    for layer in layers:
        table[layer] = functools.partial(_FORWARDS.get(layer.kind, _linear_rows), layer, stack(layer, used), idx)
    for wrapper in saved_modules(root).values():
        copies = [wrapper.original_module] + [wrapper.modules_to_save[n] if n in wrapper.modules_to_save
                                              else wrapper.original_module for n in used]
        table[wrapper] = functools.partial(_saved_rows, copies, idx)
    return table


def _check(root: nn.Module, names: list, layers: list[LoraLayer]) -> None:
    if not names:
        raise ValueError("route(): no rows (names is empty)")
    known = configs(root)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"route(): unknown adapter(s) {unknown}; this model has {sorted(known)}")
    if root.training:
        raise ValueError("route() is for inference: call model.eval() first (adapter dropout is not routed)")
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise ValueError(f"route() needs the unmerged base model, but adapter(s) {merged} are merged into it: "
                         f"unmerge(model) first")
    if any(a.pissa_start is not None for layer in layers for a in layer.adapters.values()):
        raise ValueError("route(): a PiSSA adapter changes the base weight for every row; save and load it "
                         "(as the plain LoRA lorakit saves) to route it")
    if any(layer.kind is EMBEDDING and layer.base_layer.max_norm is not None for layer in layers):
        raise ValueError("route(): Embedding layers with max_norm are not supported")


@dataclass
class Stack:
    """One layer's adapters for one routed call; slot 0 is the base model (zeros). Shapes as the layer holds them,
    one more dimension in front: a (k+1, R, d_in) (Conv2d: (k+1, R, C_in, kh, kw); Embedding: (k+1, R, vocab))."""

    a: torch.Tensor | None
    b: torch.Tensor | None  # (k+1, d_out, R), each adapter's scale folded in
    factor: torch.Tensor | None  # DoRA's (k+1, d_out); None when no adapter here is DoRA
    rank: int  # R; 0 when no routed adapter is in this layer (the layer runs its base alone)


@torch.no_grad()
def stack(layer: LoraLayer, used: list[str]) -> Stack:
    """The adapters `used` of `layer` stacked (adapters this layer lacks get zeros: those rows add nothing)."""
    a_of = {n: layer.lora_A[n] for n in used if n in layer.adapters}
    if not a_of:
        return Stack(None, None, None, 0)
    b_of = {n: layer.lora_B[n].flatten(1) for n in a_of}  # (d_out, r)
    rank = max(a.shape[0] for a in a_of.values())
    first = next(iter(a_of.values()))
    d_out = next(iter(b_of.values())).shape[0]
    zero_a, zero_b = first.new_zeros(rank, *first.shape[1:]), first.new_zeros(d_out, rank)
    a = torch.stack([zero_a] + [_padded(a_of[n], rank, 0) if n in a_of else zero_a for n in used])
    b = torch.stack([zero_b] + [_padded(b_of[n], rank, 1) if n in b_of else zero_b for n in used])
    scales = [0.0] + [layer.adapters[n].scale if n in a_of else 0.0 for n in used]
    b = b * torch.tensor(scales, dtype=b.dtype, device=b.device).view(-1, 1, 1)
    dora = [(slot, n) for slot, n in enumerate(used, start=1) if n in a_of and layer.adapters[n].variant is DORA]
    factor = None
    if dora:
        factor = first.new_ones(len(used) + 1, d_out)
        for slot, name in dora:  # DoRA's row norms depend on W and on each adapter: one per DoRA adapter
            factor[slot] = _dora_factor(layer, name)
    return Stack(a, b, factor, rank)


def _padded(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    # Zero rank components up to `rank` along `dim`: they add nothing to x Aᵀ Bᵀ.
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _dora_factor(layer: LoraLayer, name: str) -> torch.Tensor:
    # m / ‖W + s·BA‖ per output row, computed as variants._dora_output computes it.
    a, b, scale = layer.lora_A[name], layer.lora_B[name], layer.adapters[name].scale
    weight = layer.base_matrix()
    norm = (weight + (b @ a).to(weight.dtype) * scale).norm(dim=1)
    return layer.lora_magnitude_vector[name] / norm


def groups(idx: torch.Tensor, x: torch.Tensor) -> int:
    """How many consecutive entries of x's leading dimension belong to each row (1 for an (N, ...) batch)."""
    n, rows = x.shape[0], idx.shape[0]
    if x.dim() == 0 or n % rows:
        raise ValueError(f"route(): a layer got input of shape {tuple(x.shape)}, whose leading dimension is not a "
                         f"multiple of the {rows} routed rows")
    return n // rows


def _linear_rows(layer: LoraLayer, s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Linear, Conv1D and NF4: x (N·m, ..., d_in) viewed as (N, M, d_in), one bmm pair for every row at once.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    groups(idx, x)
    rows = x.reshape(idx.shape[0], -1, x.shape[-1])
    a, b = s.a[idx].to(x.dtype), s.b[idx].to(x.dtype)  # (N, R, d_in), (N, d_out, R)
    lora = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))  # (N, M, d_out)
    if s.factor is None:
        return y + lora.view(y.shape)
    base = y if layer.bias is None else y - layer.bias  # x Wᵀ
    f = s.factor[idx].to(y.dtype).unsqueeze(1)  # (N, 1, d_out)
    return y + ((f - 1) * base.reshape(lora.shape) + f * lora).view(y.shape)


def _embedding_rows(layer: LoraLayer, s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # ids (N·m, ...) viewed as (N, M): each row looks its ids up in its own A, then one bmm with its own B.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    groups(idx, x)
    ids = x.reshape(idx.shape[0], -1)
    h = s.a.transpose(1, 2)[idx.unsqueeze(1), ids]  # A's columns looked up by id: (N, M, R)
    return y + torch.bmm(h.to(y.dtype), s.b[idx].to(y.dtype).transpose(1, 2)).view(y.shape)


def _conv2d_rows(layer: LoraLayer, s: Stack, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Images (L, C, H, W): a grouped convolution with one group per image applies each image's own A, then one bmm.
    y = layer.kind.base(layer, x)
    if s.rank == 0:
        return y
    c, n = layer.base_layer, x.shape[0]
    per = idx.repeat_interleave(groups(idx, x))  # (L,) slot of each image
    a = s.a[per].to(x.dtype).flatten(0, 1)  # (L·R, C, kh, kw)
    h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), a, None, c.stride, c.padding, c.dilation, groups=n)
    lora = torch.bmm(s.b[per].to(x.dtype), h.view(n, s.rank, -1))  # (L, d_out, H'·W')
    return y + lora.view(y.shape)


_FORWARDS = {EMBEDDING: _embedding_rows, CONV2D: _conv2d_rows}  # every other kind computes x Wᵀ: _linear_rows


def _saved_rows(copies: list[nn.Module], idx: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Each distinct head of the batch on its own rows; outputs narrower than the widest padded with −inf.
    per = idx.repeat_interleave(groups(idx, x))
    outs = []
    for slot in per.unique().tolist():
        rows = (per == slot).nonzero().squeeze(1)
        outs.append((rows, copies[slot](x[rows], *args, **kwargs)))
    first = outs[0][1]
    if len(outs) == 1:
        return first
    out = first.new_full((x.shape[0], *first.shape[1:-1], max(o.shape[-1] for _, o in outs)), float("-inf"))
    for rows, o in outs:
        out[rows, ..., :o.shape[-1]] = o
    return out


# ---- adapters whose head has its own number of labels ----

def load_adapter_with_head(model: nn.Module, path: str | os.PathLike, name: str) -> nn.Module:
    """load_adapter(model, path, name), also when the adapter's saved head (a Linear in modules_to_save) has another
    number of outputs than the model's: its copy of the head takes the file's shape (a 2-label sentiment adapter
    beside a 4-label news adapter). The model's own head stays as it was."""
    root = unwrap(model)
    with model_lock(root):
        swaps = _head_swaps(root, path)
        for where, (old, new) in swaps.items():
            _put_head(root, where, new)
        try:
            return load_adapter(model, path, name)
        finally:
            for where, (old, new) in swaps.items():
                _put_head(root, where, old)


def _head_swaps(root: nn.Module, path) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    # {module path: (the model's head, a Linear of the file's shape)} for each saved Linear whose size differs.
    config = read_adapter_config(path)
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return {}  # load_adapter says what is missing
    with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt") as f:
        shapes = {_parse_file_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    swaps = {}
    for where in plan_saved_modules(root, config, strict=False):
        module = root.get_submodule(where)
        head = module.original_module if isinstance(module, SavedModule) else module
        shape = shapes.get(f"{where}.weight")
        if isinstance(head, nn.Linear) and shape and len(shape) == 2 and shape != tuple(head.weight.shape) \
                and shape[1] == head.in_features:
            new = nn.Linear(head.in_features, shape[0], bias=head.bias is not None,
                            device=head.weight.device, dtype=head.weight.dtype)
            swaps[where] = (head, new.requires_grad_(False))
    return swaps


def _put_head(root: nn.Module, where: str, head: nn.Module) -> None:
    module = root.get_submodule(where)
    if isinstance(module, SavedModule):
        module.original_module = head
    else:
        replace_module(root, where, head)
