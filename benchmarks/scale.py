"""Issue 15, large models on a small machine: QLoRA on random-weight Llama-2-7B and 13B checkpoints on this CPU.

    python -m benchmarks.scale build 7b          # the cached checkpoint only (says how much disk it needs)
    python -m benchmarks.scale gflops 7b         # the machine's fp32 / bf16 matmul rate at the model's shapes
    python -m benchmarks.scale flops 7b          # FLOPs of one training step, by term
    python -m benchmarks.scale memory 7b         # memory that QLoRA, plain bf16 LoRA and full fine-tuning need
    python -m benchmarks.scale bnb-check         # can bitsandbytes run PEFT's 4-bit LoRA on this CPU?
    python -m benchmarks.scale run 7b [--targets q_proj,v_proj|all-linear] [--dtype bf16]

Checkpoints: bf16 safetensors shards of about 2 GB, `model.safetensors.index.json`, `config.json` and a small byte-level
BPE tokenizer, written tensor by tensor (at most one tensor in memory; the model is never built), cached under
~/.cache/lorakit-bench/<size> (LORAKIT_BENCH_CACHE overrides) and marked complete by a COMPLETE file written last.

`run` launches `lorakit train --task causal-lm --quantize nf4 --max-steps 3` on 128-token rows, batch 1, r = 16, as a
separate process, and reads its peak resident memory (VmHWM) while loading and while training, the seconds to load
and per step, and tokens/s (also with --gradient-checkpointing; bf16 compute rows only where bf16 is fast).

Found on the 2-core AMD EPYC (AVX2 only; torch 2.13 CPU; 2026-11-26, the machine shared with other jobs):
bitsandbytes 0.50.2 runs PEFT's 4-bit LoRA on this CPU (Linear4bit layers, a training step with gradient
checkpointing: `bnb-check`). fp32 matmul at 7B's layer shapes, 128 tokens, 2 threads: 40 GFLOPS (13B: 47); bf16:
0.35 over a layer (x·Wᵀ 10 GFLOPS, grad·W 0.2): no native bf16, so the bf16 rows are skipped here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path.home() / ".cache" / "lorakit-bench"))
GB = 10**9
# Llama-2 configurations (kv heads = heads: no grouped-query attention at these sizes); "tiny" is for the tests.
SIZES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=4, vocab_size=1024),
}
SHARD_BYTES = {"7b": 2 * GB, "13b": 2 * GB, "tiny": 200_000}  # tiny: several shards, so that sharding is tested
TOKENS, RANK = 128, 16  # tokens per row (batch 1), LoRA rank
TARGETS = {"qv": "q_proj,v_proj", "all-linear": "all-linear"}
LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ---- the checkpoint ----

def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each Linear of one decoder layer."""
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM checkpoint (untied head), in Hugging Face's order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [(f"{p}.{LINEARS[n]}.{n}.weight", s) for n, s in linear_shapes(cfg).items()]
        specs += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def n_params(cfg: dict) -> int:
    return sum(math.prod(s) for _, s in tensor_specs(cfg))


def shard_plan(specs: list, shard_bytes: int) -> list[list]:
    """Consecutive groups of specs, each at most shard_bytes of bf16 data (or one tensor, if larger)."""
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def disk_needed(size: str) -> int:
    """Bytes the checkpoint of `size` takes on disk: its bf16 tensors, plus 1 MB for headers, config and tokenizer."""
    return 2 * n_params(SIZES[size]) + 10**6


def random_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Deterministic bf16 weights: norms 1, everything else N(0, 0.02²) (transformers' Llama initialisation)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def write_safetensors(path: Path, specs: list, make) -> None:
    """A safetensors file of bf16 tensors written one at a time: all offsets follow from the shapes, so the header
    goes first and each tensor's bytes follow as make(name, shape) returns it (the format: an 8-byte little-endian
    header length, the JSON header padded to 8 bytes, then the raw data)."""
    header, offset = {}, 0
    for name, shape in specs:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * math.prod(shape)]}
        offset += 2 * math.prod(shape)
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            t = make(name, shape)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == tuple(shape), name
            f.write(t.contiguous().view(torch.uint8).numpy().data)  # little-endian, as safetensors stores
    os.replace(tmp, path)


