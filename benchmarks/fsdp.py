"""DDP against FSDP (`--sharding fsdp`): per-process peak memory and step time of 2 processes training LoRA (r=16 on
q_proj and v_proj, fp32) on a Llama of about 1B parameters (TinyLlama-1.1B's shape, random weights), through
lorakit's own fit().

    python -m benchmarks.fsdp [--size tiny|small|1b] [--steps N] [--processes N] [--out FILE]

Each mode runs in its own `torchrun` (gloo on CPU, nccl on CUDA). Every process builds the model on the meta device
(no memory), adds the adapter, and then allocates and fills its tensors with seeded random values: DDP every tensor
in full, FSDP only its shards (`lorakit.runtime.sharding.shard` before allocating), so that no FSDP process ever holds the
whole model. Memory per process from /proc/self/status: VmHWM at the end of setup (setup peak), then reset
(clear_refs 5) and read again after training (training peak); the run's peak is the larger. Step time: the mean of
the steps after the first. `frozen_mib`: this process's bytes of frozen weights. The all-gather volume of a FSDP step
and the measured all-gather bandwidth explain its slowdown (see BENCHMARKS.md section 8).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import md_table

SIZES = {  # TinyLlama-1.1B: hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 kv heads, vocab 32000
    "tiny": dict(layers=2, hidden=64, inter=128, heads=4, kv=2, vocab=256, seq=16),
    "small": dict(layers=4, hidden=2048, inter=5632, heads=32, kv=4, vocab=32000, seq=128),  # the 1b's first layers
    "1b": dict(layers=22, hidden=2048, inter=5632, heads=32, kv=4, vocab=32000, seq=128),
}
SHAPES = {"1b": "TinyLlama-1.1B's shape", "small": "the first 4 layers of TinyLlama-1.1B's shape"}
OUT = Path(__file__).resolve().parent / "results" / "fsdp.json"
MODES = ("ddp", "fsdp")


# ---- the driver: one torchrun per mode ----

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="1b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--profile", action="store_true", help="print rank 0's top operators of the last step per mode")
    args = p.parse_args(argv)
    results = {mode: run_mode(mode, args.size, args.steps, args.processes, args.profile) for mode in MODES}
    ddp, fsdp = results["ddp"], results["fsdp"]
    summary = {
        "command": f"python -m benchmarks.fsdp --size {args.size} --steps {args.steps} --processes {args.processes}",
        "size": args.size, "processes": args.processes, **results,
        "frozen_ratio": round(fsdp["frozen_bytes"] / ddp["frozen_bytes"], 3),
        "peak_ratio": round(fsdp["run_peak_mib"] / ddp["run_peak_mib"], 3),
        # seconds kept to 0.1 ms: a tiny model on a fast machine steps in under the 10 ms that 2 decimals showed as 0
        "step_ratio": round(fsdp["step_s"] / ddp["step_s"], 2),
    }
    summary["meets_peak_target"] = summary["peak_ratio"] <= 0.65
    summary["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in MODES}))
    return summary


def run_mode(mode: str, size: str, steps: int, processes: int, profile: bool = False) -> dict:
    """One torchrun of `mode`; returns rank 0's report (every rank's memory is in `ranks`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Large allocations as their own mappings, returned to the system when freed: the peaks then measure tensors,
    # not the heap's high-water mark (the same for both modes).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(max(1, cores // processes)),
           "BENCH_PROFILE": "1" if profile else ""}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        subprocess.run([torchrun, f"--nproc_per_node={processes}", "-m", "benchmarks.fsdp", "--", "worker", mode, size,
                        str(steps), str(report)], check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        return json.loads(report.read_text())


def section(path: Path) -> str:
    """The BENCHMARKS.md section for the results in `path` (fsdp.json), or a line saying how to produce them."""
    if not path.exists():
        return "Not run yet: `python -m benchmarks.fsdp`.\n"
    data = json.loads(path.read_text())
    ddp, fsdp = data["ddp"], data["fsdp"]
    row = lambda label, key, fmt="{:,}": [label, fmt.format(ddp[key]), fmt.format(fsdp[key]),  # noqa: E731
                                          f"{fsdp[key] / ddp[key]:.2f}"]
    out = [f"Written to `{path.name}` by `{data['command']}` ({data.get('date', '')}; {data['processes']} processes, "
           f"{ddp['threads']} torch thread(s) each, {ddp['device']}). A Llama of {ddp['params_m']:,}M parameters "
           f"({SHAPES.get(data['size'], data['size'])}, random weights, fp32), LoRA r=16 on q_proj and v_proj, batch 1 × 128 tokens "
           f"per process, trained through `lorakit.fit()`; see `benchmarks/fsdp.py` for the method.\n",
           _md_table(["per process", "DDP", "FSDP", "FSDP / DDP"], [
               row("frozen weights (MiB)", "frozen_mib"), row("peak during setup (MiB)", "setup_peak_mib"),
               row("peak during training (MiB)", "train_peak_mib"), row("peak of the whole run (MiB)", "run_peak_mib"),
               row("setup (s)", "setup_s", "{}"), row("step (s)", "step_s", "{}")]),
           f"FSDP all-gathers {fsdp['gathered_per_step_mib']:,} MiB per process per step (every unit before its "
           f"forward and again before its backward; the root once); a lone all-gather of this process group moves "
           f"{fsdp['all_gather_gib_s']} GiB/s.\n",
           _md_table(["target", "measured", "met"], [
               ["frozen weights per process about half of DDP's", f"{data['frozen_ratio']:.2f} ×",
                "yes" if abs(data["frozen_ratio"] - 0.5) < 0.05 else "**no**"],
               ["whole-run peak per process ≤ 0.65 × DDP's", f"{data['peak_ratio']:.2f} ×",
                "yes" if data["meets_peak_target"] else "**no**"],
               ["step time reported beside DDP's", f"{data['step_ratio']:.2f} ×", "(reported)"]])]
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return md_table(header, rows) + "\n"


# ---- a worker: one process of one mode ----

def worker(mode: str, size: str, steps: int, report: Path) -> None:
    import torch.distributed as dist

    from lorakit.runtime.distributed import init_distributed, shutdown

    world = init_distributed(sharded=True)
    start = time.perf_counter()
    model = build(SIZES[size], mode, world)
    setup_s = time.perf_counter() - start
    _release()
    setup_peak, frozen = _status()["VmHWM"], _frozen_bytes(model)
    _reset_peak()
    times = train(model, SIZES[size], steps, world)
    mine = {"rank": world.rank, "setup_peak_mib": setup_peak, "train_peak_mib": _status()["VmHWM"]}
    ranks = [None] * world.size
    dist.all_gather_object(ranks, mine)
    result = {"mode": mode, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "frozen_bytes": frozen, "frozen_mib": round(frozen / 2**20), "setup_peak_mib": max(r["setup_peak_mib"] for r in ranks),
              "train_peak_mib": max(r["train_peak_mib"] for r in ranks), "setup_s": round(setup_s, 1),
              "first_step_s": round(times[0], 4), "step_s": round(sum(times[1:]) / max(1, len(times) - 1), 4),
              "ranks": ranks, "device": str(world.device), "threads": torch.get_num_threads()}
    result["run_peak_mib"] = max(result["setup_peak_mib"], result["train_peak_mib"])
    if mode == "fsdp":
        result["gathered_per_step_mib"] = round(_gathered_per_step(model) / 2**20)
        result["all_gather_gib_s"] = round(_all_gather_bandwidth(world), 2)
    if world.main:
        report.write_text(json.dumps(result))
    del model
    gc.collect()
    dist.barrier()  # leave together: a process group destroyed while a peer is mid-collective aborts the peer
    shutdown(world)


def build(d: dict, mode: str, world) -> torch.nn.Module:
    """A Llama of dims `d` with the adapter, on the meta device first; then every tensor this process holds (all of
    them for DDP, its shards for FSDP) allocated on its device and filled with seeded random values."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.runtime.sharding import shard

    config = LlamaConfig(num_hidden_layers=d["layers"], hidden_size=d["hidden"], intermediate_size=d["inter"],
                         num_attention_heads=d["heads"], num_key_value_heads=d["kv"], vocab_size=d["vocab"],
                         max_position_embeddings=2 * d["seq"], tie_word_embeddings=False)
    with init_empty_weights(include_buffers=False):  # the rotary tables are computed, small, and kept
        model = LlamaForCausalLM(config)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, dropout=0.0, targets=["q_proj", "v_proj"]))
    if mode == "fsdp":
        shard(model, world)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=world.device)
    _fill(model, buffers, world.rank)
    return model


@torch.no_grad()
def _fill(model: torch.nn.Module, buffers: dict, seed: int) -> None:
    # Values do not change memory or time; finite ones keep the loss finite. Norms 1, B 0 (LoRA's start), the rest
    # N(0, 0.02). DDP makes every process start from rank 0's values.
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        if "norm" in name:
            t.fill_(1.0)
        elif "lora_B" in name:
            t.zero_()
        else:
            t.copy_(torch.empty(t.shape, dtype=t.dtype).normal_(0, 0.02, generator=g))
    for name, b in model.named_buffers():
        b.copy_(buffers[name])


def train(model: torch.nn.Module, d: dict, steps: int, world) -> list[float]:
    """`steps` optimizer steps of batch 1 per process through lorakit.fit(); the seconds of each."""
    import lorakit
    from lorakit.training.fit import Hooks, Loop, RunState, fit, seeded_batches

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, d["vocab"], (d["seq"],), generator=g)} for _ in range(steps * world.size)]

    def collate(batch):
        ids = torch.stack([r["input_ids"] for r in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    opt = lorakit.optimizer(model, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    times = []
    batches = seeded_batches(rows, collate, 1, 0, world)
    fit(model, batches, opt, sched, Loop(total_steps=steps - 1), world=world,
        hooks=Hooks(on_step=lambda record: times.append(record["seconds"])))
    with _profiled(os.environ.get("BENCH_PROFILE") and world.main):  # the last step, if asked
        fit(model, batches, opt, sched, Loop(total_steps=steps), RunState(step=steps - 1, micro=steps - 1),
            world=world, hooks=Hooks(on_step=lambda record: times.append(record["seconds"])))
    return times


@contextlib.contextmanager
def _profiled(enabled):
    if not enabled:
        yield
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def _frozen_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not p.requires_grad]
    return sum(t.numel() * t.element_size() for t in local)


def _gathered_per_step(model) -> int:
    """Bytes each process all-gathers per step: every unit before its forward, and again before its backward
    (resharded after forward) except the root, which stays gathered from forward to the end of backward."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    owned = {}
    for unit in units:  # a parameter belongs to the innermost unit holding it
        for p in unit.parameters():
            owned[id(p)] = (unit, p.numel() * p.element_size())
    size = {id(u): sum(b for unit, b in owned.values() if unit is u) for u in units}
    return sum(size[id(u)] * (1 if u is model else 2) for u in units)


def _all_gather_bandwidth(world, mib: int = 64) -> float:
    """GiB/s of output an all-gather of `mib` MiB produces on this process group."""
    import torch.distributed as dist

    out = torch.empty(mib * 2**20 // 4, device=world.device)
    part = torch.ones(out.numel() // world.size, device=world.device)
    dist.all_gather_into_tensor(out, part)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        dist.all_gather_into_tensor(out, part)
    return 3 * mib / 1024 / (time.perf_counter() - start)


def _status() -> dict:
    """VmRSS and VmHWM of this process, MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024)
    return values


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
