"""Issue 25's `--compile` on the CPU: the training step of lorakit LoRA on a random Llama-134M (12 layers, 768 wide,
vocabulary 32,000; r=8 on q_proj,v_proj, lorakit's chunked loss, AdamW) with every transformer block torch.compile'd
(runtime/compiling.py, inductor's C++ backend) against the same model uncompiled, with and without gradient
checkpointing.

    python -m benchmarks.compiled [--size full|tiny] [--rounds 4] [--precision fp32|bf16] [--out FILE.json]

Each checkpointing setting runs in a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR, a new
temporary folder), so that the compile time is a cold start's, as a user's first run sees it. In that process both
models are built from the same weights; the first step of each is timed alone (the compiled one's includes compiling
every block: "compile_s" is its first step less the eager first step), then `rounds` steps of each alternate
(benchmarks.common.interleave, one untimed round first), so that a slow spell of the shared machine hits both alike.
Each step's CPU seconds (getrusage, all threads) are recorded beside its wall time: on a machine other jobs share,
they measure the work done more steadily. The machine's load average is recorded before and after each process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"full": ("llama", "full", (2, 256)), "tiny": ("llama", "tiny", (2, 16))}  # common.base_model's, (batch, tokens)
SETTINGS = (False, True)  # gradient checkpointing


def build(size: str, checkpointing: bool, compiled: bool):
    """lorakit LoRA on the size's Llama (the same weights every call: seeded), its loss chunked as `lorakit train`
    does, checkpointed and compiled as asked; (the net that gives the loss, AdamW over the adapter)."""
    import torch

    from lorakit.adapters.inject import enable_gradient_checkpointing
    from lorakit.runtime.compiling import compile_blocks
    from lorakit.training.chunked_loss import loss_model

    from .common import base_model, make_lorakit

    name, model_size, _ = SIZES[size]
    model = make_lorakit(base_model(name, model_size).requires_grad_(False), name, dropout=0.0)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    net, why = loss_model(model, 512)
    assert why is None, why
    if compiled:
        compile_blocks(model)
    return net, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def cpu_seconds() -> float:
    """This process's CPU time, all threads, user + system: less sensitive than wall time to other jobs' load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def step_fn(net, opt, inputs: dict, precision: str, cpu: list):
    """One training step of `net`; appends its CPU seconds to `cpu`."""
    from lorakit.runtime.precision import autocast

    def step():
        start = cpu_seconds()
        with autocast(precision, "cpu"):
            loss = net(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu.append(cpu_seconds() - start)
    return step


def measure(size: str, checkpointing: bool, precision: str, rounds: int) -> dict:
    """One process's measurements: each model's first step alone, then `rounds` alternating steps."""
    import torch

    from .common import interleave, set_threads, summary

    set_threads()
    _, _, (n, t) = SIZES[size]
    ids = torch.randint(0, 128 if size == "tiny" else 32000, (n, t), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    cpu = {"eager": [], "compiled": []}
    steps = {name: step_fn(*build(size, checkpointing, name == "compiled"), inputs, precision, cpu[name])
             for name in cpu}
    first = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    times = interleave(steps, warmup=1, repeats=rounds)
    stats = {name: summary(v) for name, v in times.items()}
    cpu = {name: statistics.median(v[-rounds:]) for name, v in cpu.items()}  # the timed rounds'
    return {"first_step_s": first, "compile_s": first["compiled"] - first["eager"], "cpu_s": cpu,
            "cpu_speedup": cpu["eager"] / cpu["compiled"],
            "step_s": {name: s["median"] for name, s in stats.items()},
            "quartiles": {name: (s["p25"], s["p75"]) for name, s in stats.items()},
            "speedup": stats["eager"]["median"] / stats["compiled"]["median"], "steps": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    args = parser.parse_args()
    from .common import machine

    runs = []
    for checkpointing in SETTINGS:
        load = os.getloadavg()
        with tempfile.TemporaryDirectory() as cache:
            cmd = [sys.executable, "-m", "benchmarks.compiled", "worker", args.size, str(checkpointing),
                   args.precision, str(args.rounds)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        runs.append({"checkpointing": checkpointing, **json.loads(done.stdout.strip().splitlines()[-1]),
                     "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()]})
    _, _, (n, t) = SIZES[args.size]
    data = {"command": f"python -m benchmarks.compiled --size {args.size} --rounds {args.rounds} --precision "
                       f"{args.precision}", "size": args.size, "batch": f"{n}×{t}", "precision": args.precision,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "runs": runs}
    text = json.dumps(data, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    for r in runs:
        print(f"checkpointing {r['checkpointing']}: compile {r['compile_s']:.1f} s; step eager "
              f"{r['step_s']['eager']:.2f} s, compiled {r['step_s']['compiled']:.2f} s (x{r['speedup']:.2f}); CPU s per "
              f"step {r['cpu_s']['eager']:.2f} vs {r['cpu_s']['compiled']:.2f} (x{r['cpu_speedup']:.2f}); "
              f"load {r['load_before']} -> {r['load_after']}", file=sys.stderr)


def worker(argv: list[str]) -> None:
    """One measured process: `worker SIZE CHECKPOINTING PRECISION ROUNDS`; prints one JSON line."""
    size, checkpointing, precision, rounds = argv[0], argv[1] == "True", argv[2], int(argv[3])
    print(json.dumps(measure(size, checkpointing, precision, rounds)))


if __name__ == "__main__":
    main()