def write_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer (Llama's special tokens <unk>=0, <s>=1, </s>=2) trained on WORDS; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return len(fast)


WORDS = ("the model reads a long sentence about mountains rivers cities markets engines gardens music science "
         "history weather ships bridges letters numbers colours animals forests deserts islands roads").split()


def build_checkpoint(size: str, root: Path = CACHE) -> Path:
    """The cached checkpoint of `size`, built if absent (a partial one is rebuilt). Raises NotEnoughDisk first
    when the disk cannot hold it."""
    path = root / size
    if (path / "COMPLETE").exists():
        return path
    need = disk_needed(size)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    free = shutil.disk_usage(path).free
    if free < need + GB:  # keep 1 GB spare for everyone else
        shutil.rmtree(path)
        raise NotEnoughDisk(f"the {size} checkpoint needs {need / GB:.1f} GB (+1 GB spare) in {root}; "
                            f"{free / GB:.1f} GB free")
    started, cfg = time.perf_counter(), SIZES[size]
    from transformers import LlamaConfig

    vocab = write_tokenizer(path)
    assert vocab <= cfg["vocab_size"], (vocab, cfg["vocab_size"])  # unused rows of the embedding are harmless
    LlamaConfig(**cfg, num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                dtype="bfloat16").save_pretrained(path)
    specs = tensor_specs(cfg)
    seeds = {name: i for i, (name, _) in enumerate(specs)}
    shards, weight_map = shard_plan(specs, SHARD_BYTES[size]), {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / file, shard, lambda name, shape: random_tensor(name, shape, seeds[name]))
        weight_map.update({name: file for name, _ in shard})
    index = {"metadata": {"total_size": 2 * n_params(cfg)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    on_disk = sum(f.stat().st_size for f in path.iterdir())
    (path / "COMPLETE").write_text(json.dumps({"size": size, "bytes": on_disk, "shards": len(shards),
                                               "seconds": round(time.perf_counter() - started, 1)}))
    return path


class NotEnoughDisk(RuntimeError):
    pass


def write_data(path: Path, rows: int = 16, words: int = 200) -> Path:
    """A JSONL file (column `text`) of `rows` rows of `words` random WORDS: ≥ 128 tokens each with write_tokenizer's
    vocabulary (training truncates them to exactly --max-length 128)."""
    import random

    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=words))}) + "\n" for _ in range(rows)))
    return path


# ---- the machine's matmul rate, a step's FLOPs, the memory each method needs ----

