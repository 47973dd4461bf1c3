"""A model as one GGUF file that llama.cpp (and so Ollama) runs: the merged model of a run, or its base alone, with
the tokenizer and chat template, written by llama.cpp's own `gguf` package.

Tensors come from export.py's `plain_tensors`, the same producers `lorakit merge` writes shards with: each weight is
made only when it is written (an NF4 weight dequantized, the adapter's ΔW added in float32), encoded once in the
outtype and released, so memory stays about the (quantized) model plus one tensor. GGUFWriter takes every tensor's
name, shape and type first, then the data in the same order, which is what lets it stream.

Outtypes follow llama.cpp's converter: f32, f16 and bf16 hold 2-D weights in that type, q8_0 in blocks of 32 int8
with one f16 scale (a weight whose rows do not split into blocks of 32 falls back to f16); 1-D tensors (norms,
biases) stay f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..adapters.files import atomic_write
from ..adapters.merging import check_mergeable
from ..adapters.parts import lora_layers
from ..errors import ConfigError
from ..io.export import (  # the merged model's tensors, made one at a time, tied ones once; each freed once written
    plain_tensors,
    release_weight,
    unique_tensors,
)
from ..nn.layers import LoraLayer
from ..runtime.heap import trim
from .archs import TensorNames, arch_name, arch_of, extra_tensors, write_hparams
from .vocab import check_tokenizer, write_tokenizer


@dataclass(frozen=True)
class OutType:
    file_type: str  # gguf.LlamaFileType member: what general.file_type says
    matrix: str  # gguf.GGMLQuantizationType member for 2-D weights


OUTTYPES = {"f32": OutType("ALL_F32", "F32"), "f16": OutType("MOSTLY_F16", "F16"),
            "bf16": OutType("MOSTLY_BF16", "BF16"), "q8_0": OutType("MOSTLY_Q8_0", "Q8_0")}


@dataclass
class Planned:
    """One tensor of the file: its GGUF name, logical (PyTorch-order) shape, GGML type, and how to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]
    done: Callable[[], None] = lambda: None  # called once the tensor is written


def outtype(name: str) -> OutType:
    if name not in OUTTYPES:
        raise ConfigError(f"--outtype {name!r}: expected one of {', '.join(OUTTYPES)}")
    return OUTTYPES[name]


def ggml_type(shape: tuple[int, ...], out: OutType):
    """The GGML type a tensor of `shape` is stored in for outtype `out`."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, out.matrix)
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    """`tensor` as the bytes (or floats) GGUF stores for `qtype`, rounded once from float32."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)  # BF16 and Q8_0, by llama.cpp's reference code


def nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_gguf(path: Path, arch: str, describe: Callable[[object], None], tensors: list[Planned]) -> None:
    """Write a GGUF file at `path` (atomically): `describe(writer)` adds the key-value metadata; each planned tensor is
    made, encoded, written and released in turn."""
    import gguf

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(None, arch)
        describe(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = encode(t.make(), t.qtype)
            writer.write_tensor_data(data)
            del data
            t.done()
        writer.close()

    atomic_write(path, write)


def model_tensors(model: nn.Module, names: TensorNames, out: OutType) -> list[Planned]:
    """The model's tensors as llama.cpp names and lays them out (query/key rows reordered), each made on demand
    in float32 (active adapters merged), plus the tensors llama.cpp needs that the checkpoint lacks."""
    planned, layers = [], lora_layers(model)
    for key, shape, _, make in unique_tensors(model, list(plain_tensors(model))):
        kind, name = names.find(key)
        layer = layers.get(key.rpartition(".")[0]) if key.endswith(".weight") else None
        planned.append(Planned(name, tuple(shape), ggml_type(tuple(shape), out),
                               lambda make=make, kind=kind: names.reorder_rows(kind, make(torch.float32)),
                               (lambda layer=layer: _free_weight(layer)) if layer is not None else (lambda: None)))
    for name, tensor in extra_tensors(model.config).items():
        planned.append(Planned(name, tuple(tensor.shape), ggml_type(tuple(tensor.shape), OUTTYPES["f32"]),
                               lambda tensor=tensor: tensor))
    return planned


def _free_weight(layer: LoraLayer) -> None:
    release_weight(layer)
    trim()


def check_exportable(model: nn.Module, tokenizer, outtype_name: str) -> None:
    """ConfigError, before anything is written, for an outtype, architecture or tokenizer GGUF export cannot take."""
    outtype(outtype_name)
    TensorNames(model.config, arch_of(model.config))
    check_tokenizer(tokenizer, model.config.vocab_size)


def export_model_gguf(model: nn.Module, tokenizer, path: Path, outtype_name: str, merged: bool = True) -> str:
    """Write `model` as a GGUF file at `path`: its active adapters merged (merged=True), or its base model alone
    (merged=False; an NF4 base dequantized either way), in outtype `outtype_name`, with the tokenizer and its
    chat template. The model is consumed. Returns llama.cpp's architecture name."""
    import gguf

    out = outtype(outtype_name)
    arch = arch_of(model.config)
    names = TensorNames(model.config, arch)
    if merged:
        check_mergeable(model)
    else:
        for layer in lora_layers(model).values():
            layer.restore_pissa(layer.adapters, +1)  # a PiSSA layer holds a residual: give W its original value
            layer.set_active(())  # plain_tensors then yields the base weight, dequantized, nothing merged
    planned = model_tensors(model, names, out)

    def describe(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(getattr(model.config, "_name_or_path", "") or "model").name)
        write_hparams(writer, model.config)
        writer.add_file_type(getattr(gguf.LlamaFileType, out.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, model.config.vocab_size)

    write_gguf(path, arch_name(arch), describe, planned)
    return arch_name(arch)
