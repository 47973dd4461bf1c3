"""`resize`: an adapter re-factored to a lower rank by the SVD of each module's ΔW = scale · B·A.

The SVD comes from the factors (spectra.factored_svd), never from the full ΔW, so resizing a large model's adapter
costs little. Keeping r' ≥ rank(ΔW) directions reproduces ΔW exactly (up to round-off); fewer keeps its top r'
singular directions, the best rank-r' approximation (Eckart–Young). The new factors carry the scale (alpha = r per
module), the singular values split evenly between A and B. Everything else in the file (a head, biases) is kept;
B's bias (lora_bias) is kept as the same change to the layer's bias, rescaled to the new scale.
"""

from __future__ import annotations

from pathlib import Path

from . import spectra
from .adapters import Factors, check_rank_or_energy, factor_tensors, read, uniform_config, write


def resize(adapter: str | Path, output: str | Path, r: int | None = None, energy: float | None = None) -> dict:
    """Write `adapter` resized to rank `r` (at most each module's current rank) or, with `energy`, to the fewest
    directions per module holding that share of ‖ΔW‖²_F. Returns {path: {"r_old", "r", "energy_kept"}}, also
    written to the output's rank_report.json. DoRA adapters are refused: their magnitude vector is fitted to B·A."""
    check_rank_or_energy(r, energy)
    source = read(adapter)
    if any(f.magnitude is not None for f in source.modules.values()):
        raise ValueError(f"{adapter} is a DoRA adapter: its magnitude vector is tied to the exact B·A, so a resized "
                         f"B·A would change the model unpredictably; resize plain LoRA adapters")
    modules, report = {}, {}
    for path, f in sorted(source.modules.items()):
        u, s, vh = spectra.factored_svd(f.a, f.b, f.scale)
        keep = min(r, f.r) if r is not None else spectra.rank_for_energy(s, energy)
        a, b = spectra.split(u[:, :keep], s[:keep], vh[:keep], dtype=f.a.dtype)
        bias = None if f.bias is None else (f.bias.float() * f.scale).to(f.bias.dtype)  # same s · c at scale 1
        modules[path] = Factors(a, b, 1.0, f.a_shape, f.b_shape, f.keys, bias=bias)
        report[path] = {"r_old": f.r, "r": keep, "energy_kept": spectra.energy_kept(s, keep)}
    config = uniform_config(source.config, {p: m.r for p, m in modules.items()})
    write(output, config, {**factor_tensors(modules), **source.other}, source.fan_in_fan_out, source.labels,
          {"command": "resize", "source": str(adapter), "modules": report})
    return report
