"""Adapter files in Hugging Face PEFT's layout: adapter_config.json + adapter_model.safetensors.

In the model, lorakit keeps the base model's own parameter names (`<path>.weight`) and the adapters beside them
(`<path>.lora_A.<name>`). PEFT's file names differ (`base_model.model.<path>.lora_A.weight`, adapter name dropped);
`_file_key` and `_parse_file_key` are the one translation each way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig, from_peft_dict, replace, to_peft_dict
from .inject import _add, _mark_trainable, check_new_name, configs, delete_adapter, lora_layers, plan_saved_modules, plan_targets
from .inject import default_task_type, saved_modules, set_adapter, task_heads, unwrap
from .layers import SavedModule, layer_dims, layer_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = {"linear": ("lora_A.weight", "lora_B.weight"), "conv1d": ("lora_A.weight", "lora_B.weight"),
                  "conv2d": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}


def _file_key(path: str, tensor: str) -> str:
    return f"{PREFIX}{path}.{tensor}"


def _parse_file_key(key: str) -> str:
    """The in-model dotted name a file key refers to (PEFT prefix dropped); tolerates files written without it."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


# ---- saving ----

def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys: LoRA A/B, modules_to_save copies, trained biases."""
    root = unwrap(model)
    if name not in configs(root):
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs(root))}")
    bias = configs(root)[name].bias
    out = {}
    for path, layer in lora_layers(root).items():
        if name not in layer.lora_A:
            continue
        key_a, key_b = _LORA_SUFFIXES[layer.kind]
        a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        if name in layer.pissa_init:  # ΔW = s·(BA − B0A0) on the original W: a rank-2r LoRA [B, −B0] @ [A; A0]
            a0, b0 = layer.pissa_init[name]
            a, b = torch.cat([a, a0.to(a)]), torch.cat([b, -b0.to(b)], dim=1)
        out[_file_key(path, key_a)] = a
        out[_file_key(path, key_b)] = b
        if name in layer.lora_magnitude_vector:
            out[_file_key(path, "lora_magnitude_vector")] = layer.lora_magnitude_vector[name]
        if bias != "none" and layer.bias is not None:
            out[_file_key(path, "base_layer.bias")] = layer.bias
    for path, wrapper in saved_modules(root).items():
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                out[_file_key(path, key)] = value
    if bias == "all":
        adapted = set(lora_layers(root))
        inside_saved = tuple(p + "." for p in saved_modules(root))
        for pname, p in root.named_parameters():
            owner = pname.rsplit(".", 1)[0]
            if pname.endswith("bias") and owner not in adapted and not pname.startswith(inside_saved):
                out[PREFIX + pname] = p
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write adapter `name` to directory `path` as adapter_config.json + adapter_model.safetensors (PEFT's layout,
    loadable with `peft.PeftModel.from_pretrained`). Each file is written to a temp file, then renamed into place.
    Saving a merged model is fine: the merge changes W, never A or B. task_type (given, the config's, or the model
    class's) is written only when the file holds the head that PEFT's task expects (TASK_HEADS); else null."""
    root = unwrap(model)
    tensors = adapter_state_dict(root, name)
    config = configs(root)[name]
    base = base_model_name_or_path or config.base_model_name_or_path or getattr(
        getattr(root, "config", None), "_name_or_path", None) or None
    task = task_type or config.task_type or default_task_type(root)
    if not set(task_heads(root, task)) <= {p for p, w in saved_modules(root).items() if name in w.modules_to_save}:
        task = None  # head not saved: PEFT's task model would expect its tensors; with no task PEFT keeps it as is
    targets = config.targets
    if targets is None or targets == "all-linear":  # PEFT writes the names it resolved; so do we
        targets = sorted({p.rsplit(".", 1)[-1] for p, layer in lora_layers(root).items() if name in layer.lora_A})
    if config.init == "pissa":
        config = _pissa_as_plain_lora(config)
    fan_in_fan_out = any(layer.kind == "conv1d" for layer in lora_layers(root).values() if name in layer.lora_A)
    data = to_peft_dict(replace(config, targets=targets, base_model_name_or_path=base, task_type=task),
                        fan_in_fan_out=fan_in_fan_out)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
    return out


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
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not an adapter directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return from_peft_dict(data)


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


