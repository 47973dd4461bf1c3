"""`extract`: a full fine-tune turned into a LoRA adapter by truncated SVD of W_tuned − W_base per module.

The two checkpoints are read tensor by tensor from their safetensors shards (safe_open memory-maps a file; only the
tensors being compared are ever in memory), so a model larger than memory extracts in about the memory of its
largest layer. The model itself is only built as a skeleton without memory (accelerate's init_empty_weights) to
know its module types and names, and to map checkpoint keys to model keys (a base checkpoint without the task
model's prefix, as from_pretrained accepts it).

Per target module (default: every Linear/Conv1D but the output head): ΔW's top-r singular directions, or per module
the fewest holding `energy` of ‖ΔW‖²_F (then per-module ranks in rank_pattern); its relative error
‖ΔW − ΔW_r‖_F / ‖ΔW‖_F. Every other changed tensor is kept exactly: its module in modules_to_save (a task head as
the whole head), a changed bias of a target module through PEFT's bias="all". `heads_only` keeps just the heads
and reports what it drops.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters.config import LoraConfig
from ..adapters.parts import HEAD_NAMES, default_task_type, plan_targets, task_heads
from ..io.checkpoints import checkpoint_files, key_map, local_checkpoint
from ..nn.kinds import CONV1D, kind_of
from . import spectra
from .adapters import Factors, check_rank_or_energy, factor_tensors, uniform_config, write


@dataclass
class Checkpoint:
    """One checkpoint's tensors by model key: (file, key in the file, shape)."""

    directory: Path
    tensors: dict[str, tuple[Path, str, tuple]] = field(default_factory=dict)


@dataclass
class Plan:
    """What the stream found: factors per target, changed modules outside the targets, unchanged targets."""

    factors: dict[str, Factors] = field(default_factory=dict)
    report: dict[str, dict] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # owner modules of changed non-target tensors
    target_bias_changed: bool = False
    unchanged: list[str] = field(default_factory=list)


def extract(base: str, tuned: str, output: str | Path, r: int | None = None, energy: float | None = None,
            targets: list[str] | str | None = None, heads_only: bool = False) -> dict:
    """Write the LoRA adapter that best approximates `tuned` − `base` to `output`; returns the report (also in the
    output's rank_report.json): per module r, relative_error and energy_kept; modules_to_save; unchanged and
    dropped modules. Shapes, names and options are all checked before any SVD runs."""
    check_rank_or_energy(r, energy)
    base_dir, tuned_dir = _directory(base), _directory(tuned)
    skeleton = _skeleton(tuned_dir)
    keys = key_map(skeleton)
    first, second = _index(base_dir, keys), _index(tuned_dir, keys)
    _check_shapes(first, second)
    wanted = plan_targets(skeleton, LoraConfig(r=1, targets=targets or "all-linear", modules_to_save=[]))
    modules = dict(skeleton.named_modules())
    matrices = [p for p in wanted if not kind_of(modules[p]).linear]
    if matrices:  # an Embedding's or a Conv2d's change has another layout and other PEFT keys than B·A of a Linear
        raise ValueError(f"extract factors Linear and Conv1D layers; {matrices[:3]} are "
                         f"{sorted({kind_of(modules[p]).name for p in matrices})}: leave them out of --targets")
    plan = _stream(first, second, {p: modules[p] for p in wanted}, r, energy)
    if not plan.factors:
        raise ValueError(f"{tuned} does not differ from {base} in any target module: nothing to extract")
    saved = _saved_modules(plan.changed, set(modules))
    dropped = sorted(m for m in saved if m.split(".")[0] not in HEAD_NAMES) if heads_only else []
    saved = [m for m in saved if m not in dropped]
    bias = "all" if plan.target_bias_changed and not heads_only else "none"
    tensors = {**factor_tensors(plan.factors), **_kept_tensors(second, saved, bias, set(plan.factors), modules)}
    task = default_task_type(skeleton)
    task = task if task_heads(skeleton, task) and set(task_heads(skeleton, task)) <= set(saved) else None
    config = uniform_config(LoraConfig(targets=sorted(plan.factors)), {p: f.r for p, f in plan.factors.items()},
                            modules_to_save=saved, bias=bias, task_type=task, base_model_name_or_path=str(base))
    report = {"command": "extract", "base": str(base), "tuned": str(tuned), "modules": plan.report,
              "modules_to_save": saved, "bias": bias, "unchanged": plan.unchanged,
              "dropped": dropped + (["biases of target modules"] if heads_only and plan.target_bias_changed else [])}
    write(output, config, tensors, any(kind_of(modules[p]) is CONV1D for p in plan.factors), _labels(skeleton),
          report)
    return report