def layer_matmuls(cfg: dict, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of the matrix products through one decoder layer's Linears at `tokens` rows, forward
    (x (m, k) · Wᵀ, W (n, k)) and backward to the input (grad (m, n) · W): those are the step's big products."""
    shapes = linear_shapes(cfg)
    return [(f"{name} fwd", tokens, d_in, d_out) for name, (d_out, d_in) in shapes.items()] + \
           [(f"{name} bwd", tokens, d_out, d_in) for name, (d_out, d_in) in shapes.items()]


def measure_gflops(cfg: dict, tokens: int = TOKENS, threads: int = 2, rounds: int = 5,
                   dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """GFLOPS (2·m·k·n / s) of torch's matmul on `threads` threads at each product of layer_matmuls, best of
    `rounds`, and per dtype the rate over the whole layer (all its FLOPs / all its seconds): the machine's limit for
    this model's step at this batch. A product whose first (warm-up) call takes over a second is timed by that call
    alone: bf16 without native bf16 instructions falls back to scalar code, 1 GFLOPS here for grad · W."""
    previous, found = torch.get_num_threads(), {}
    torch.set_num_threads(threads)
    for dtype in dtypes:
        per, flops, seconds = {}, 0, 0.0
        for name, m, k, n in layer_matmuls(cfg, tokens):
            a = torch.randn(m, k).to(dtype)
            w = torch.randn(n, k).to(dtype) if name.endswith("fwd") else torch.randn(k, n).to(dtype)
            fn = (lambda: torch.nn.functional.linear(a, w)) if name.endswith("fwd") else (lambda: a @ w)
            first = _seconds(fn)
            best = first if first > 1.0 else min(_seconds(fn) for _ in range(rounds))
            per[name] = 2 * m * k * n / best / 1e9
            flops, seconds = flops + 2 * m * k * n, seconds + best
        found[str(dtype).removeprefix("torch.")] = {"gflops": flops / seconds / 1e9, "per_product": per}
    torch.set_num_threads(previous)
    return {"threads": threads, "tokens": tokens, **found}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(cfg: dict, tokens: int = TOKENS, seq: int = TOKENS, r: int = RANK, targets=("q_proj", "v_proj"),
               checkpointing: str | None = "reentrant") -> dict:
    """FLOPs of one QLoRA training step (a multiply-add = 2 FLOPs; `tokens` = batch · seq). With L layers:

        F_lin  = 2 · tokens · L · Σ in·out over a layer's Linears (the frozen, NF4 products)
        F_attn = 4 · tokens · seq · hidden · L      (scores Q·Kᵀ and the weighted sum, full S×S as SDPA computes)
        F_lora = 2 · tokens · r · L · Σ (in + out) over the adapted Linears (x·Aᵀ, then ·Bᵀ)
        F_head = 2 · tokens · hidden · vocab        (lm_head, frozen, not checkpointed)

        step = 2 · F_lin + 3 · (F_attn + F_lora) + 2 · F_head + F_recompute

    because a frozen weight needs only the input gradient in backward (1× its forward), attention and LoRA need
    gradients to both operands (2×). Gradient checkpointing runs each layer's forward again in backward:
    F_recompute = F_lin + F_attn + F_lora ("reentrant", what PEFT's prepare_model_for_kbit_training uses), less
    the un-adapted down_proj's product with "non-reentrant" (torch stops recomputing once every tensor backward
    needs exists, and that last output is not one). Norms, RoPE, softmax, SiLU, the loss and the optimizer are
    O(tokens · hidden): left out (<1% here). Dequantizing NF4 is not model arithmetic: it is part of what a
    measured step spends beyond these FLOPs. tests/test_scale.py checks all this against torch's FLOP counter."""
    if checkpointing not in (None, "reentrant", "non-reentrant"):
        raise ValueError(f"checkpointing: None, 'reentrant' or 'non-reentrant', got {checkpointing!r}")
    L, h, shapes = cfg["num_hidden_layers"], cfg["hidden_size"], linear_shapes(cfg)
    lin = 2 * tokens * L * sum(o * i for o, i in shapes.values())
    attn = 4 * tokens * seq * h * L
    lora = 2 * tokens * r * L * sum(sum(shapes[t]) for t in targets)
    head = 2 * tokens * h * cfg["vocab_size"]
    recompute = 0 if checkpointing is None else lin + attn + lora
    if checkpointing == "non-reentrant" and "down_proj" not in targets:
        recompute -= 2 * tokens * L * math.prod(shapes["down_proj"])
    total = 2 * lin + 3 * (attn + lora) + 2 * head + recompute
    return {"total": total, "linear": lin, "attention": attn, "lora": lora, "head": head, "recompute": recompute,
            "checkpointing": checkpointing}


def adapted(cfg: dict, targets: str) -> list[str]:
    """Names of the adapted Linears of a layer for a --targets value."""
    return list(LINEARS) if targets == "all-linear" else targets.split(",")


def memory_estimates(cfg: dict, targets: str = "q_proj,v_proj", r: int = RANK, tokens: int = TOKENS) -> dict:
    """Bytes each method needs, computed (not measured), weights and training state only (activations at 128 tokens
    are tens of MB beside them; see `activations`):

        NF4 Linear weight: 0.5 + 1/64 + 4/(64·256) bytes per weight (codes, 8-bit scales, float32 absmax2)
        QLoRA:        NF4 decoder Linears + embeddings, lm_head and norms in bf16 + 16 bytes per LoRA weight
        bf16 LoRA:    every weight in bf16 (2 bytes) + 16 bytes per LoRA weight
        full fine-tuning (AdamW, mixed precision as usual): 16 bytes per weight: bf16 weight and gradient (2 + 2),
                      float32 master weight and two moments (4 + 4 + 4); plain fp32 AdamW is also 4+4+8 = 16
        LoRA weight:  float32 value, gradient and two AdamW moments: 4 · 4 = 16 bytes"""
    shapes, L = linear_shapes(cfg), cfg["num_hidden_layers"]
    total = n_params(cfg)
    linear = L * sum(o * i for o, i in shapes.values())
    lora = L * r * sum(sum(shapes[t]) for t in adapted(cfg, targets))
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    return {"params": total, "lora_params": lora,
            "qlora": nf4 + 2 * (total - linear) + 16 * lora,
            "bf16_lora": 2 * total + 16 * lora,
            "full_finetuning": 16 * total,
            "activations": activations(cfg, tokens)}


def activations(cfg: dict, tokens: int) -> int:
    """Rough bytes of activations with gradient checkpointing, float32: each layer's saved input (tokens · hidden),
    one layer recomputed in full (about 10 · hidden + 3 · intermediate per token), and the float32 logits and their
    gradient (2 · tokens · vocab)."""
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    return 4 * tokens * (cfg["num_hidden_layers"] * h + 10 * h + 3 * m + 2 * cfg["vocab_size"])


# ---- can bitsandbytes train PEFT's 4-bit LoRA here? ----

def bnb_peft_check() -> dict:
    """One training step of PEFT's LoRA (r = 16, q_proj and v_proj) on a tiny Llama loaded in 4 bits by bitsandbytes
    (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, double quantization, on the CPU), with
    PEFT's gradient checkpointing. {"ok": True, ...} or {"ok": False, "error": ...}."""
    import tempfile
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    found = {"ok": False}
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**SIZES["tiny"])).save_pretrained(d)
            model = _peft_bnb_model(d, "q_proj,v_proj", torch.float32)
            ids = torch.randint(0, SIZES["tiny"]["vocab_size"], (1, TOKENS))
            model(input_ids=ids, labels=ids).loss.backward()
            grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
            found.update(ok=all(g is not None and bool(g.abs().sum() > 0) for g in grads),
                         frozen_layer=type(model.base_model.model.model.layers[0].self_attn.k_proj).__name__)
    except Exception as e:  # the answer is the error: not installed, no CPU kernels, unsupported by this version
        found["error"] = f"{type(e).__name__}: {e}"[:500]
    return found


