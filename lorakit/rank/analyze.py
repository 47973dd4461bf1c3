"""`analyze`: what an adapter changes, module by module (spectra.py has the quantities).

A plain LoRA's ΔW = scale · B·A comes from the file alone. The base weights W are needed for ‖ΔW‖/‖W‖ and the
amplification factor (--base), and for DoRA, whose effective change m/‖W + sBA‖ ⊙ (W + sBA) − W depends on W: then
the base model is loaded with the adapter through lorakit (an NF4 adapter's base quantized as in training, so W is
the dequantized weight the adapter was trained on) and each layer's own `delta` and `base_matrix` are used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import spectra
from .adapters import AdapterFile, read

SIMILARITY_SOURCES = ("A", "delta")


def analyze(adapter: str | Path, base: str | None = None, compare: str | Path | None = None,
            similarity_of: str = "A", seed: int = 0) -> dict:
    """{"modules": {path: {...}}} for every module the adapter adapts: r, singular_values, effective_rank_90/99,
    norm; relative_norm and amplification with `base`; similarity (a grid φ[i][j] and what it was computed from)
    with `compare`. All inputs are checked before any model is loaded."""
    if similarity_of not in SIMILARITY_SOURCES:
        raise ValueError(f"--similarity-of must be one of {SIMILARITY_SOURCES}, got {similarity_of!r}")
    first = read(adapter)
    other = read(compare) if compare is not None else None
    if other is not None:
        _check_comparable(first, other)
    dora = any(f.magnitude is not None for f in first.modules.values()) or (
        other is not None and similarity_of == "delta" and any(f.magnitude is not None for f in other.modules.values()))
    layers = _model_layers(first, other, base) if base is not None or dora else None
    out = {}
    for path, factors in sorted(first.modules.items()):
        layer = layers[path] if layers else None
        out[path] = _module_report(factors, layer, base is not None, seed)
        if other is not None and path in other.modules:
            out[path]["similarity"] = _similarity(factors, other.modules[path], layer, similarity_of)
    return {"modules": out}


def _check_comparable(first: AdapterFile, other: AdapterFile) -> None:
    common = set(first.modules) & set(other.modules)
    if not common:
        raise ValueError(f"{other.path} adapts none of the modules {first.path} adapts "
                         f"(e.g. {sorted(first.modules)[0]!r}): nothing to compare")
    for path in sorted(common):
        a, b = first.modules[path], other.modules[path]
        if (a.a.shape[1], a.b.shape[0]) != (b.a.shape[1], b.b.shape[0]):
            raise ValueError(f"{path}: {first.path} has (d_out, d_in) = {(a.b.shape[0], a.a.shape[1])} but "
                             f"{other.path} has {(b.b.shape[0], b.a.shape[1])}: adapters of different base models")


def _model_layers(first: AdapterFile, other: AdapterFile | None, base: str | None) -> dict:
    """{path: LoraLayer} of the base model with `first` loaded as "a" (and `other` as "b"). The weights are read as
    `lorakit eval` reads them (io/models.load_weights: load_model without the tokenizer; an NF4 adapter's base
    quantized while loading)."""
    from ..adapters.attach import load_adapter
    from ..adapters.parts import lora_layers
    from ..errors import ConfigError
    from ..io.models import load_weights, resolve_model
    from ..training.tasks import task_of

    name = base or first.config.base_model_name_or_path
    if name is None:
        raise ValueError(f"{first.path} is a DoRA adapter: its effective change depends on the base weights; "
                         f"pass --base MODEL (the adapter does not name its base model)")
    try:
        path = resolve_model(name)
        task = task_of(path, first.config, None)
        model = load_weights(path, task, first.labels or _head_labels(first), quantize=first.config.quantize)
        load_adapter(model, first.path, name="a")
        if other is not None:
            load_adapter(model, other.path, name="b")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return lora_layers(model)


def _head_labels(adapter: AdapterFile) -> list[str] | None:
    # A classification head saved without labels.json: as many labels as the head has output rows.
    rows = [t.shape[0] for k, t in adapter.other.items()
            if k.split(".")[0] in ("classifier", "score") and k.endswith("weight") and t.dim() == 2]
    return [str(i) for i in range(rows[-1])] if rows else None


def _module_report(factors, layer, with_base: bool, seed: int) -> dict:
    if layer is not None and factors.magnitude is not None:
        delta = layer.delta("a").double()
        sigma = spectra.singular_values(delta)
    else:
        u, sigma, vh = spectra.factored_svd(factors.a, factors.b, factors.scale)
        delta = None
    keep = max(factors.r, spectra.rank_for_energy(sigma, 0.99))
    report = {"r": factors.r, **spectra.spectrum(sigma, keep)}
    if factors.bias is not None:  # lora_bias: the change to the layer's bias, s · c, outside ΔW's spectrum
        report["bias_norm"] = (factors.bias.double() * factors.scale).norm().item()
    if with_base:
        weight = layer.base_matrix().detach().double()
        delta = delta if delta is not None else factors.delta().double()
        report["relative_norm"] = report["norm"] / torch.linalg.matrix_norm(weight).item()
        report["amplification"] = spectra.amplification(delta, weight, factors.r, seed)
    return report


def _similarity(first, second, layer, source: str) -> dict:
    if source == "A":
        v1, v2 = spectra.right_singular_vectors(first.a), spectra.right_singular_vectors(second.a)
    else:
        v1, v2 = _delta_basis(first, layer, "a"), _delta_basis(second, layer, "b")
    grid = spectra.similarity(v1, v2)
    return {"of": "right singular vectors of A" if source == "A" else "right singular vectors of ΔW",
            "grid": [[round(x, 6) for x in row] for row in grid.tolist()]}


def _delta_basis(factors, layer, name: str) -> torch.Tensor:
    if factors.magnitude is not None:
        _, _, vh = torch.linalg.svd(layer.delta(name).double(), full_matrices=False)
        return vh[: factors.r]
    return spectra.factored_svd(factors.a, factors.b, factors.scale)[2]
