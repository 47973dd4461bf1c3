"""NF4 throughput on this machine, at Llama-2-7B shapes: quantize_nf4 in parameters/s beside bitsandbytes' own
`quantize_4bit(quant_type="nf4", compress_statistics=True)`, dequantize_nf4 in elements/s (to float32 and
bfloat16), and nf4_linear forward + backward (input gradient only: the weight is frozen) beside F.linear on the
dequantized weight, which is what the dequantization adds to every training step.

    python -m benchmarks.nf4 [--size full|tiny] [--threads 2] [--rounds 5]
                             [--only quantize dequantize linear paths step cuda] [--dtypes fp32 bf16] [--json out.json]

`paths`: each dequantize path on the CPU (pure torch, torch.compile) and whether it is bit-exact; `step`: one frozen
linear's share of a checkpointed training step, its weight dequantized again in backward or kept from the recompute.

Times are the best of `rounds` runs after one warm-up (the least disturbed by other processes); `cpu_s` is the
process CPU time of that run, a second view on a shared machine (wall ≈ cpu / threads when nothing else runs).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lorakit.nn.nf4 import dequantize_nf4, nf4_linear, quantize_nf4

SHAPES = {"full": [(4096, 4096), (11008, 4096)], "tiny": [(64, 128), (96, 64)]}  # (out, in): q_proj, up_proj
TOKENS = {"full": 128, "tiny": 8}  # rows of x for the linear rows: one 128-token sequence
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, rounds: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of `rounds` calls of fn, after one warm-up call."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def bnb_quantizer():
    """bitsandbytes' NF4 quantizer as fn(weight), or the reason it cannot run here (a string)."""
    try:
        import bitsandbytes.functional as bnb_f

        bnb_f.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # not installed, or no kernels for this CPU
        return f"{type(e).__name__}: {e}"
    return lambda w: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def quantize_rows(size: str, rounds: int, dtypes: list[str]) -> list[dict]:
    """Parameters/s of quantize_nf4 and of bitsandbytes per shape and input dtype."""
    bnb, rows = bnb_quantizer(), []
    for shape in SHAPES[size]:
        for name in dtypes:
            dtype = DTYPES[name]
            w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            wall, cpu = timed(lambda: quantize_nf4(w), rounds)
            row = {"op": "quantize", "shape": list(shape), "dtype": name, "s": wall, "cpu_s": cpu,
                   "mparams_per_s": w.numel() / wall / 1e6}
            if callable(bnb):
                bnb_wall, bnb_cpu = timed(lambda: bnb(w), rounds)
                row.update(bnb_s=bnb_wall, bnb_cpu_s=bnb_cpu, bnb_mparams_per_s=w.numel() / bnb_wall / 1e6)
            else:
                row["bnb_error"] = bnb
            rows.append(row)
    return rows


def dequantize_rows(size: str, rounds: int, dtypes: list[str]) -> list[dict]:
    """Elements/s of dequantize_nf4 per shape and output dtype."""
    rows = []
    for shape in SHAPES[size]:
        q = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        for name in dtypes:
            dtype = DTYPES[name]
            wall, cpu = timed(lambda: dequantize_nf4(q, dtype), rounds)
            rows.append({"op": "dequantize", "shape": list(shape), "dtype": name, "s": wall, "cpu_s": cpu,
                         "melems_per_s": q.shape.numel() / wall / 1e6})
    return rows


def _linear_cases(size: str, dtypes: list[str]):
    """Per shape and dtype: (shape, dtype name, the quantized weight, it dequantized, x requiring grad, the output's
    gradient), x and the gradient one sequence of TOKENS[size] tokens."""
    tokens = TOKENS[size]
    for shape in SHAPES[size]:
        q = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        for name in dtypes:
            dtype = DTYPES[name]
            x = torch.randn(tokens, shape[1], dtype=dtype, requires_grad=True)
            yield shape, name, q, dequantize_nf4(q, dtype), x, torch.randn(tokens, shape[0], dtype=dtype)


def linear_rows(size: str, rounds: int, dtypes: list[str]) -> list[dict]:
    """Seconds of y = x Wᵀ forward + backward to x through nf4_linear and through F.linear on the already
    dequantized W (no dequantization), x (tokens, in) requiring grad; their ratio is the cost of the 4-bit storage."""
    rows, tokens = [], TOKENS[size]
    for shape, name, q, w, x, g in _linear_cases(size, dtypes):
        nf4_s, nf4_cpu = timed(lambda: nf4_linear(x, q).backward(g), rounds)
        dense_s, dense_cpu = timed(lambda: F.linear(x, w).backward(g), rounds)
        rows.append({"op": "linear fwd+bwd", "shape": list(shape), "dtype": name, "tokens": tokens,
                     "nf4_s": nf4_s, "dense_s": dense_s, "nf4_cpu_s": nf4_cpu, "dense_cpu_s": dense_cpu,
                     "nf4_vs_dense": nf4_s / dense_s})
    return rows


