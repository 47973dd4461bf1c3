"""`combine`: adapter arithmetic with the semantics and numerics of PEFT's `add_weighted_adapter`.

With w_i the weights and s_i each adapter's scale, per module (over the adapters that adapt it):

    linear, ties, dare_linear, dare_ties   A and B merged separately, as PEFT does: A from the A_i weighted by
        sign(w_i s_i)·√|w_i s_i|, B from the B_i weighted by √|w_i s_i| (so "linear" is Σ w_i s_i B_i A_i only for
        one adapter); ties keeps each factor's top `density` share by magnitude and the majority sign; dare drops
        entries at random (kept with probability `density`, rescaled by 1/density). The ranks must agree.
    cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly Σ w_i ΔW_i, rank Σ r_i
    svd     Σ w_i ΔW_i truncated by SVD to rank `r` (default: the largest rank), B = U σ, A = Vᵀ

The new adapter has scale 1 (alpha = r), as PEFT's. Where this differs from PEFT: dare's random masks are drawn
from a generator seeded with `seed`, module by module in sorted order, A before B, adapter by adapter (PEFT draws
from torch's global generator, whatever state it is in); a single adapter is combined "linear" as in PEFT. A
classification head (modules_to_save) is combined as the weighted mean Σ w_i H_i / Σ w_i when every adapter saves
one for the same label set, and refused otherwise (PEFT refuses any two heads). DoRA adapters, trained biases and
biases on B (lora_bias) are refused: PEFT defines no combination of them (it leaves B's biases as initialised).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..adapters.config import replace
from .adapters import AdapterFile, Factors, factor_tensors, read, uniform_config, write

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties")


def combine(adapters: list[str | Path], weights: list[float], output: str | Path, method: str = "linear",
            density: float | None = None, seed: int = 0, r: int | None = None,
            draw: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor] | None = None) -> dict:
    """Write the combination of `adapters` to `output`; returns {path: rank}. Everything is checked before any
    output is written. `draw(tensor, density, generator)` makes a dare mask (default: Bernoulli(density))."""
    sources = _checked_inputs(adapters, weights, method, density, r)
    method = "linear" if len(sources) == 1 else method
    generator = torch.Generator().manual_seed(seed)
    draw = draw or (lambda t, p, g: torch.bernoulli(torch.full_like(t, p), generator=g))
    modules = {}
    for path in sorted(set().union(*(s.modules for s in sources))):
        present = [(s.modules[path], w) for s, w in zip(sources, weights) if path in s.modules]
        if method in FACTORWISE:
            modules[path] = _factorwise(method, present, density, lambda t: draw(t, density, generator))
        elif method == "cat":
            modules[path] = _cat(present)
        else:
            modules[path] = _svd(present, r or max(f.r for s in sources for f in s.modules.values()))
    first = sources[0]
    config = uniform_config(first.config, {p: m.r for p, m in modules.items()})
    tensors = {**factor_tensors(modules), **_heads(sources, weights)}
    write(output, replace(config, base_model_name_or_path=first.config.base_model_name_or_path), tensors,
          first.fan_in_fan_out, first.labels,
          {"command": "combine", "method": method, "sources": [str(a) for a in adapters], "weights": weights,
           "density": density, "seed": seed})
    return {p: m.r for p, m in modules.items()}


def _checked_inputs(adapters, weights, method, density, r) -> list[AdapterFile]:
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not adapters:
        raise ValueError("give at least one adapter to combine")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    needs_density = method in ("ties", "dare_linear", "dare_ties")
    if needs_density and (density is None or not 0 < density <= 1):
        raise ValueError(f"--method {method} needs --density in (0, 1], got {density!r}")
    if r is not None and (method != "svd" or r < 1):
        raise ValueError(f"--r is the rank of --method svd's result and must be >= 1, got {r!r} with {method}")
    sources = [read(a) for a in adapters]
    for s in sources:
        if any(f.magnitude is not None for f in s.modules.values()):
            raise ValueError(f"{s.path} is a DoRA adapter: combining DoRA magnitudes is not defined (PEFT neither)")
        if s.config.lora_bias:
            raise ValueError(f"{s.path} has biases on lora_B (lora_bias): PEFT's add_weighted_adapter does not combine "
                             f"them (the new adapter's B biases keep their fresh initialisation), so combine refuses "
                             f"rather than drop them or differ from PEFT; merge the adapters into the model instead")
        if s.config.bias != "none":
            raise ValueError(f"{s.path} trains biases (bias={s.config.bias!r}): combine does not mix base biases")
    _check_same_base(sources)
    if method in FACTORWISE:
        _check_same_ranks(sources, method)
    _heads(sources, weights)  # refuses mismatched heads now, before any work
    return sources


def _check_same_base(sources: list[AdapterFile]) -> None:
    names = {s.config.base_model_name_or_path for s in sources} - {None}
    if len(names) > 1:
        raise ValueError(f"the adapters name different base models: {sorted(names)}")
    seen = {}
    for s in sources:
        for path, f in s.modules.items():
            shape = (f.b.shape[0], f.a.shape[1])
            if seen.setdefault(path, (shape, s.path))[0] != shape:
                raise ValueError(f"{path}: (d_out, d_in) is {seen[path][0]} in {seen[path][1]} but {shape} in "
                                 f"{s.path}: adapters of different base models")


def _check_same_ranks(sources: list[AdapterFile], method: str) -> None:
    for path in sorted(set().union(*(s.modules for s in sources))):
        ranks = {s.path: s.modules[path].r for s in sources if path in s.modules}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"--method {method} merges A and B entry by entry, so the ranks must agree; {path} has "
                             f"ranks {ranks} (use --method cat or svd)")


def _factorwise(method, present: list[tuple[Factors, float]], density, mask) -> Factors:
    scaled = [w * f.scale for f, w in present]
    weights_a = torch.tensor([abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in scaled])
    weights_b = torch.tensor([abs(x) ** 0.5 for x in scaled])
    a = MERGES[method]([f.a for f, _ in present], weights_a, density, mask)
    b = MERGES[method]([f.b for f, _ in present], weights_b, density, mask)
    f = present[0][0]
    return Factors(a.to(f.a.dtype), b.to(f.b.dtype), 1.0, f.a_shape, f.b_shape, f.keys)


def _cat(present: list[tuple[Factors, float]]) -> Factors:
    a = torch.cat([f.a * w * f.scale for f, w in present])
    b = torch.cat([f.b for f, _ in present], dim=1)
    f = present[0][0]
    return Factors(a, b, 1.0, f.a_shape, f.b_shape, f.keys)


def _svd(present: list[tuple[Factors, float]], rank: int) -> Factors:
    delta = _linear([f.delta() for f, _ in present], torch.tensor([w for _, w in present]), None, None)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.shape[0])
    f = present[0][0]
    return Factors(vh[:rank].contiguous(), (u[:, :rank] @ torch.diag(s[:rank])).contiguous(), 1.0,
                   f.a_shape, f.b_shape, f.keys)


# ---- the task-arithmetic merges of one factor (Yadav et al. 2023 for ties, Yu et al. 2023 for dare) ----

def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.to(tensors.dtype).view(-1, *([1] * (tensors.dim() - 1)))


def _top_share(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _dropped(t: torch.Tensor, density: float, mask) -> torch.Tensor:
    return t if density >= 1 else t * mask(t) / density


def _elect(stacked: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    # sign election on the unweighted, pruned tensors; the mean over the adapters that agree with it
    sign = stacked.sign()
    agree = sign == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _linear(tensors, weights, density, mask):
    return _weighted(torch.stack(tensors), weights).sum(0)


def _ties(tensors, weights, density, mask):
    stacked = torch.stack([_top_share(t, density) for t in tensors])
    return _elect(stacked, _weighted(stacked, weights))


def _dare_linear(tensors, weights, density, mask):
    return _weighted(torch.stack([_dropped(t, density, mask) for t in tensors]), weights).sum(0)


def _dare_ties(tensors, weights, density, mask):
    stacked = torch.stack([_dropped(t, density, mask) for t in tensors])
    return _elect(stacked, _weighted(stacked, weights))


MERGES = {"linear": _linear, "ties": _ties, "dare_linear": _dare_linear, "dare_ties": _dare_ties}


def _heads(sources: list[AdapterFile], weights: list[float]) -> dict[str, torch.Tensor]:
    """The combined modules_to_save tensors (weighted mean), or ValueError when the adapters' heads differ."""
    keysets = [set(s.other) for s in sources]
    if all(not k for k in keysets):
        return {}
    for s, keys in zip(sources, keysets):
        if keys != keysets[0]:
            raise ValueError(f"{s.path} saves {sorted(keys) or 'no head'} but {sources[0].path} saves "
                             f"{sorted(keysets[0]) or 'no head'}: heads can only be combined when every adapter "
                             f"has the same one")
        if s.labels is not None and sources[0].labels is not None and s.labels != sources[0].labels:
            raise ValueError(f"{s.path} has labels {s.labels} but {sources[0].path} has {sources[0].labels}: "
                             f"a combined head would mix different label sets")
        for key in keys:
            if s.other[key].shape != sources[0].other[key].shape:
                raise ValueError(f"{key} has shape {tuple(s.other[key].shape)} in {s.path} but "
                                 f"{tuple(sources[0].other[key].shape)} in {sources[0].path}: different label sets")
    total = sum(weights)
    if total == 0:
        raise ValueError("the weights sum to 0: the heads' weighted mean Σ w_i H_i / Σ w_i is undefined")
    return {key: (sum(s.other[key].double() * w for s, w in zip(sources, weights)) / total).to(
        sources[0].other[key].dtype) for key in keysets[0]}
