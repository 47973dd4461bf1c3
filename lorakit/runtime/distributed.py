"""The processes of a run: one, or several under torchrun (DistributedDataParallel, or FSDP with --sharding fsdp:
sharding.py), each with its device. Every helper is a no-op for a single process, so that the training code reads
the same either way."""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and this process's device."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0


def init_distributed(sharded: bool = False) -> World:
    """This process's World. Under torchrun (WORLD_SIZE > 1, or any size when `sharded`: FSDP needs a process
    group even for one process) joins the process group: nccl on GPU, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (size > 1 or sharded) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank() if size > 1 else 0, size, device)


def shutdown(world: World) -> None:
    """Leave the process group (after the last collective)."""
    if world.size > 1 or dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True where files are written: rank 0 under torchrun, or a process outside any process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier(world: World) -> None:
    """Wait until every process gets here."""
    if world.size > 1:
        dist.barrier()


def any_rank(flag: bool, world: World) -> bool:
    """True on every process if any process has `flag` (so that all stop at the same step)."""
    if world.size == 1:
        return flag
    t = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def sum_over_processes(value: torch.Tensor, world: World) -> torch.Tensor:
    """`value` summed over every process (in place), or itself for a single process."""
    if world.size > 1:
        dist.all_reduce(value)
    return value


def from_main(value, world: World):
    """Rank 0's `value`, on every process."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun (gradients averaged over processes), else itself; a model
    sharded with FSDP (sharding.shard, before its optimizer was built) is itself: FSDP reduces its gradients."""
    if world.size == 1 or is_sharded(model):
        return model
    ids = [world.device] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped with FSDP's fully_shard (sharding.shard)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(net: torch.nn.Module, sync: bool):
    """A context in which backward reduces gradients across processes only if `sync` (the last micro-batch of a
    step): DDP's no_sync(), FSDP's set_requires_gradient_sync(False); nothing for a single process."""
    if sync or not dist.is_initialized():
        return contextlib.nullcontext()
    if is_sharded(net):
        return _fsdp_no_sync(net)
    return net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)  # gradients accumulate unsharded until the step's last micro-batch
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
