"""Sharded training with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun: `--sharding fsdp`.

DDP keeps the whole frozen model on every process; FSDP splits every parameter along dim 0 across the processes
and all-gathers one unit (a transformer block) just before it runs, freeing it again after. With LoRA the frozen
base is what gets sharded; the adapters and heads are sharded too (they are small) and train as usual: gradients are
reduce-scattered to each process's shard, and the optimizer steps on shards.

    shard(model, world, precision)   each transformer block, then the input and output embeddings (unless tied),
                                     then the root wrapped with fully_shard; an NF4 base's storage is sharded too
    full(t) / shard_like(t, p)       a DTensor gathered to a full tensor (collective) / a full tensor cut to p's shard
    gathered_optimizer_state(opt)    the optimizer's state_dict() as one process would hold it (collective)

Call shard() before building the optimizer (it replaces the parameters by sharded ones). Under FSDP every forward
is collective: evaluation, saving and checkpointing run on every process, and rank 0 writes.

Nothing here must divide the number of processes, so nothing is checked: FSDP2 shards along dim 0 and pads uneven
shards (what does fail, sharding another dim or an integer reshard_after_forward that does not divide the world,
lorakit never asks for), and the data order pads every epoch to whole global batches (fit.seeded_batches).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..adapters import files
from ..adapters.inject import quantized_weights
from ..adapters.parts import unwrap
from .distributed import World, is_main_process, is_sharded  # noqa: F401  (is_sharded: re-exported for callers)
from .precision import resolve

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets


def check_launch(sharding: str | None) -> None:
    """Refuse `--sharding fsdp` outside torchrun or on a torch without FSDP2, before any work, naming what is missing."""
    from ..errors import ConfigError

    if sharding != "fsdp":
        return
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"--sharding fsdp runs one process per device, started by torchrun: "
                          f"torchrun --nproc_per_node=N -m lorakit -- train --sharding fsdp ... "
                          f"(not set here: {', '.join(missing)})")
    if not torch.distributed.is_available():
        raise ConfigError("--sharding fsdp: this PyTorch build has no torch.distributed")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public from torch 2.6; lorakit needs torch>=2.4)
    except ImportError:
        raise ConfigError(f"--sharding fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), public from torch 2.6; "
                          f"this is torch {torch.__version__}: pip install 'torch>=2.6'") from None


# ---- wrapping ----

def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`: modules whose class (or a base class: fully_shard renames a wrapped
    class to FSDP<Name>) is named in Hugging Face's `_no_split_modules`, as accelerate's FSDP auto-wrap finds them.
    Outermost matches only; never the root."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found, inside = [], set()
    for module in model.modules():  # parents before children
        if module is model or id(module) in inside:
            continue
        if names & {c.__name__ for c in type(module).__mro__}:
            found.append(module)
            inside |= {id(m) for m in module.modules()}
    return found


def end_units(model: nn.Module, found: list[nn.Module]) -> list[nn.Module]:
    """The input and output embeddings, each its own unit (so that neither stays gathered for a whole step), unless
    they share a weight: tied weights must stay in one unit (wrapped apart, they would silently be untied)."""
    get = lambda name: getattr(model, name)() if hasattr(model, name) else None  # noqa: E731
    ends = [m for m in (get("get_input_embeddings"), get("get_output_embeddings")) if isinstance(m, nn.Module)]
    inside = {id(m) for b in found for m in b.modules()}
    ends = [m for m in ends if id(m) not in inside and m is not model]
    if len(ends) == 2 and {id(p) for p in ends[0].parameters()} & {id(p) for p in ends[1].parameters()}:
        return []
    return ends


def shard(model: nn.Module, world: World, precision: str = "fp32") -> nn.Module:
    """Wrap `model` (in place) for sharded training over the processes of `world`: fully_shard on each block, on
    the embeddings and the output head (end_units), then on the root. bf16 precision gathers and computes in bf16,
    reducing gradients in fp32 (the optimizer keeps fp32 shards). A model with no blocks is one unit, with a
    warning. Returns `model`, now also an FSDPModule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root = unwrap(model)
    # Explicit: the default mesh would pick CUDA whenever one is present, even for a CPU run.
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if resolve(precision, world.device) == "bf16" else MixedPrecisionPolicy()
    nf4_storage_as_parameters(root)
    found = blocks(root)
    if not found:
        warnings.warn(f"{type(root).__name__} has no transformer blocks to shard one by one (no _no_split_modules "
                      f"match): the whole model is one FSDP unit, so every step gathers all of it at once",
                      stacklevel=2)
    for unit in found + (end_units(root, found) if found else []):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return model


def nf4_storage_as_parameters(model: nn.Module) -> None:
    """Make every NF4Weight's storage (codes and scales) frozen Parameters instead of buffers, so that FSDP shards
    it: FSDP replicates buffers. The scalar `offset` becomes shape (1,) (FSDP cannot shard a 0-d tensor);
    dequantize_nf4 reads it the same either way."""
    for q in quantized_weights(model):
        for name, t in list(q._buffers.items()):
            del q._buffers[name]
            q.register_parameter(name, nn.Parameter(t.reshape(1) if t.dim() == 0 else t, requires_grad=False))


# ---- full tensors and shards ----

def full(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a sharded DTensor is all-gathered (a collective: every process must call it, in the same order);
    any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: its shard where `t` is a sharded DTensor, else `t` (no communication)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor `t` as `like` holds it: this process's shard where `like` is a DTensor (cut locally from `t`,
    which every process has; no communication), else `t` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def gathered_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded tensor gathered whole: the form one process would save, so that a
    checkpoint of a sharded run resumes in any number of processes. Collective under FSDP."""
    saved = opt.state_dict()
    state = {i: {k: full(v) for k, v in entry.items()} for i, entry in saved["state"].items()}
    return {**saved, "state": state}


def sharded_optimizer_state(saved: dict, opt: torch.optim.Optimizer) -> dict:
    """The inverse of gathered_optimizer_state for `opt`: each per-parameter state tensor (AdamW's moments) cut to
    its parameter's shard; scalars (`step`) stay as they are."""
    params = [p for group in opt.param_groups for p in group["params"]]  # state keys are positions in this order
    state = {i: {k: shard_like(v, params[i]) if v.shape == params[i].shape else v for k, v in entry.items()}
             for i, entry in saved["state"].items()}
    return {**saved, "state": state}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """`lorakit.adapter_state_dict`: adapters.files' under PEFT's keys, each tensor of an FSDP-sharded model gathered
    whole (then every process must call this, in the same order)."""
    return files.adapter_state_dict(model, name, gather=full)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", **file_fields) -> Path:
    """`lorakit.save_adapter`: adapters.files.save_adapter (arguments as there) for one process or many. Under
    torchrun only rank 0 writes; a model sharded with FSDP is gathered whole first, so every process must call this
    (the file is never empty or partial)."""
    return files.save_adapter(model, path, name, gather=full, write=is_main_process(), **file_fields)
