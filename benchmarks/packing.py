"""Packing against padding: training throughput (real tokens per second) of a Llama with LoRA on examples of a
realistic spread of lengths, and the padding waste of each way of batching.

    python -m benchmarks.packing [--size tiny|small|full] [--device cuda] [--out FILE]

Lengths are lognormal (chat and instruction sets have a long tail: most examples are short, a few fill the window),
median max_length/8, clipped to [8, max_length]. Padded: the examples in a seeded random order, `batch` per step,
each batch padded to its longest. Packed: best-fit rows of max_length in a seeded random order, as many rows per
step as carry the same number of real tokens on average (so both ways take equal optimizer steps per token). One
epoch each way, `rounds` times, alternating; the fastest epoch counts.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, inject, optimizer
from lorakit.data.packing import STRATEGIES, PackedCollator, attention_mode, pack_groups, pack_rows, padding_stats
from lorakit.runtime.precision import autocast

from .common import machine, set_threads, sync

# Model dimensions and data per size: "full" is a Llama of GPT-2 small's width (134M, as benchmarks/common.py).
SIZES = {
    "tiny": dict(layers=2, hidden=32, inter=64, heads=4, vocab=128, examples=48, max_length=64, batch=8, rounds=1),
    "small": dict(layers=4, hidden=256, inter=688, heads=4, vocab=32000, examples=256, max_length=512, batch=8,
                  rounds=2),
    "full": dict(layers=12, hidden=768, inter=2048, heads=12, vocab=32000, examples=4096, max_length=2048, batch=16,
                 rounds=2),
}
OUT = Path(__file__).resolve().parent / "results" / "packing.json"


def lognormal_lengths(n: int, max_length: int, seed: int = 0, sigma: float = 1.0) -> list[int]:
    """n example lengths, lognormal with median max_length/8, clipped to [8, max_length]."""
    rng = random.Random(seed)
    return [max(8, min(max_length, round(rng.lognormvariate(0, sigma) * max_length / 8))) for _ in range(n)]


def examples(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    """Random token ids; the first 30% of each example is a prompt without loss, as in chat data."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = max(1, int(0.3 * n))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def padded_batches(rows: list[dict], batch: int, seed: int) -> list[dict]:
    """Batches of `batch` examples in a seeded order, padded to the longest (pad id 0, label -100, mask 0)."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    out = []
    for i in range(0, len(order), batch):
        part = [rows[j] for j in order[i:i + batch]]
        width = max(len(r["input_ids"]) for r in part)
        pad = [width - len(r["input_ids"]) for r in part]
        out.append({"input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(part, pad)]),
                    "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(part, pad)]),
                    "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(part, pad)])})
    return out


def packed_batches(rows: list[dict], max_length: int, per_step: int, attention: str, seed: int) -> list[dict]:
    """Best-fit packed rows in a seeded order, `per_step` rows a batch, through PackedCollator."""
    groups = pack_groups([len(r["input_ids"]) for r in rows], max_length)
    columns = pack_rows({k: [r[k] for r in rows] for k in ("input_ids", "labels")}, groups)
    packed = [dict(zip(columns, values)) for values in zip(*columns.values())]
    packed = random.Random(seed).sample(packed, len(packed))
    collate = PackedCollator(pad_token_id=0, attention=attention)
    return [collate(packed[i:i + per_step]) for i in range(0, len(packed), per_step)]


def model_for(spec: dict, device: str):
    """A random Llama of `spec`'s size with LoRA r=8 on q_proj and v_proj, and AdamW over the adapter."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=spec["layers"], hidden_size=spec["hidden"],
                                      intermediate_size=spec["inter"], num_attention_heads=spec["heads"],
                                      num_key_value_heads=spec["heads"], vocab_size=spec["vocab"],
                                      max_position_embeddings=spec["max_length"])
    model = transformers.LlamaForCausalLM(config).to(device)
    inject(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    return model.train(), optimizer(model, lr=1e-4)


def epoch_seconds(model, opt, batches: list[dict], precision: str, device: str) -> float:
    """Seconds of one training epoch (forward, backward, AdamW step per batch)."""
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        with autocast(precision, device):
            loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def waste_rows(lengths: list[int], spec: dict, per_step: int) -> dict:
    """Padding waste of padded batches and of packed batches (best-fit and sequential), as the benchmark batches."""
    order = random.Random(1).sample(range(len(lengths)), len(lengths))
    out = {"padded": padding_stats([lengths[i] for i in order], spec["batch"])}
    for strategy in STRATEGIES:
        groups = pack_groups(lengths, spec["max_length"], strategy)
        rows = random.Random(2).sample([sum(lengths[i] for i in g) for g in groups], len(groups))
        out[f"packed-{strategy}"] = {**padding_stats(rows, per_step), "rows": len(groups)}
    return out


def measure(size: str, device: str, precision: str) -> dict:
    """Throughput and padding waste, padded against packed, for `size`."""
    spec = SIZES[size]
    lengths = lognormal_lengths(spec["examples"], spec["max_length"])
    rows = examples(lengths, spec["vocab"])
    per_step = max(1, round(spec["batch"] * sum(lengths) / len(lengths) / spec["max_length"]))
    model, opt = model_for(spec, device)
    plans = {"padded": padded_batches(rows, spec["batch"], seed=1)}
    attention = attention_mode(model)  # the cache off: padded batches are unaffected by it
    plans["packed"] = packed_batches(rows, spec["max_length"], per_step, attention, seed=2)
    for batches in plans.values():  # warm-up: kernels, allocator, autotuning
        epoch_seconds(model, opt, batches[:2], precision, device)
    best = {name: float("inf") for name in plans}
    for _ in range(spec["rounds"]):
        for name, batches in plans.items():
            best[name] = min(best[name], epoch_seconds(model, opt, batches, precision, device))
    waste = waste_rows(lengths, spec, per_step)
    tokens = sum(lengths)
    result = {name: {"steps": len(plans[name]), "seconds": best[name], "tokens_per_s": tokens / best[name],
                     "waste": waste[name if name == "padded" else "packed-best-fit"]["waste"]} for name in plans}
    result["packed"].update(rows_per_step=per_step, attention=attention)
    result["padded"].update(examples_per_step=spec["batch"])
    return {"size": size, "device": device, "precision": precision, "examples": len(lengths), "tokens": tokens,
            "max_length": spec["max_length"], "median_length": sorted(lengths)[len(lengths) // 2],
            "speedup": best["padded"] / best["packed"], "modes": result, "waste": waste}


def report(r: dict) -> str:
    """A Markdown summary of one measurement."""
    lines = [f"Llama ({r['size']}), {r['examples']} examples, {r['tokens']} tokens, median length "
             f"{r['median_length']} of {r['max_length']}, {r['device']} {r['precision']}: packed is "
             f"{r['speedup']:.2f}x the tokens/s of padded", "",
             "| batching | steps | epoch s | tokens/s | padding waste |", "| --- | --- | --- | --- | --- |"]
    for name, m in r["modes"].items():
        lines.append(f"| {name} | {m['steps']} | {m['seconds']:.2f} | {m['tokens_per_s']:,.0f} | {m['waste']:.1%} |")
    lines += ["", "| padding waste | tokens | slots | waste |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {w['tokens']} | {w['slots']} | {w['waste']:.1%} |" for k, w in r["waste"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, else fp32")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    set_threads()
    result = measure(args.size, args.device, args.precision or ("bf16" if args.device.startswith("cuda") else "fp32"))
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    return result


if __name__ == "__main__":
    main()