def _expected_tensors(root: nn.Module, config: LoraConfig, plan: dict, saved: list[str]) -> dict[str, tuple]:
    # {in-model name under PEFT's file naming: expected shape} for everything `config` puts in a file.
    expected = {}
    for path, (r, _) in plan.items():
        layer = root.get_submodule(path)
        d_in, d_out = layer_dims(layer)
        key_a, key_b = _LORA_SUFFIXES[layer_kind(layer)]
        if layer_kind(layer) == "conv2d":
            expected[f"{path}.{key_a}"] = (r, *layer.weight.shape[1:])
            expected[f"{path}.{key_b}"] = (d_out, r, 1, 1)
        else:
            expected[f"{path}.{key_a}"] = (r, d_in)
            expected[f"{path}.{key_b}"] = (d_out, r)
        if config.use_dora:
            expected[f"{path}.lora_magnitude_vector"] = (d_out,)
    for path in saved:
        module = root.get_submodule(path)
        module = module.original_module if isinstance(module, SavedModule) else module
        for key, value in module.state_dict().items():
            expected[f"{path}.{key}"] = tuple(value.shape)
    return expected


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load the adapter in directory `path` (written by lorakit or PEFT) as adapter `name`, injecting LoRA layers
    where needed. It becomes active if no adapter was active. Everything is checked before the model changes;
    if anything fails the model is left exactly as it was."""
    root = unwrap(model)
    check_new_name(root, name)
    config = read_adapter_config(path)
    if config.init == "pissa":
        raise ValueError(f"adapter {str(path)!r} is a PiSSA adapter saved without conversion: it only applies to the "
                         f"residual model PEFT saved with it, not to the original base (save it with PEFT's "
                         f"path_initial_model_for_weight_conversion, or with lorakit, which converts)")
    tensors = {_parse_file_key(k): v for k, v in read_adapter_tensors(path).items()}
    try:
        plan = plan_targets(root, config)
    except ValueError as e:
        raise ValueError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    saved = plan_saved_modules(root, config, strict=False)  # PEFT lists e.g. "score" beside "classifier"
    expected = _expected_tensors(root, config, plan, saved)
    biases = {k for k in tensors if k.endswith("bias") and k not in expected}
    _check_tensors(path, expected, tensors, biases, root)
    first = not configs(root)
    overwritten = []  # trained biases are base parameters: keep their old values to undo a failed load
    try:
        _add(root, replace(config, init="zeros"), name, plan, saved)
        with torch.no_grad():
            for key, value in tensors.items():
                target = _param_for_key(root, key, name)
                if key in biases:
                    overwritten.append((target, target.detach().clone()))
                target.copy_(value)
    except BaseException:
        with torch.no_grad():
            for target, old in overwritten:
                target.copy_(old)
        if name in configs(root):
            delete_adapter(root, name)
        raise
    if trainable:
        _mark_trainable(root, name)
    else:
        for key in tensors:
            if key not in biases:
                _param_for_key(root, key, name).requires_grad_(False)
        if first:
            for p in root.parameters():
                p.requires_grad_(False)
    set_adapter(root, getattr(root, "lora_active", None) or name)
    return model


def _check_tensors(path, expected: dict, tensors: dict, biases: set, root: nn.Module) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(expected) - biases)
    if missing or unexpected:
        raise ValueError(f"adapter {str(path)!r} does not fit this model: "
                         + (f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; " if missing else "")
                         + (f"tensors for no target {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}" if unexpected else ""))
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if found != shape:
            module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
            raise ValueError(f"adapter {str(path)!r} does not fit this model: {key} has shape {found}, "
                             f"module {module!r} expects {shape}")
    params = dict(root.named_parameters())
    for key in biases:
        target = key.replace(".base_layer.bias", ".bias")
        if target not in params or tuple(params[target].shape) != tuple(tensors[key].shape):
            raise ValueError(f"adapter {str(path)!r} does not fit this model: bias {key} matches no parameter of shape "
                             f"{tuple(tensors[key].shape)}")


def _param_for_key(root: nn.Module, key: str, name: str) -> torch.Tensor:
    # Inverse of adapter_state_dict's naming, once the layers exist.
    for suffix, attr in (("lora_A.weight", "lora_A"), ("lora_B.weight", "lora_B"), ("lora_embedding_A", "lora_A"),
                         ("lora_embedding_B", "lora_B"), ("lora_magnitude_vector", "lora_magnitude_vector")):
        if key.endswith("." + suffix):
            return getattr(root.get_submodule(key[: -len(suffix) - 1]), attr)[name]
    if key.endswith(".base_layer.bias"):
        return root.get_submodule(key[: -len(".base_layer.bias")]).bias
    for path, wrapper in saved_modules(root).items():
        if key.startswith(path + ".") and name in wrapper.modules_to_save:
            return wrapper.modules_to_save[name].state_dict(keep_vars=True)[key[len(path) + 1:]]
    return root.get_parameter(key)