def _peft_bnb_model(path: str, targets: str, compute_dtype: torch.dtype):
    """PEFT's QLoRA recipe: 4-bit NF4 base by bitsandbytes (double-quantized), prepare_model_for_kbit_training with
    gradient checkpointing, LoRA r = 16, alpha 16, dropout 0.05 on `targets` (lorakit's defaults beside)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    modules = list(LINEARS) if targets == "all-linear" else targets.split(",")
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.05, target_modules=modules,
                                            task_type="CAUSAL_LM")).train()


def peft_child(path: str, data: str, targets: str, steps: int, dtype: str) -> None:
    """The PEFT + bitsandbytes run, in its own process: loads, prints PEFT_LOADED, then one JSON line per step."""
    from transformers import AutoTokenizer

    model = _peft_bnb_model(path, targets, DTYPES[dtype])
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(PEFT_LOADED + json.dumps({"model_bytes": model_bytes}), flush=True)
    tok = AutoTokenizer.from_pretrained(path)
    texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        ids = tok(texts[step % len(texts)], truncation=True, max_length=TOKENS, return_tensors="pt")["input_ids"]
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps({"step": step + 1, "seconds": time.perf_counter() - start, "tokens": ids.numel()}), flush=True)


# ---- the runs: a child process, its memory sampled from outside ----

# Printed once the model is ready: by lorakit train ("training N of M parameters ...", after "training data: ...")
# and by peft_child ("peft loaded {json}").
PEFT_LOADED = "peft loaded "
LOADED_MARKER = re.compile(rf"training [\d,]+ of |{PEFT_LOADED}")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith(field + ":")))
    except (OSError, StopIteration):  # the process has ended
        return None


def watch(cmd: list[str]) -> dict:
    """Run cmd, sampling its peak resident memory (VmHWM) every 0.1 s. When it prints a line starting with
    LOADED_MARKER: the seconds since start are the load time, and writing 5 to its /proc/PID/clear_refs resets VmHWM
    to the current RSS, so that the samples before are the loading peak and those after the training peak.
    Returns {"rc", "lines", "load_s", "load_peak", "train_peak", "wall_s"} (peaks in bytes)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    started, lines, load_s = time.perf_counter(), [], None
    phase, peaks, done = ["load"], {"load": 0, "train": 0}, threading.Event()

    def sample():  # the phase is read before VmHWM: a sample taken across the reset counts for loading
        while not done.wait(0.1):
            key, kib = phase[0], _status_kib(proc.pid, "VmHWM") or 0
            peaks[key] = max(peaks[key], kib * 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if load_s is None and LOADED_MARKER.match(line):
            load_s = time.perf_counter() - started
            peaks["load"] = max(peaks["load"], (_status_kib(proc.pid, "VmHWM") or 0) * 1024)
            try:
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            except OSError:  # not Linux, or not allowed: the training peak then includes loading
                pass
            phase[0] = "train"
    rc = proc.wait()
    done.set()
    sampler.join()
    return {"rc": rc, "lines": lines, "load_s": load_s, "load_peak": peaks["load"], "train_peak": peaks["train"],
            "wall_s": time.perf_counter() - started}


def lorakit_command(model: Path, data: Path, out: Path, targets: str, dtype: str | None, steps: int) -> list[str]:
    """The issue's command line, as far as lorakit train supports it today."""
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--task", "causal-lm", "--data", str(data),
           "--quantize", "nf4", "--gradient-checkpointing", "--max-steps", str(steps), "--batch-size", "1",
           "--max-length", str(TOKENS), "--r", str(RANK), "--targets", targets, "--log-every", "1",
           "--output", str(out), "--overwrite"]
    # The compute dtype: the default (--precision auto: bf16 only where bf16 multiplies are fast) or bf16 asked for.
    return cmd + (["--precision", dtype] if dtype else [])


