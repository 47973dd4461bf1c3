"""A run's adapter alone as a GGUF LoRA file, as llama.cpp's `--lora` reads it, to apply on the base model's GGUF.

The layout is that of llama.cpp's convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and for each adapted weight NAME (llama.cpp's tensor name) the tensors NAME.lora_a (r, d_in)
and NAME.lora_b (d_out, r), B's rows in llama.cpp's query/key order as the weight's are. llama.cpp scales each
pair by alpha / r, r read from the tensors; where an adapter's scale for a module is not alpha / r (rsLoRA's
alpha / sqrt(r), alpha_pattern, a PiSSA adapter saved as rank 2r) the ratio is folded into B, so every module gets
exactly the scale it was trained with.

What a LoRA file cannot hold is refused before anything is written: DoRA (its per-row magnitude rescales the merged
weight, which llama.cpp cannot express), trained biases, modules saved in full (modules_to_save) and LoRA on layers
other than Linear ones. `--format gguf` (merged) exports all of those.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters.files import PREFIX, adapter_state_dict
from ..adapters.parts import configs, lora_layers, saved_modules
from ..errors import ConfigError
from .archs import TensorNames, arch_name, arch_of
from .gguf import Planned, ggml_type, outtype, write_gguf

ADAPTER = "default"  # the name load_trained gives a run's adapter


def check_separable(model: nn.Module, name: str = ADAPTER) -> None:
    """ConfigError naming what in adapter `name` a llama.cpp LoRA file cannot hold (nothing changes)."""
    config = configs(model)[name]
    merged_hint = "; export the merged model with --format gguf instead"
    if config.use_dora:
        raise ConfigError("a DoRA adapter cannot be a separate llama.cpp LoRA file: llama.cpp has no DoRA (its "
                          "magnitude vector rescales each row of W + ΔW, which lora_a/lora_b cannot express)"
                          + merged_hint)
    if config.lora_bias:
        raise ConfigError("the adapter has a bias on lora_B (lora_bias), which a llama.cpp LoRA file (lora_a/lora_b "
                          "only) cannot hold" + merged_hint)
    if config.bias != "none":
        raise ConfigError(f"the adapter trains biases (bias={config.bias!r}), which a llama.cpp LoRA file cannot "
                          f"hold" + merged_hint)
    saved = [path for path, wrapper in saved_modules(model).items() if name in wrapper.modules_to_save]
    if saved:
        raise ConfigError(f"the adapter saves {saved} in full (modules_to_save), which a llama.cpp LoRA file cannot "
                          f"hold" + merged_hint)
    for path, layer in lora_layers(model).items():
        if name in layer.adapters and not layer.kind.linear:
            raise ConfigError(f"the adapter adapts {path!r}, a {layer.kind.name} layer; a llama.cpp LoRA file here "
                              f"holds Linear layers only" + merged_hint)


def lora_tensors(model: nn.Module, names: TensorNames, alpha: float, name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """{GGUF name: tensor} of the adapter's lora_a / lora_b pairs, each module's scale folded into B where llama.cpp's
    alpha / r would differ from it."""
    saved = adapter_state_dict(model, name)  # PEFT's file tensors: a PiSSA adapter as its plain rank-2r LoRA
    out = {}
    for path, layer in lora_layers(model).items():
        if name not in layer.adapters:
            continue
        key_a, key_b = (f"{PREFIX}{path}.{key}" for key in layer.kind.file_keys)
        a, b = saved[key_a].float(), saved[key_b].float()
        rank = a.shape[0]
        b = b * (layer.adapters[name].scale / (alpha / rank))  # exactly 1 for plain LoRA
        kind, gguf_name = names.find(f"{path}.weight")
        out[f"{gguf_name}.lora_a"] = a.contiguous()
        out[f"{gguf_name}.lora_b"] = names.reorder_rows(kind, b).contiguous()
    if not out:
        raise ConfigError(f"adapter {name!r} adapts no layer")
    return out


def export_lora_gguf(model: nn.Module, path: Path, outtype_name: str, name: str = ADAPTER) -> str:
    """Write adapter `name` of `model` as a llama.cpp LoRA GGUF at `path`; returns llama.cpp's architecture name.
    Refuses (ConfigError) what a LoRA file cannot hold before writing anything; the model is left as it is."""
    import gguf

    out = outtype(outtype_name)
    arch = arch_of(model.config)
    check_separable(model, name)
    alpha = float(configs(model)[name].alpha)
    tensors = lora_tensors(model, TensorNames(model.config, arch), alpha, name)

    def describe(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(getattr(gguf.LlamaFileType, out.file_type))

    planned = [Planned(n, tuple(t.shape), ggml_type(tuple(t.shape), out), lambda t=t: t) for n, t in tensors.items()]
    write_gguf(path, arch_name(arch), describe, planned)
    return arch_name(arch)
