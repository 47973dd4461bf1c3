"""Mixed-adapter batches: every row of a batch through its own adapter, in one forward pass.

    with lorakit.route(model, ["news", "sentiment", None, "news"]):   # None: the base model
        logits = model(**batch).logits                              # also model.generate(**batch)

At entry, each LoRA layer stacks the adapters the call uses, once: ranks zero-padded to the largest r (R), each
adapter's scale folded into B, slot 0 all zeros for the base model. With idx (N,) the slot of each row:

    A: (k+1, R, d_in)    B: (k+1, d_out, R)    F: (k+1, d_out) DoRA's m / ‖W + s·BA‖ (1 for LoRA and the base)

and each row gathers its own factors, applied with batched matmuls (bmm) instead of a Python loop over adapters:

    LoRA    y[n] = base(x[n]) + x[n] A[idx[n]]ᵀ B[idx[n]]ᵀ (+ C[idx[n]]: s · B's bias, for lora_bias adapters)
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
from typing import Callable, Sequence

import torch
from torch import nn

from ..nn.layers import LoraLayer, SavedModule, routing
from ..nn.rows import Stack, groups
from .attach import attach
from .files import read_adapter
from .locks import model_lock
from .parts import configs, lora_layers, plan_saved_modules, replace_module, saved_modules, unwrap


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]):
    """Run row i of every forward inside the block through adapter `names[i]` (None: the base model, heads
    included), for any layer kind, LoRA or DoRA, any ranks and scales. Inference only (eval mode, adapters
    unmerged). The adapters are stacked once at entry; the block holds the model's lock (see the module docstring)."""
    root = unwrap(model)
    with model_lock(root):
        with routing(routes(root, list(names))):
            yield


def routes(root: nn.Module, names: list[str | None]) -> dict[nn.Module, Callable]:
    """{LoRA layer or saved module: its routed forward} for rows routed to `names`; checks first."""
    adapted = list(lora_layers(root).values())
    _check(root, names, adapted)
    used = list(dict.fromkeys(n for n in names if n is not None))  # distinct adapters, in order of first use
    slot = {n: i for i, n in enumerate([None] + used)}
    idx = torch.tensor([slot[n] for n in names], device=next(root.parameters()).device)
    table = {}
    for layer in adapted:
        table[layer] = functools.partial(layer.kind.rows, layer, stack(layer, used), idx)
    for wrapper in saved_modules(root).values():
        copies = [wrapper.original_module] + [wrapper.modules_to_save[n] if n in wrapper.modules_to_save
                                              else wrapper.original_module for n in used]
        table[wrapper] = functools.partial(_saved_rows, copies, idx)
    return table


def _check(root: nn.Module, names: list, adapted: list[LoraLayer]) -> None:
    if not names:
        raise ValueError("route(): no rows (names is empty)")
    known = configs(root)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"route(): unknown adapter(s) {unknown}; this model has {sorted(known)}")
    if root.training:
        raise ValueError("route() is for inference: call model.eval() first (adapter dropout is not routed)")
    merged = sorted({n for layer in adapted for n in layer.merged})
    if merged:
        raise ValueError(f"route() needs the unmerged base model, but adapter(s) {merged} are merged into it: "
                         f"unmerge(model) first")
    if any(a.pissa_start is not None for layer in adapted for a in layer.adapters.values()):
        raise ValueError("route(): a PiSSA adapter changes the base weight for every row; save and load it "
                         "(as the plain LoRA lorakit saves) to route it")
    for layer in adapted:
        layer.kind.check_routable(layer.base_layer)


@torch.no_grad()
def stack(layer: LoraLayer, used: list[str]) -> Stack:
    """The adapters `used` of `layer` stacked (adapters this layer lacks get zeros: those rows add nothing)."""
    a_of = {n: layer.lora_A[n] for n in used if n in layer.adapters}
    if not a_of:
        return Stack(None, None, None, None, 0)
    b_of = {n: layer.lora_B[n].flatten(1) for n in a_of}  # (d_out, r)
    rank = max(a.shape[0] for a in a_of.values())
    first = next(iter(a_of.values()))
    d_out = next(iter(b_of.values())).shape[0]
    zero_a, zero_b = first.new_zeros(rank, *first.shape[1:]), first.new_zeros(d_out, rank)
    a = torch.stack([zero_a] + [_padded(a_of[n], rank, 0) if n in a_of else zero_a for n in used])
    b = torch.stack([zero_b] + [_padded(b_of[n], rank, 1) if n in b_of else zero_b for n in used])
    scales = [0.0] + [layer.adapters[n].scale if n in a_of else 0.0 for n in used]
    b = b * torch.tensor(scales, dtype=b.dtype, device=b.device).view(-1, 1, 1)
    scaled = [(slot, n) for slot, n in enumerate(used, start=1)
              if n in a_of and layer.adapters[n].variant.row_factor is not None]
    factor = None
    if scaled:
        factor = first.new_ones(len(used) + 1, d_out)
        for slot, name in scaled:  # DoRA's row norms depend on W and on each adapter: one per such adapter
            factor[slot] = layer.adapters[name].variant.row_factor(layer, name)
    return Stack(a, b, factor, _biases(layer, used, d_out, first), rank)


def _biases(layer: LoraLayer, used: list[str], d_out: int, like: torch.Tensor) -> torch.Tensor | None:
    # s · B's bias per slot, (k+1, d_out): zeros for the base model and for adapters without one; None if none has.
    if not any(n in layer.lora_B_bias for n in used):
        return None
    rows = [like.new_zeros(d_out)] + [layer.lora_B_bias[n] * layer.adapters[n].scale if n in layer.lora_B_bias
                                      else like.new_zeros(d_out) for n in used]
    return torch.stack(rows)


def _padded(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    # Zero rank components up to `rank` along `dim`: they add nothing to x Aᵀ Bᵀ.
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


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
    config, tensors = read_adapter(path)  # once: the head's shape and the weights come from the same read
    with model_lock(root):
        swaps = _head_swaps(root, config, tensors)
        for where, (old, new) in swaps.items():
            _put_head(root, where, new)
        try:
            return attach(model, config, tensors, name, where=path)
        finally:
            for where, (old, new) in swaps.items():
                _put_head(root, where, old)


def _head_swaps(root: nn.Module, config, tensors: dict) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    # {module path: (the model's head, a Linear of the file's shape)} for each saved Linear whose size differs.
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
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