def lorakit_row(model: Path, data: Path, out: Path, targets: str, dtype: str | None, steps: int = 3) -> dict:
    """One measured lorakit run. Seconds per step come from the run's log.jsonl (--log-every 1: tokens/s of each
    step); the first step includes one-time warm-up, so the median of the others is reported when there are any."""
    found = watch(lorakit_command(model, data, out, targets, dtype, steps))
    if found["rc"] != 0:
        return {"method": "lorakit", "error": "\n".join(found["lines"][-15:])}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    metrics = json.loads((out / "metrics.json").read_text())
    return {**_row("lorakit", found, [TOKENS / r for r in rates], metrics["model_bytes"]),
            "compute_dtype": metrics["compute_dtype"]}


def peft_row(model: Path, data: Path, targets: str, dtype: str, steps: int = 3) -> dict:
    """One measured PEFT + bitsandbytes run (peft_child in its own process)."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "peft-child", str(model), str(data), "--targets", targets,
           "--steps", str(steps), "--dtype", dtype]
    found = watch(cmd)
    if found["rc"] != 0:
        return {"method": "peft+bitsandbytes", "error": "\n".join(found["lines"][-15:])}
    marker = next(line for line in found["lines"] if line.startswith(PEFT_LOADED))
    steps_done = [json.loads(line) for line in found["lines"] if line.startswith('{"step"')]
    return _row("peft+bitsandbytes", found, [s["seconds"] for s in steps_done],
                json.loads(marker[len(PEFT_LOADED):])["model_bytes"])


def _row(method: str, found: dict, step_seconds: list[float], model_bytes: int | None) -> dict:
    timed = step_seconds[1:] or step_seconds
    per_step = statistics.median(timed) if timed else None
    return {"method": method, "load_s": found["load_s"], "load_peak": found["load_peak"],
            "train_peak": found["train_peak"], "model_bytes": model_bytes, "step_seconds": step_seconds,
            "s_per_step": per_step, "tokens_per_s": TOKENS / per_step if per_step else None}


def run(size: str, targets: str = "q_proj,v_proj", dtype: str | None = None, steps: int = 3, peft: bool = True,
        root: Path = CACHE) -> dict:
    """lorakit's row and, where bitsandbytes can run PEFT's 4-bit LoRA here, PEFT's, for one size and targets;
    with the computed memory of the alternatives beside them."""
    model, cfg = build_checkpoint(size, root), SIZES[size]
    data = write_data(root / f"{size}-data.jsonl")
    rows = [lorakit_row(model, data, root / "runs" / f"{size}-lorakit", targets, dtype, steps)]
    if peft:
        check = bnb_peft_check()
        rows.append(peft_row(model, data, targets, dtype or "fp32", steps) if check["ok"] else
                    {"method": "peft+bitsandbytes", "error": f"cannot run here: {check.get('error')}"})
    for row in rows:
        row.update(size=size, targets=targets, dtype=dtype or "default")
    # lorakit's --gradient-checkpointing is transformers' non-reentrant checkpointing (enable_gradient_checkpointing)
    flops = step_flops(cfg, targets=adapted(cfg, targets), checkpointing="non-reentrant")
    return {"rows": rows, "estimates": memory_estimates(cfg, targets), "flops": flops}


def report(result: dict, gflops: dict | None = None) -> str:
    """The rows of run() as a markdown table (GiB = 2^30 bytes), the computed alternatives below it; with
    measure_gflops' result, also each step's seconds over those of its FLOPs at the matmul limit (issue: ≤ 3×).
    BENCHMARKS.md's "Large models" section is written from these tables by hand."""
    gib = lambda b: f"{b / 2**30:.2f}" if b else "—"  # noqa: E731
    lines = ["| size | targets | dtype | method | load s | load peak GiB | train peak GiB | model GiB | s/step "
             "| tokens/s | step / matmul limit |", "|" + " --- |" * 11]
    for r in result["rows"]:
        head = f"| {r['size']} | {r['targets']} | {r['dtype']} | {r['method']} |"
        if "error" in r:
            lines.append(head + f" {r['error'].splitlines()[-1][:200]} |" + " |" * 6)
            continue
        limit = "—"
        if gflops and r["s_per_step"]:
            key = "bfloat16" if r["dtype"] == "bf16" else "float32"
            limit = f"{r['s_per_step'] / (result['flops']['total'] / (gflops[key]['gflops'] * 1e9)):.1f}×"
        lines.append(head + f" {r['load_s']:.1f} | {gib(r['load_peak'])} | {gib(r['train_peak'])} | "
                     f"{gib(r['model_bytes'])} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | {limit} |")
    e = result["estimates"]
    lines.append(f"\nComputed (memory_estimates): QLoRA {gib(e['qlora'])} GiB, plain bf16 LoRA {gib(e['bf16_lora'])} "
                 f"GiB, full fine-tuning {gib(e['full_finetuning'])} GiB (16 bytes per weight), plus about "
                 f"{gib(e['activations'])} GiB of activations; step FLOPs {result['flops']['total'] / 1e12:.2f} T.")
    return "\n".join(lines)


