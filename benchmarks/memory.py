"""Workload 4: peak memory of training steps above the model's own footprint, one fresh process per variant.

How (CPU): the child process builds the model, the optimizer and the batch, collects garbage and returns freed heap
pages to the OS (glibc malloc_trim), reads its resident set size (VmRSS) as the baseline, resets the kernel's
high-water mark (writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS), runs the training steps, and
reports VmHWM − baseline. The peak includes activations kept for backward, gradients, AdamW's two moment buffers
(created in the first step) and allocator slack: all the memory training adds. tracemalloc cannot do this (torch
allocates outside Python's allocator). Without /proc (not Linux) it falls back to ru_maxrss, which only sees a peak
above the earlier one. On CUDA: torch.cuda.max_memory_allocated() − memory_allocated() after reset_peak_memory_stats.

Run one measurement by hand: python -m benchmarks.memory cls lorakit --size full
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys

import torch

from . import train
from .common import MAKERS, base_model, batch, model_bytes, set_threads, sync

ROWS = {"mem-cls": "cls", "mem-cls-bf16": "cls-bf16", "mem-gpt2": "gpt2", "mem-llama": "llama",  # -> train.ROWS
        "mem-gpt2-bf16": "gpt2-bf16", "mem-llama-bf16": "llama-bf16"}
DEFAULT = ["mem-cls", "mem-cls-bf16", "mem-gpt2", "mem-llama"]
STEPS = {"full": 3, "quick": 2, "tiny": 1, "gpu": 3}
TARGET_VS_PEFT = 0.90


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith(field + ":")))


def _reset_peak() -> bool:
    # Linux ≥ 4.0: "5" resets the peak RSS (VmHWM) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(train_key: str, variant: str, size: str, device: str = "cpu") -> dict:
    """Peak bytes that `STEPS[size]` training steps of `variant` add on top of the model, in this process."""
    spec = train.ROWS[train_key]
    model = MAKERS[variant](base_model(spec["model"], size).to(device), spec["model"], spec["dropout"]).train()
    opt = train.optimizer(model)
    step = train.step_fn(model, opt, batch(spec["model"], size, model, device), spec["precision"], device)
    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        baseline, method = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
    else:
        try:  # give freed heap back, so that the baseline counts live memory only
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        if _reset_peak():
            baseline, method = _status_kib("VmRSS") * 1024, "VmHWM after clear_refs"
        else:
            baseline, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (approximate)"
    for _ in range(STEPS[size]):
        step()
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("VmHWM"):
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"variant": variant, "peak_delta": peak - baseline, "model": model_bytes(model), "method": method}


def measure_in_child(train_key: str, variant: str, size: str, device: str = "cpu") -> dict:
    """measure() in a fresh Python process, so that no variant sees memory another one left behind."""
    cmd = [sys.executable, "-m", "benchmarks.memory", train_key, variant, "--size", size, "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(key: str, size: str = "full", device: str = "cpu") -> dict:
    """Peak training memory above the model of lorakit, PEFT and full fine-tuning for row `key`, in MiB."""
    train_key = ROWS[key]
    found = {v: measure_in_child(train_key, v, size, device) for v in ("lorakit", "peft", "full")}
    mib = {v: r["peak_delta"] / 2**20 for v, r in found.items()}
    return {
        "row": key, "workload": train.describe(train_key), "model_mb": found["full"]["model"] / 2**20,
        **{f"{v}_mb": m for v, m in mib.items()}, "lorakit_vs_peft": mib["lorakit"] / mib["peft"],
        "lorakit_vs_full": mib["lorakit"] / mib["full"], "meets_vs_peft": mib["lorakit"] / mib["peft"] <= TARGET_VS_PEFT,
        "steps": STEPS[size], "method": found["lorakit"]["method"],
    }


def main() -> None:
    """Entry point of the child process: measure one variant and print one JSON line."""
    parser = argparse.ArgumentParser(description="Peak training memory of one variant, in this process.")
    parser.add_argument("train_key", choices=list(train.ROWS))
    parser.add_argument("variant", choices=list(MAKERS))
    parser.add_argument("--size", default="full", choices=list(STEPS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    set_threads()
    print(json.dumps(measure(args.train_key, args.variant, args.size, args.device)))


if __name__ == "__main__":
    main()