def path_rows(size: str, rounds: int, dtypes: list[str], device: str = "cpu") -> list[dict]:
    """On `device`: elements/s of each dequantize path (pure torch, torch.compile; on the CPU lorakit's C kernel, on
    CUDA bitsandbytes' kernel) per output dtype, and whether it equals the pure-torch output bit for bit; a path that
    cannot run gets its error instead. The library picks the first exact one (nf4._fast_dequantizer). The C kernel's
    output buffers are reused from its pool after the warm-up call, as in training."""
    from lorakit.nn import nf4 as quant

    paths = {"torch": quant._dequantize_torch, "torch.compile": quant._dequantize_compiled}
    paths.update({"bitsandbytes": quant._dequantize_bnb} if device == "cuda" else {"C kernel": quant._dequantize_c})
    rows = []
    for shape in SHAPES[size]:
        q = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            reference = quant._dequantize_torch(q, dtype)
            for name, fn in paths.items():
                row = {"op": f"dequantize {device}", "shape": list(shape), "dtype": dtype_name, "path": name}
                try:
                    exact = torch.equal(fn(q, dtype), reference)
                    wall, _ = timed(lambda: (fn(q, dtype), _sync(device)), rounds)
                except Exception as e:  # not installed, no kernel for this GPU, no compiler
                    rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                rows.append({**row, "s": wall, "exact": exact, "melems_per_s": q.shape.numel() / wall / 1e6})
    return rows


def cuda_rows(size: str, rounds: int, dtypes: list[str]) -> list[dict]:
    """path_rows on CUDA, bf16."""
    return path_rows(size, rounds, ["bf16"], "cuda")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_rows(size: str, rounds: int, dtypes: list[str]) -> list[dict]:
    """One frozen linear's share of a step with gradient checkpointing: a forward without grad (the checkpointed
    pass), then the recompute with grad and the backward to x. Through nf4_linear with the weight dequantized again
    in backward, and kept from the recompute (keep_for_backward, as in checkpointed blocks); beside F.linear on the
    dense weight, the step's matmul limit."""
    rows, tokens = [], TOKENS[size]
    for shape, name, q, w, x, g in _linear_cases(size, dtypes):

        def step(linear):
            with torch.no_grad():
                linear(x)
            linear(x).backward(g)

        row = {"op": "checkpointed step", "shape": list(shape), "dtype": name, "tokens": tokens}
        row["dense_s"], _ = timed(lambda: step(lambda x: F.linear(x, w)), rounds)
        for keep in (False, True):
            q.keep_for_backward = keep
            row["kept_s" if keep else "rebuilt_s"], _ = timed(lambda: step(lambda x: nf4_linear(x, q)), rounds)
        q.keep_for_backward = False
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, one line per measurement."""
    lines = ["| op | shape | dtype | lorakit | beside it |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        shape = "×".join(map(str, r["shape"]))
        if r["op"] == "quantize":
            other = (f"bitsandbytes {r['bnb_mparams_per_s']:.0f} M params/s" if "bnb_mparams_per_s" in r
                     else f"bitsandbytes: {r['bnb_error']}")
            ours = f"{r['mparams_per_s']:.0f} M params/s"
        elif r["op"] == "dequantize":
            ours, other = f"{r['melems_per_s']:.0f} M elements/s", ""
        elif r["op"] == "checkpointed step":
            ours = f"kept {r['kept_s'] * 1e3:.1f} ms, rebuilt {r['rebuilt_s'] * 1e3:.1f} ms"
            other = (f"F.linear {r['dense_s'] * 1e3:.1f} ms (kept {r['kept_s'] / r['dense_s']:.2f}×, rebuilt "
                     f"{r['rebuilt_s'] / r['dense_s']:.2f}×), {r['tokens']} tokens")
        elif r["op"].startswith("dequantize "):
            ours = r.get("error") or f"{r['melems_per_s']:.0f} M elements/s"
            other = f"path {r['path']}" + ("" if "error" in r else f", bit-exact: {r['exact']}")
        else:
            ours = f"{r['nf4_s'] * 1e3:.1f} ms"
            other = f"F.linear {r['dense_s'] * 1e3:.1f} ms ({r['nf4_vs_dense']:.2f}×), {r['tokens']} tokens"
        lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {ours} | {other} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["quantize", "dequantize", "linear"],
                        choices=["quantize", "dequantize", "linear", "paths", "step", "cuda"])
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES),
                        help="weight / output / compute dtypes (bf16 matmuls crawl on CPUs without native bf16)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    makers = {"quantize": quantize_rows, "dequantize": dequantize_rows, "linear": linear_rows, "paths": path_rows,
              "step": step_rows, "cuda": cuda_rows}
    print(f"torch threads: {args.threads}")
    previous, rows = torch.get_num_threads(), []
    torch.set_num_threads(args.threads)
    for name in args.only:  # printed group by group: a slow group shows the earlier ones
        group = makers[name](args.size, args.rounds, args.dtypes)
        print(table(group), flush=True)
        rows += group
    torch.set_num_threads(previous)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
