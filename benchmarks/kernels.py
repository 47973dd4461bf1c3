"""Issue 25's CUDA rows: a training step of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV
heads, SwiGLU 8192, vocabulary 128,256, tied head; random weights held in bf16, bf16 autocast), batch 8 × 2048
tokens, LoRA r=8 on q_proj,v_proj, in five variants built from the same weights:

    lorakit           as `lorakit train` runs it: --kernels auto (Liger where installed, on CUDA), the chunked loss
                      (Liger's fused linear cross-entropy in its place when Liger is chosen)
    lorakit-none      --kernels none: lorakit's own chunked loss, transformers' RMSNorm, RoPE and MLP
    lorakit-compile   --kernels auto and --compile (every block torch.compile'd)
    peft              PEFT with transformers' own loss (the whole logits)
    peft-liger        PEFT on a model patched by liger_kernel.transformers.apply_liger_kernel_to_llama (RMSNorm, RoPE,
                      SwiGLU and its fused linear cross-entropy in the model's forward), as PEFT users add Liger

Step time (interleaved rounds, benchmarks.common.interleave) and the memory a step takes above what stays resident
(torch.cuda.max_memory_allocated during one step alone, less the memory allocated before it: activations, logits,
gradients; the models and AdamW's state stay resident). Liger replaces transformers' RoPE function (and its RMSNorm and
MLP classes) for every Llama of the process: they are put back after each variant is built, and each step sets the
RoPE function its variant uses. Without liger-kernel (or CUDA) the Liger variants are
recorded as unavailable and `lorakit` is `lorakit-none`. `--size tiny` runs a 2-layer model, on the CPU too: the
tests' check that the rows run.
"""

from __future__ import annotations

import copy

import torch

from .common import interleave, make_lorakit, make_peft, summary, sync

ROWS = {"kernels-llama1b-bf16": dict(checkpointing=False), "kernels-llama1b-ckpt-bf16": dict(checkpointing=True)}
DEFAULT: list[str] = []  # CUDA rows: benchmarks/gpu.sh asks for them
SHAPES = {  # model dims, (batch, tokens), (warm-up rounds, timed rounds)
    "gpu": (dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256), (8, 2048), (2, 8)),
    "tiny": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=512), (2, 32), (1, 1)),
}
VARIANTS = ("lorakit", "lorakit-none", "lorakit-compile", "peft", "peft-liger")


