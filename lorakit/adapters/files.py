"""Adapter files in Hugging Face PEFT's layout: adapter_config.json + adapter_model.safetensors: the format alone,
written from a model and read into configs and tensors (attach.py puts what is read onto a model).

In the model, lorakit keeps the base model's own parameter names (`<path>.weight`) and the adapters beside them
(`<path>.lora_A.<name>`). PEFT's file names differ (`base_model.model.<path>.lora_A.weight`, adapter name dropped).
`adapter_tensors` lists one adapter's tensors under PEFT's names (without the prefix), found by type; it serves both
saving and loading, and `_file_key` / `_parse_file_key` add and drop the prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..nn.kinds import BIAS_FILE_KEY
from ..nn.layers import LoraLayer
from .config import LoraConfig, from_peft_dict, replace, to_peft_dict
from .parts import (
    base_biases,
    configs,
    default_task_type,
    lora_layers,
    saved_modules,
    task_heads,
    unwrap,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _file_key(key: str) -> str:
    return PREFIX + key


def _parse_file_key(key: str) -> str:
    """The in-model dotted name a file key refers to (PEFT prefix dropped); tolerates files written without it."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


# ---- one adapter's tensors under PEFT's names ----

def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{file key without PEFT's prefix: live tensor} for adapter `name`: LoRA A/B (DoRA magnitudes, B's biases), its
    modules_to_save copies, and the biases its config's bias setting trains."""
    root = unwrap(model)
    out = {}
    for path, layer in lora_layers(root).items():
        if name in layer.adapters:
            key_a, key_b = layer.kind.file_keys
            out[f"{path}.{key_a}"], out[f"{path}.{key_b}"] = layer.lora_A[name], layer.lora_B[name]
            if name in layer.lora_magnitude_vector:
                out[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
            if name in layer.lora_B_bias:
                out[f"{path}.{BIAS_FILE_KEY}"] = layer.lora_B_bias[name]
    for path, wrapper in saved_modules(root).items():
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = value
    adapted = {path for path, layer in lora_layers(root).items() if name in layer.adapters}
    return {**out, **bias_tensors(root, configs(root)[name].bias, adapted)}


def bias_tensors(model: nn.Module, bias: str, adapted: set[str]) -> dict[str, torch.Tensor]:
    """{file key: bias} of the base biases an adapter saves: none; those of the layers it adapts (`adapted`) for
    "lora_only"; every base bias for "all". An adapted layer's bias is PEFT's `<path>.base_layer.bias`."""
    if bias == "none":
        return {}
    biases = base_biases(model)
    if bias == "lora_only":
        return {f"{path}.base_layer.bias": biases[path] for path in adapted if path in biases}
    return {f"{path}.base_layer.bias" if path in adapted else f"{path}.bias": b for path, b in biases.items()}


# ---- saving ----

def adapter_state_dict(model: nn.Module, name: str = "default",
                       gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys: LoRA A/B, modules_to_save copies, trained biases. A PiSSA
    adapter is written as the plain LoRA it amounts to on the original weight (`_pissa_as_plain_lora`). `gather`
    makes each tensor whole (runtime.sharding passes FSDP's gathering; this module knows nothing of processes)."""
    root = unwrap(model)
    if name not in configs(root):
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs(root))}")
    out = {_file_key(key): gather(t.detach()) for key, t in adapter_tensors(root, name).items()}
    out.update(_unmerged_base_biases(root, out))
    for path, layer in lora_layers(root).items():
        start = layer.adapters[name].pissa_start if name in layer.adapters else None
        if start is not None:  # ΔW = s·(BA − B0A0) on the original W: a rank-2r LoRA [B, −B0] @ [A; A0]
            key_a, key_b = (_file_key(f"{path}.{k}") for k in layer.kind.file_keys)
            out[key_a] = torch.cat([out[key_a], start[0].to(out[key_a])])
            out[key_b] = torch.cat([out[key_b], -start[1].to(out[key_b])], dim=1)
    return {k: v.contiguous() for k, v in out.items()}


def _unmerged_base_biases(root: nn.Module, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A trained base bias (bias="lora_only"/"all") of a layer with merged lora_bias adapters holds their s · c too:
    # the file gets the bias without them, as for W (merging never changes what the file holds).
    fixed = {}
    for path, layer in lora_layers(root).items():
        merged = [n for n in layer.merged if n in layer.lora_B_bias]
        for key in (_file_key(f"{path}.base_layer.bias"), _file_key(f"{path}.bias")):
            if merged and key in out:
                folded = sum(layer.lora_B_bias[n].detach().float() * layer.adapters[n].scale for n in merged)
                fixed[key] = (out[key].float() - folded.to(out[key].device)).to(out[key].dtype)
    return fixed


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, write: bool = True) -> Path:
    """Write adapter `name` to directory `path` as adapter_config.json + adapter_model.safetensors (PEFT's layout,
    loadable with `peft.PeftModel.from_pretrained`). Each file is written to a temp file, then renamed into place.
    Saving a merged model is fine: the merge changes W, never A or B. task_type (given, the config's, or the model
    class's) is written only when the file holds the head that PEFT's task expects (parts.TASK_HEADS); else null.
    `gather` and `write` are for processes (runtime.sharding.save_adapter, the one `lorakit.save_adapter` is): each
    tensor is gathered whole, then only the process told to `write` writes."""
    root = unwrap(model)
    tensors = adapter_state_dict(root, name, gather)  # collective under FSDP: before anything a process may skip
    config = configs(root)[name]
    base = base_model_name_or_path or config.base_model_name_or_path or getattr(
        getattr(root, "config", None), "_name_or_path", None) or None
    task = task_type or config.task_type or default_task_type(root)
    if not set(task_heads(root, task)) <= {p for p, w in saved_modules(root).items() if name in w.modules_to_save}:
        task = None  # head not saved: PEFT's task model would expect its tensors; with no task PEFT keeps it as is
    targets = config.targets
    if targets is None or targets == "all-linear":  # PEFT writes the names it resolved; so do we
        targets = sorted({p.rsplit(".", 1)[-1] for p, layer in lora_layers(root).items() if name in layer.adapters})
    if config.init == "pissa":
        config = _pissa_as_plain_lora(config)
    fan_in_fan_out = any(_stores_transposed(layer) for layer in lora_layers(root).values() if name in layer.adapters)
    data = to_peft_dict(replace(config, targets=targets, base_model_name_or_path=base, task_type=task),
                        fan_in_fan_out=fan_in_fan_out)
    out = Path(path)
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
    return out


def _stores_transposed(layer: LoraLayer) -> bool:
    # PEFT's fan_in_fan_out: a GPT-2 Conv1D base (also when held in NF4, which remembers its source layout).
    return layer.kind.transposed or getattr(layer.base_layer, "transposed", False)


def _pissa_as_plain_lora(config: LoraConfig) -> LoraConfig:
    # The file holds rank-2r factors (see adapter_state_dict); r and alpha change so that every scale stays the same.
    alpha_factor = 2 ** 0.5 if config.use_rslora else 2
    return replace(config, init="kaiming", r=2 * config.r, alpha=config.alpha * alpha_factor,
                   rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                   alpha_pattern={k: v * alpha_factor for k, v in config.alpha_pattern.items()},
                   extra={**config.extra, "lorakit_converted_from": "pissa"})


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file beside `target`, then rename it into place: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_directory(target: Path, fill: Callable[[Path], None]) -> None:
    """Call fill(tmp_dir) on a temp directory beside `target`, then put it in place of `target` (replaced if present)."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- loading ----

def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig stored in an adapter directory (PEFT's or lorakit's adapter_config.json)."""
    return from_peft_dict(_config_json(path))


def read_fan_in_fan_out(path: str | os.PathLike) -> bool:
    """PEFT's fan_in_fan_out of the adapter in `path`: whether its base stores W as (d_in, d_out) (GPT-2's Conv1D).
    LoraConfig leaves it out (lorakit finds it from the layer's type); a file rewritten from another must keep it."""
    return bool(_config_json(path).get("fan_in_fan_out"))


def _config_json(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not an adapter directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def check_converted(config: LoraConfig, where: str | os.PathLike) -> None:
    """ValueError if `config` is a PiSSA adapter PEFT saved without conversion: its factors describe a change to
    PEFT's residual model, not to the base, so nothing that applies them to the base may read it."""
    if config.init == "pissa":
        raise ValueError(f"adapter {str(where)!r} is a PiSSA adapter saved without conversion: it only applies to the "
                         f"residual model PEFT saved with it, not to the original base (save it with PEFT's "
                         f"path_initial_model_for_weight_conversion, or with lorakit, which converts)")


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors under file keys without PEFT's prefix) of the adapter in `path`: each file read once."""
    config = read_adapter_config(path)  # first: a directory without one is not an adapter at all
    tensors = {_parse_file_key(k): v for k, v in read_adapter_tensors(path).items()}
    return with_file_biases(config, tensors, path), tensors


def with_file_biases(config: LoraConfig, keys, path) -> LoraConfig:
    """`config` with lora_bias=True when the file holds lora_B biases its config does not announce, with a warning.
    mergekit-extract-lora writes such files: the fine-tune's bias change as lora_B.bias at scale 1, and no lora_bias
    key. PEFT would drop those biases; lorakit applies them, and saves the adapter with lora_bias: true."""
    if config.lora_bias or not any(k.endswith("." + BIAS_FILE_KEY) for k in keys):
        return config
    warnings.warn(f"{path}: the file holds {BIAS_FILE_KEY} tensors but adapter_config.json does not say "
                  f"\"lora_bias\": true (as mergekit-extract-lora writes it); loading them as lora_bias=True (PEFT "
                  f"would drop them)", stacklevel=3)
    return replace(config, lora_bias=True)


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors in `path` (never a pickle file)."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        pickled = Path(path) / "adapter_model.bin"
        hint = (" (found adapter_model.bin: lorakit does not load pickle files; re-save it as safetensors with PEFT)"
                if pickled.exists() else "")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}{hint}")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
