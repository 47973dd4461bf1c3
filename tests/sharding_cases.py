"""Training cases for test_sharding.py. A case builds a tiny seeded Llama with an adapter, trains it a few steps
through lorakit.fit (one process, DDP, or sharded with FSDP), and writes its adapter (gathered) to OUT/<name>:

    torchrun --nproc_per_node=N tests/sharding_cases.py OUT '[{"name": ..., "mode": "fsdp", ...}, ...]'

or in the test's own process through run_case (the one-process references). A case is a dict:
    name, mode ("one" | "ddp" | "fsdp"), batch (per process), steps; optional: dims ("odd"), targets, dora, lora_bias,
    quantize, precision, checkpointing ("reentrant" | "non-reentrant"), accum, no_blocks, save (write a checkpoint
    at the end), resume (a checkpoint directory to start from), tie.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch

import lorakit
from lorakit.adapters.parts import lora_layers
from lorakit.runtime.distributed import World, init_distributed, is_main_process, shutdown
from lorakit.runtime.sharding import shard
from lorakit.training.fit import Loop, RunState, fit, seeded_batches
from lorakit.training.rundir import load_checkpoint, save_checkpoint

DIMS = {"small": dict(hidden=32, inter=64, heads=4, kv=2, vocab=96),
        "odd": dict(hidden=50, inter=129, heads=5, kv=1, vocab=127)}  # no size divides 2 or 3 processes
SEQ, ROWS = 12, 24


def build(case: dict) -> torch.nn.Module:
    """The case's model: a 2-layer Llama (no dropout of its own) with a seeded adapter whose B starts nonzero, so
    that A gets a gradient from the first step."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = DIMS[case.get("dims", "small")]
    config = LlamaConfig(num_hidden_layers=2, hidden_size=d["hidden"], intermediate_size=d["inter"],
                         num_attention_heads=d["heads"], num_key_value_heads=d["kv"], vocab_size=d["vocab"],
                         max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=case.get("tie", False))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    targets = case.get("targets", ["q_proj", "v_proj"])
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, use_dora=case.get("dora", False),
                                             lora_bias=case.get("lora_bias", False), quantize=case.get("quantize")))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(std=0.05)
    if case.get("checkpointing"):  # transformers' name for it changed; the argument is the same
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": case["checkpointing"] == "reentrant"})
        lorakit.enable_input_grads(model)
    if case.get("no_blocks"):
        model._no_split_modules = None
    return model


def examples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, vocab, (SEQ,), generator=g)} for _ in range(ROWS)]


def collate(rows: list[dict]) -> dict:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_case(case: dict, world: World, out: Path) -> dict:
    """Train `case` on this process's share of every global batch; write OUT/<name>/ (adapter, checkpoint) and
    return what the test checks besides the files."""
    model = build(case)
    before = [weakref.ref(p) for p in model.parameters()]
    if case["mode"] == "fsdp":
        shard(model, world, case.get("precision", "fp32"))
    gc.collect()
    opt = lorakit.optimizer(model, lr=1e-2, lr_ratio=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    batches = seeded_batches(examples(DIMS[case.get("dims", "small")]["vocab"]), collate, case["batch"], 0, world)
    loop = Loop(total_steps=case["steps"], grad_accum=case.get("accum", 1), precision=case.get("precision", "fp32"),
                seed=0)
    state = load_checkpoint(Path(case["resume"]), model, opt, sched) if case.get("resume") else RunState()
    seen = []  # the dtype a LoRA layer's frozen weight has inside forward (FSDP's mixed precision casts it)
    next(iter(lora_layers(model).values())).register_forward_pre_hook(
        lambda module, args: seen.append(str(getattr(module, "weight", None) is not None and module.weight.dtype)))
    state = fit(model, batches, opt, sched, loop, state, world=world)
    where = out / case["name"]
    if case.get("save"):
        save_checkpoint(where, model, opt, sched, state)
    lorakit.save_adapter(model, where)
    return {"frozen_share": _local_share(p for p in model.parameters() if not p.requires_grad),
            "full_tensors_alive": sum(ref() is not None for ref in before),  # sharded: none may stay behind
            "forward_dtype": seen[0] if seen else None,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}


def _local_share(params) -> float:
    # This process's share of the frozen bytes: 1 unsharded, about 1/N sharded.
    from torch.distributed.tensor import DTensor

    params = list(params)
    mine = sum((p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes() for p in params)
    return mine / sum(p.numel() * p.element_size() for p in params)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    world = init_distributed(sharded=True)
    report = {case["name"]: run_case(case, world, out) for case in cases}
    if is_main_process():
        (out / "report.json").write_text(json.dumps(report))
    torch.distributed.barrier()  # leave together: a group destroyed while a peer is mid-collective aborts the peer
    shutdown(world)
