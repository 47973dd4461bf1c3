"""Writing a model with its adapters merged as a plain Hugging Face checkpoint, one shard at a time.

`unload(merge=True)` followed by `save_pretrained` holds the whole merged model in memory: for a QLoRA model that is
the full-precision model QLoRA exists to avoid. Here each tensor is produced only when its shard is written (an NF4
weight dequantized, the active adapters' ΔW added in float32, the result cast once to the export dtype) and released
once written, so that memory stays about the quantized model plus one shard. The model is consumed.
Shards follow transformers' layout (model-0000i-of-0000N.safetensors and model.safetensors.index.json), so the
result loads with from_pretrained. Hand-written because save_pretrained and huggingface_hub's splitter both take a
state dict that already exists in memory.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.merging import check_mergeable
from ..nn.layers import LoraLayer, SavedModule
from ..nn.nf4 import NF4Linear
from ..runtime.heap import trim

Producer = Callable[[torch.dtype | None], torch.Tensor]  # the tensor, computed for the export dtype (None: its own)
MAX_SHARD_BYTES = 2 * 2**30


def plain_tensors(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Size, torch.dtype, Producer]]:
    """(key, shape, dtype, make) for every tensor of the plain model `model` would be once unloaded with merge=True,
    in state-dict order; make(dtype) builds the tensor (merging or dequantizing) only when called."""
    if isinstance(model, LoraLayer):
        yield from _lora_layer_tensors(model, prefix)
        return
    if isinstance(model, NF4Linear):
        yield from _nf4_tensors(model, prefix)
        return
    if isinstance(model, SavedModule):
        model = model.current()
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if "." not in k}  # its own tensors, not children's
    for key, tensor in own.items():
        yield prefix + key, tensor.shape, tensor.dtype, (lambda dtype, t=tensor: t.detach())
    for name, child in model.named_children():
        yield from plain_tensors(child, f"{prefix}{name}.")


def _lora_layer_tensors(layer: LoraLayer, prefix: str):
    source = layer.base_layer  # the plain layer it becomes (its tensors are held by `layer`): it fixes the shape
    shape = layer.weight_nf4.shape if layer.kind.quantized else layer.weight.shape
    if getattr(source, "transposed", False):
        shape = torch.Size(reversed(shape))
    dtype = layer.weight_nf4.dtype if layer.kind.quantized else layer.weight.dtype

    def merged_weight(export_dtype) -> torch.Tensor:
        layer.dequantize_base(export_dtype)  # an NF4 base straight into the export dtype, not through its own
        if export_dtype not in (None, layer.weight.dtype):  # a full-precision base in another dtype: merged in
            layer.weight.data = layer.weight.data.float()  # float32, so that writing it rounds once
        # So is the bias, which a lora_bias adapter changes; judged by its own dtype, since an NF4 base's W is
        # already in export_dtype while its bias keeps the dtype it was stored in.
        if layer.bias is not None and export_dtype not in (None, layer.bias.dtype):
            layer.bias.data = layer.bias.data.float()
        for name in layer.active:
            layer.merge(name)  # ΔW is added in float32 and rounded once
        return layer.weight.detach()

    def merged_bias(export_dtype) -> torch.Tensor:
        if any(name not in layer.merged for name in layer.active):  # lora_bias adapters merge into the bias too
            merged_weight(export_dtype)
        return layer.bias.detach()

    yield prefix + "weight", shape, dtype, merged_weight
    if layer.bias is not None:
        yield prefix + "bias", layer.bias.shape, layer.bias.dtype, merged_bias


def _nf4_tensors(linear: NF4Linear, prefix: str):
    yield prefix + "weight", linear.source_shape, linear.weight_nf4.dtype, linear.source_weight
    if linear.bias is not None:
        yield prefix + "bias", linear.bias.shape, linear.bias.dtype, (lambda export_dtype: linear.bias.detach())


def export_merged(model: nn.Module, out: Path, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write `model` with its active adapters merged as safetensors shards (+ index) and config.json in `out`, in
    `dtype` (None: each tensor's own), shard by shard. Checks every merge (finite, not tied) and the free disk space
    before writing anything. Returns the shard files. The model is consumed."""
    check_mergeable(model)
    entries = unique_tensors(model, list(plain_tensors(model)))
    sizes = [_nbytes(shape, dtype or tdtype) for _, shape, tdtype, _ in entries]
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    if sum(sizes) > free:
        raise OSError(f"not enough disk for the merged model in {out}: it needs {sum(sizes) / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB are free")
    shards = _split(list(range(len(entries))), sizes, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {}
        for i in shard:
            key, _, _, make = entries[i]
            tensor = make(dtype)
            tensors[key] = (tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor).contiguous()
            weight_map[key] = file_name
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        del tensors  # this shard's merged weights are released before the next shard's are made
        _release_merged(model)
        trim()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names]


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a Hugging Face config says its checkpoint is in (None when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def save_merged_config(model: nn.Module, out: Path, dtype: torch.dtype | None) -> None:
    """config.json (saying `dtype`) and, for a generative model, generation_config.json, beside the merged weights."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained records it: what from_pretrained builds
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out)


def unique_tensors(model: nn.Module, entries: list) -> list:
    # Tied weights (GPT-2's lm_head is its input embedding) are saved once, under the key transformers keeps.
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied) if not isinstance(tied, dict) else set(tied.keys())
    keys = {key for key, *_ in entries}
    out = []
    for entry in entries:
        if entry[0] in tied and _tied_source_present(model, entry[0], keys):
            continue
        out.append(entry)
    return out


def _tied_source_present(model: nn.Module, key: str, keys: set) -> bool:
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return False
    return any(k != key and _same(model, k, param) for k in keys)


def _same(model: nn.Module, key: str, param) -> bool:
    try:
        return model.get_parameter(key) is param
    except AttributeError:
        return False


def _split(indices: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    # Consecutive tensors into shards of at most `limit` bytes (a larger tensor gets a shard of its own).
    shards, current, used = [], [], 0
    for i in indices:
        if current and used + sizes[i] > limit:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += sizes[i]
    return shards + [current] if current else shards


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return shape.numel() * torch.empty((), dtype=dtype).element_size()


def _release_merged(model: nn.Module) -> None:
    # A merged layer's weight was written: free its full-precision copy (the model is being consumed).
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.merged:
            release_weight(module)


def release_weight(layer: LoraLayer) -> None:
    """Free the full-precision weight of `layer` once it was written (merged, or an NF4 base dequantized): the model
    is being consumed, and a QLoRA base must not build up in full precision. An NF4 weight still packed is kept."""
    if not layer.kind.quantized and layer.weight.device.type != "meta":
        layer.weight = nn.Parameter(layer.weight.detach().to("meta"), requires_grad=False)