def cached_gflops(size: str, threads: int, root: Path = CACHE) -> dict:
    """measure_gflops for `size`, measured once per machine and thread count and kept beside the checkpoints (the
    bf16 rate alone takes minutes to measure where bf16 is slow); delete the file to measure again."""
    path = root / f"{size}-gflops-{threads}threads.json"
    if path.exists():
        return json.loads(path.read_text())
    found = measure_gflops(SIZES[size], threads=threads)
    path.write_text(json.dumps(found))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "gflops", "flops", "memory", "run"):
        p = sub.add_parser(name)
        p.add_argument("size", choices=list(SIZES))
        p.add_argument("--targets", help="default: q_proj,v_proj, and for run also all-linear")
        p.add_argument("--dtype", choices=list(DTYPES), help="run: default, and also bf16 where bf16 is fast")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--no-peft", action="store_true", help="run: lorakit only")
    sub.add_parser("bnb-check")
    child = sub.add_parser("peft-child")
    child.add_argument("model")
    child.add_argument("data")
    child.add_argument("--targets", default=TARGETS["qv"])
    child.add_argument("--steps", type=int, default=3)
    child.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if args.command == "peft-child":
        return peft_child(args.model, args.data, args.targets, args.steps, args.dtype)
    if args.command == "bnb-check":
        return print(json.dumps(bnb_peft_check(), indent=1))
    cfg, targets = SIZES[args.size], args.targets or TARGETS["qv"]
    if args.command in ("flops", "memory", "gflops"):
        makers = {"flops": lambda: step_flops(cfg, targets=adapted(cfg, targets)),
                  "memory": lambda: memory_estimates(cfg, targets),
                  "gflops": lambda: measure_gflops(cfg, threads=args.threads)}
        return print(json.dumps(makers[args.command](), indent=1))
    print(f"the {args.size} checkpoint needs {disk_needed(args.size) / GB:.1f} GB of disk under {CACHE}")
    try:
        path = build_checkpoint(args.size)
    except NotEnoughDisk as e:
        return print(f"skipped: {e}")
    if args.command == "build":
        return print(f"{path}: {(path / 'COMPLETE').read_text()}")
    gflops = cached_gflops(args.size, args.threads)
    print(json.dumps(gflops))
    fast_bf16 = gflops["bfloat16"]["gflops"] >= gflops["float32"]["gflops"]  # AVX-512 BF16 or AMX; not AVX2
    dtypes = [args.dtype] if args.dtype else [None, "bf16"] if fast_bf16 else [None]
    torch.set_num_threads(args.threads)
    for t in [args.targets] if args.targets else list(TARGETS.values()):
        for dtype in dtypes:
            print(report(run(args.size, t, dtype, peft=not args.no_peft), gflops), flush=True)


if __name__ == "__main__":
    main()