def _directory(name: str) -> Path:
    from ..errors import ConfigError
    from ..io.models import resolve_model

    try:
        directory = local_checkpoint(resolve_model(name))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if checkpoint_files(directory) is None:
        raise ValueError(f"{name}: no safetensors weights (model.safetensors or its index); extract reads only "
                         f"safetensors (save the model with safe_serialization=True)")
    return directory


def _skeleton(directory: Path):
    """The tuned model's architecture with no memory behind its parameters."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(directory)
    names = config.architectures or ["AutoModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"{directory}: unknown architecture {names[0]!r} in config.json")
    with init_empty_weights(include_buffers=False):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)


def _index(directory: Path, keys: dict[str, str]) -> Checkpoint:
    out = Checkpoint(directory)
    for file in checkpoint_files(directory):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in keys:
                    out.tensors[keys[key]] = (file, key, tuple(f.get_slice(key).get_shape()))
    if not out.tensors:
        raise ValueError(f"{directory}: no tensor of this checkpoint belongs to the tuned model's architecture")
    return out


def _check_shapes(base: Checkpoint, tuned: Checkpoint) -> None:
    for key, (_, _, shape) in tuned.tensors.items():
        if key in base.tensors and base.tensors[key][2] != shape:
            raise ValueError(f"{key}: shape {shape} in the tuned model ({tuned.directory}) but {base.tensors[key][2]} "
                             f"in the base ({base.directory}): not a fine-tune of this base model")
    missing = sorted(set(base.tensors) - set(tuned.tensors))
    if missing:
        raise ValueError(f"the tuned model ({tuned.directory}) has no {missing[:3]}, which the base has: not the "
                         f"same architecture")


def _stream(base: Checkpoint, tuned: Checkpoint, targets: dict, r: int | None, energy: float | None) -> Plan:
    plan = Plan()
    with ExitStack() as files:
        opened = {}

        def tensor(ckpt: Checkpoint, key: str) -> torch.Tensor:
            file, name, _ = ckpt.tensors[key]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(file, framework="pt"))
            return opened[file].get_tensor(name)

        for key in sorted(tuned.tensors):
            owner, _, attr = key.rpartition(".")
            new = tensor(tuned, key)
            old = tensor(base, key) if key in base.tensors else None
            if old is not None and torch.equal(old, new):
                if owner in targets and attr == "weight":
                    plan.unchanged.append(owner)
                continue
            if owner in targets and attr == "weight" and old is not None:
                _factorize(plan, owner, targets[owner], new.float() - old.float(), r, energy)
            elif owner in targets and attr == "bias":
                plan.target_bias_changed = True
            else:
                plan.changed.add(owner)
    return plan


def _factorize(plan: Plan, path: str, module, delta: torch.Tensor, r: int | None, energy: float | None) -> None:
    if kind_of(module) is CONV1D:
        delta = delta.T  # GPT-2's Conv1D stores W as (d_in, d_out)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(r, s.shape[0]) if r is not None else spectra.rank_for_energy(s, energy)
    a, b = spectra.split(u[:, :keep], s[:keep], vh[:keep])
    plan.factors[path] = Factors(a, b, 1.0)
    kept = spectra.energy_kept(s, keep)
    plan.report[path] = {"r": keep, "relative_error": max(0.0, 1 - kept) ** 0.5, "energy_kept": kept,
                         "effective_rank_90": spectra.rank_for_energy(s, 0.9)}


def _saved_modules(changed: set[str], modules: set[str]) -> list[str]:
    """The modules_to_save that hold the changed tensors: a task head whole, else each tensor's own module."""
    out = set()
    for owner in changed:
        top = owner.split(".")[0]
        out.add(top if top in HEAD_NAMES and top in modules else owner)
    return sorted(out)


def _kept_tensors(tuned: Checkpoint, saved: list[str], bias: str, targets: set[str], modules: dict) -> dict:
    """The tuned values of the saved modules' tensors (under their own names, as PEFT's modules_to_save) and, for
    bias="all", of every bias outside them (`<path>.base_layer.bias` in a target, as PEFT names it)."""
    out = {}
    for key in tuned.tensors:
        owner = key.rpartition(".")[0]
        if any(key.startswith(m + ".") for m in saved):
            out[key] = key
        elif bias == "all" and key.endswith(".bias") and isinstance(getattr(modules.get(owner), "bias", None),
                                                                    torch.nn.Parameter):
            out[f"{owner}.base_layer.bias" if owner in targets else key] = key
    with ExitStack() as files:
        opened = {}
        values = {}
        for name, key in out.items():
            file, inner, _ = tuned.tensors[key]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(file, framework="pt"))
            values[name] = opened[file].get_tensor(inner).clone()
    return values


def _labels(skeleton) -> list[str] | None:
    id2label = getattr(skeleton.config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None