def base_model(size: str, device: str) -> torch.nn.Module:
    """The random Llama of `size`, built on `device` (seeded) and held in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM, logging

    logging.set_verbosity_error()
    dims, (_, tokens), _ = SHAPES[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=tokens, tie_word_embeddings=True))
    return model.to(torch.bfloat16).train()


def lorakit_variant(base, device: str, kernels_name: str, compiled: bool, checkpointing: bool):
    """(the net `lorakit train` would run, the kernels chosen) for a copy of `base`."""
    from lorakit.adapters.inject import enable_gradient_checkpointing
    from lorakit.runtime import kernels
    from lorakit.runtime.compiling import compile_blocks
    from lorakit.training.chunked_loss import loss_model

    torch.manual_seed(1)
    model = make_lorakit(copy.deepcopy(base), "llama", 0.0)
    chosen = kernels.choose(kernels_name, torch.device(device), model.config)
    kernels.apply(chosen, model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    net, why = loss_model(model, 512, fused=kernels.liger_linear_cross_entropy if chosen.liger else None)
    assert why is None, why
    if compiled:
        compile_blocks(model)
    return net, chosen.name


def peft_variant(base, device: str, liger: bool, checkpointing: bool):
    """(PEFT LoRA on a copy of `base`, its loss transformers' own or Liger's, "liger"/"none"); None with liger where
    Liger cannot run."""
    from lorakit.runtime import kernels

    model = copy.deepcopy(base)
    if liger:
        if kernels.choose("auto", torch.device(device), model.config).name != "liger":
            return None
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)  # its defaults: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return make_peft(model, "llama", 0.0), "liger" if liger else "none"


def variants(size: str, device: str, checkpointing: bool, errors: dict) -> dict:
    """{variant: (net, kernels name, the RoPE function it runs with)}; the Liger ones left out where unavailable, and
    any that fails to build (its error in `errors`)."""
    from transformers.models.llama import modeling_llama

    plain = dict(vars(modeling_llama))
    base = base_model(size, device)
    made = {}
    for name in VARIANTS:
        try:
            built = (peft_variant(base, device, name == "peft-liger", checkpointing) if name.startswith("peft") else
                     lorakit_variant(base, device, "none" if name == "lorakit-none" else "auto",
                                     name.endswith("compile"), checkpointing))
        except Exception as e:  # noqa: BLE001 (one variant's failure must not lose the others' numbers)
            built, errors[name] = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if built is not None:
            made[name] = (*built, modeling_llama.apply_rotary_pos_emb)
        # Liger replaces the module's RoPE function and its RMSNorm and MLP classes: undone for the next variant
        vars(modeling_llama).update(plain)
    return made


def step_fn(net, rope, inputs: dict, device: str, losses: list):
    """One training step of `net` (bf16 autocast, AdamW over its trainable parameters) with its RoPE function."""
    from transformers.models.llama import modeling_llama

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step():
        modeling_llama.apply_rotary_pos_emb = rope
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = net(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return step


def step_memory(step, device: str) -> float | None:
    """GiB one step allocates above what was allocated before it (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def run_row(key: str, size: str = "gpu", device: str = "cuda") -> dict:
    """Interleaved step times, first-step times (the compiled variant's includes compiling) and step memory."""
    import time

    from transformers.models.llama import modeling_llama

    if size not in SHAPES:
        raise ValueError(f"the kernels rows run at --size gpu (CUDA) or tiny, not {size!r}")
    checkpointing = ROWS[key]["checkpointing"]
    dims, (n, t), (warmup, repeats) = SHAPES[size]
    ids = torch.randint(0, dims["vocab_size"], (n, t), generator=torch.Generator().manual_seed(1)).to(device)
    inputs = {"input_ids": ids, "labels": ids}
    plain_rope = modeling_llama.apply_rotary_pos_emb
    errors, losses = {}, {}
    made = variants(size, device, checkpointing, errors)
    steps = {name: step_fn(net, rope, inputs, device, losses.setdefault(name, []))
             for name, (net, _, rope) in made.items()}
    first = {}
    for name in list(steps):
        sync(device)
        start = time.perf_counter()
        try:
            steps[name]()
        except Exception as e:  # noqa: BLE001 (a compiler or kernel failure: recorded, the others still measured)
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del steps[name], made[name]
            continue
        sync(device)
        first[name] = time.perf_counter() - start
    stats = {name: summary(v) for name, v in interleave(steps, warmup, repeats, device).items()}
    memory = {name: step_memory(step, device) for name, step in steps.items()}
    modeling_llama.apply_rotary_pos_emb = plain_rope
    median = {name: s["median"] for name, s in stats.items()}
    shape = "Llama-3.2-1B shape" if size == "gpu" else "tiny Llama"
    return {"row": key, "workload": f"{shape}{', checkpointing' if checkpointing else ''}, bf16",
            "batch": f"{n}×{t}", "precision": "bf16", "kernels": {name: k for name, (_, k, _) in made.items()},
            "unavailable": [v for v in VARIANTS if v not in made and v not in errors], "errors": errors,
            "step_s": median,
            "quartiles": {name: (s["p25"], s["p75"]) for name, s in stats.items()},
            "vs_peft": {name: m / median["peft"] if "peft" in median else None for name, m in median.items()},
            "first_step_s": first,
            "step_memory_gib": memory, "first_loss": {name: losses[name][0] for name in made},
            "warmup": warmup, "rounds": repeats}


def section(rows: dict) -> str:
    """The Markdown table of the kernels rows (BENCHMARKS.md §18)."""
    from .common import md_table

    lines = []
    for r in rows.values():
        if "error" in r:
            lines.append(f"`{r['row']}` failed: {r['error']}\n")
            continue
        ratio = lambda v: "—" if r["vs_peft"][v] is None else f"{r['vs_peft'][v]:.2f}"  # noqa: E731
        table = [[v, r["kernels"][v], f"{r['step_s'][v]:.3f}", ratio(v), f"{r['first_step_s'][v]:.1f}",
                  "—" if r["step_memory_gib"][v] is None else f"{r['step_memory_gib'][v]:.1f}",
                  f"{r['first_loss'][v]:.4f}"] for v in r["step_s"]]
        lines.append(f"**{r['workload']}**, batch {r['batch']}, {r['warmup']} warm-up + {r['rounds']} timed rounds"
                     f"{'; unavailable: ' + ', '.join(r['unavailable']) if r['unavailable'] else ''}\n\n"
                     + md_table(["variant", "kernels", "step s (median)", "× PEFT", "first step s",
                                 "step memory GiB", "first loss"], table) + "\n"
                     + "".join(f"\n{v} failed: {e}\n" for v, e in r.get("errors", {}).items()))
    return "\n".join(lines)
