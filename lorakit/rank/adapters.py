"""Adapter directories as the rank tools see them: each adapted module's factors (A, B, scale, DoRA magnitude) read
from the file, everything else in it (modules_to_save copies, trained biases) kept as it is, and a new adapter
written back in PEFT's layout with lorakit's config serializer and atomic writers (files.py).

The rank tools work on files, not on a loaded model, so that resizing or combining adapters of a 70B model needs
only the adapters' memory. Only what needs W (amplification, DoRA's effective change, an NF4 base) loads the base
model, through lorakit.io.models.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.config import LoraConfig, replace, to_peft_dict
from ..adapters.files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    atomic_directory,
    check_converted,
    read_adapter,
    read_fan_in_fan_out,
)
from ..data.tables import load_labels as read_labels
from ..nn.kinds import BIAS_FILE_KEY, FILE_KEYS

LABELS_NAME = "labels.json"
FACTOR_KEYS = FILE_KEYS  # PEFT's file names of A and B, per layer kind
MAGNITUDE_KEY = "lora_magnitude_vector"


@dataclass
class Factors:
    """One adapted module: ΔW = scale · B @ A with A flattened to (r, d_in) and B to (d_out, r); `a_shape` and
    `b_shape` are the shapes in the file (Conv2d keeps 4 dims); `magnitude` is DoRA's, else None; `bias` is B's
    bias c as in the file (lora_bias), else None: it adds scale · c to the layer's bias."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    a_shape: tuple = ()
    b_shape: tuple = ()
    keys: tuple[str, str] = FACTOR_KEYS[0]
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """scale · B @ A in float32, (d_out, d_in)."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class AdapterFile:
    """An adapter directory read into memory: its config, modules (path -> Factors), other tensors under their file
    keys (PEFT prefix dropped), whether PEFT stored it fan_in_fan_out, and its label names if it has labels.json."""

    path: str
    config: LoraConfig
    modules: dict[str, Factors]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    labels: list[str] | None = None


def read(path: str | os.PathLike) -> AdapterFile:
    """Read the adapter in directory `path` (lorakit's or PEFT's files). Raises FileNotFoundError / ValueError naming
    the file and what is wrong."""
    config, tensors = read_adapter(path)
    check_converted(config, path)
    modules, used = {}, set()
    for key in tensors:
        for key_a, key_b in FACTOR_KEYS:
            if key.endswith("." + key_a):
                module = key[: -len(key_a) - 1]
                modules[module] = _factors(path, config, tensors, module, key_a, key_b)
                used |= {key, f"{module}.{key_b}", f"{module}.{MAGNITUDE_KEY}", f"{module}.{BIAS_FILE_KEY}"}
    other = {k: v for k, v in tensors.items() if k not in used}
    beside_a = [kb for _, kb in FACTOR_KEYS] + [MAGNITUDE_KEY, BIAS_FILE_KEY]  # each needs its module's lora_A
    stray = [k for k in other if any(k.endswith("." + key) for key in beside_a)]
    if stray:
        raise ValueError(f"{path}: {stray[0]} has no matching lora_A tensor: the adapter file is incomplete")
    if not modules:
        raise ValueError(f"{path}: the adapter file holds no LoRA factors (lora_A/lora_B)")
    return AdapterFile(str(path), config, modules, other, read_fan_in_fan_out(path), read_labels(path))


def _factors(path, config: LoraConfig, tensors: dict, module: str, key_a: str, key_b: str) -> Factors:
    a, b = tensors[f"{module}.{key_a}"], tensors.get(f"{module}.{key_b}")
    if b is None:
        raise ValueError(f"{path}: {module}.{key_a} has no {module}.{key_b} beside it")
    a2, b2 = a.flatten(1), b.flatten(1)
    if b2.shape[1] != a2.shape[0]:
        raise ValueError(f"{path}: {module}: lora_A has rank {a2.shape[0]} but lora_B has {b2.shape[1]} columns")
    if a2.shape[0] != config.rank_for(module):
        raise ValueError(f"{path}: {module} has rank {a2.shape[0]} in the file but {config.rank_for(module)} in "
                         f"adapter_config.json (r / rank_pattern)")
    magnitude, bias = tensors.get(f"{module}.{MAGNITUDE_KEY}"), tensors.get(f"{module}.{BIAS_FILE_KEY}")
    if bias is not None and tuple(bias.shape) != (b2.shape[0],):  # absent: zero (mergekit writes none where
        raise ValueError(f"{path}: {module}.{BIAS_FILE_KEY} has shape {tuple(bias.shape)} but lora_B has "  # no bias)
                         f"{b2.shape[0]} rows")
    # PEFT's embedding A is (r, num_embeddings) and B (embedding_dim, r): B @ A is W's (d_out, d_in) as for Linear
    return Factors(a2, b2, config.scale_for(module), tuple(a.shape), tuple(b.shape), (key_a, key_b), magnitude, bias)


def uniform_config(source: LoraConfig, ranks: dict[str, int], **changes) -> LoraConfig:
    """A config for factors that carry their own scale: scale 1 in every module (alpha = r, no rsLoRA), targets the
    exact module paths, the most common rank as r and the others in rank_pattern (alpha_pattern beside it)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != r}
    return replace(source, r=r, alpha=r, use_rslora=False, use_dora=False, init="kaiming", targets=sorted(ranks),
                   exclude=None, layers_to_transform=None, layers_pattern=None, rank_pattern=pattern,
                   alpha_pattern=dict(pattern), **changes)


def factor_tensors(modules: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """File tensors (keys without PEFT's prefix) of `modules`, A and B reshaped to their file shapes."""
    out = {}
    for path, f in modules.items():
        key_a, key_b = f.keys
        a_shape = (f.r, *f.a_shape[1:]) if f.a_shape else tuple(f.a.shape)
        b_shape = (f.b.shape[0], f.r, *f.b_shape[2:]) if f.b_shape else tuple(f.b.shape)
        out[f"{path}.{key_a}"] = f.a.reshape(a_shape).contiguous()
        out[f"{path}.{key_b}"] = f.b.reshape(b_shape).contiguous()
        if f.bias is not None:
            out[f"{path}.{BIAS_FILE_KEY}"] = f.bias.contiguous()
    return out


def write(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor],
          fan_in_fan_out: bool = False, labels: list[str] | None = None, report: dict | None = None) -> Path:
    """Write an adapter directory atomically: adapter_config.json (lorakit's PEFT serializer), adapter_model.safetensors
    (keys under PEFT's prefix), labels.json when label names are known, rank_report.json when `report` is given.
    The directory appears complete or not at all; one that exists is replaced."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = to_peft_dict(config, fan_in_fan_out=fan_in_fan_out)
    weights = {PREFIX + k: v.detach().contiguous() for k, v in tensors.items()}

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if labels:
            (tmp / LABELS_NAME).write_text(json.dumps(list(labels)) + "\n")
        if report is not None:
            (tmp / "rank_report.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_directory(out, fill)
    return out


def check_rank_or_energy(r: int | None, energy: float | None) -> None:
    """Exactly one of r (an integer >= 1) and energy (in (0, 1]); ValueError otherwise."""
    if (r is None) == (energy is None):
        raise ValueError("give exactly one of --r (a rank) and --energy (a share of ‖ΔW‖²_F to keep)")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"--r must be an integer >= 1, got {r!r}")
    if energy is not None and not (0 < energy <= 1):
        raise ValueError(f"--energy must be in (0, 1], got {energy!r}")
