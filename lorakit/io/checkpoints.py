"""Loading a Hugging Face checkpoint for QLoRA without ever holding it in full precision.

transformers' from_pretrained materialises every weight before lorakit could quantize it: for a 13B model in bf16
that is 26 GB. Here the model's skeleton is built without memory (accelerate's init_empty_weights puts parameters
on the meta device), then each safetensors shard is read tensor by tensor: the weight of every frozen Linear is
quantized to NF4 as it arrives (an NF4Linear takes the Linear's place), every other tensor is kept in the compute
dtype, and the shard is closed before the next is opened. Peak memory is about the quantized model plus one shard.

Hand-written because no library quantizes to lorakit's NF4 while loading (bitsandbytes' route through transformers
gives its own layer type and, on most CPUs, no kernels).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..adapters.parts import replace_module
from ..adapters.qlora import plan_quantized
from ..errors import CheckpointError
from ..nn.kinds import kind_of
from ..nn.nf4 import NF4Linear
from ..runtime.heap import trim

log = logging.getLogger("lorakit")
INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"


def local_checkpoint(name_or_path: str) -> Path:
    """The local directory of a model: `name_or_path` itself, or the hub snapshot of that id (downloaded once into
    the Hugging Face cache: its config, safetensors shards and index)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))


def checkpoint_files(directory: Path) -> list[Path] | None:
    """The safetensors files of the checkpoint in `directory`, each checked to exist and be readable (a truncated
    file fails here, named); None when the checkpoint has no safetensors weights."""
    index = directory / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_NAME).is_file():
        names = [SINGLE_NAME]
    else:
        return None
    files = [directory / n for n in names]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"checkpoint shard {file} is missing ({INDEX_NAME} lists it)")
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint shard {file} is not a readable safetensors file (truncated?): {e}") from None
    return files


def load_quantized(auto_class, directory: Path, compute_dtype: torch.dtype, keep: list[str],
                   device: torch.device | str = "cpu", **model_kwargs) -> nn.Module:
    """`auto_class.from_pretrained(directory)` with every frozen Linear held in NF4, quantized shard by shard as the
    checkpoint is read; the modules under `keep` (paths; the output head always) and every other tensor are held in
    `compute_dtype`. Weights the checkpoint lacks outside the base model (a new task head) are initialised as
    from_pretrained would; any other missing weight raises CheckpointError naming it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    files = checkpoint_files(directory)
    if files is None:
        raise CheckpointError(f"{directory} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                              f"quantize-while-loading reads only safetensors")
    config = AutoConfig.from_pretrained(directory, **model_kwargs)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables, ids) are computed, not read
        model = auto_class.from_config(config)
    pending = {path: {} for path in plan_quantized(model, keep)}  # Linear path -> its tensors read so far
    keys = key_map(model)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                _place(model, keys.get(key), f.get_tensor(key), pending, compute_dtype, device)
        trim()  # a shard's fp tensors were freed between long-lived NF4 buffers: else resident grows a shard a shard
    if pending:
        raise CheckpointError(f"the checkpoint ({', '.join(f.name for f in files)}) has no weight for the Linear "
                              f"layers {sorted(pending)[:5]}: truncated or not this architecture")
    model.tie_weights()
    _initialise_missing(model, files, device, compute_dtype)
    return model.eval()


def key_map(model: nn.Module) -> dict[str, str]:
    # Checkpoint key -> model key. A base checkpoint (keys without the base model's prefix, e.g. "encoder.layer.0...")
    # loaded into a task model ("bert.encoder.layer.0...") and the reverse, as from_pretrained accepts them.
    prefix = getattr(model, "base_model_prefix", "") + "."
    out = {}
    for name in model.state_dict():
        out[name] = name
        if prefix != "." and name.startswith(prefix):
            out.setdefault(name[len(prefix):], name)
        elif prefix != ".":
            out.setdefault(prefix + name, name)
    return out


def _place(model, name: str | None, tensor: torch.Tensor, pending: dict, dtype: torch.dtype, device) -> None:
    # One checkpoint tensor into the model: into a pending Linear (quantized once its weight and bias are in), or
    # as a parameter or buffer of its own in the compute dtype.
    if name is None:
        return  # a tensor this architecture does not use (transformers ignores these too)
    path, _, attr = name.rpartition(".")
    if path in pending:
        parts = pending[path]
        parts[attr] = tensor
        linear = model.get_submodule(path)
        if "weight" in parts and ("bias" in parts or getattr(linear, "bias", None) is None):
            replace_module(model, path, _quantized(linear, parts, dtype, device))
            del pending[path]
        return
    from accelerate.utils import set_module_tensor_to_device

    # A copy, never the tensor itself: safetensors' tensors live in the file's memory map, and one kept tensor would
    # keep the whole shard resident.
    value = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)  # else: the skeleton's dtype


def _quantized(linear: nn.Module, parts: dict, dtype: torch.dtype, device) -> NF4Linear:
    bias = parts.get("bias")
    return NF4Linear.from_tensors(parts["weight"].to(device), None if bias is None else bias.to(device, dtype, copy=True),
                                  kind_of(linear).transposed)  # copy: see _place


def _initialise_missing(model: nn.Module, files: list[Path], device, dtype: torch.dtype) -> None:
    # Parameters still on the meta device were not in the checkpoint. A task head outside the base model is new (as
    # from_pretrained says, "newly initialized"): initialise it the model's own way. Anything else is a broken file.
    base = getattr(model, "base_model", model)
    in_base = {id(p) for p in base.parameters()} if base is not model else {id(p) for p in model.parameters()}
    missing = [(n, p) for n, p in model.named_parameters() if p.device.type == "meta"]
    owners = {n.rpartition(".")[0] for n, _ in missing}
    broken = [n for n, p in missing if id(p) in in_base]
    broken += [o for o in owners if any(p.device.type != "meta" for p in model.get_submodule(o).parameters(recurse=False))]
    if broken:
        raise CheckpointError(f"the checkpoint ({', '.join(f.name for f in files)}) has no tensor for {broken[:5]}"
                              f"{' ...' if len(broken) > 5 else ''}: truncated or not this architecture")
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        module.to_empty(device=device, recurse=False)
        module.to(dtype)
        model._init_weights(module)
        log.info("initialised %s (%s): not in the checkpoint, a new task head", owner, type(module).__name__)
