"""Workloads 1 and 2: the time of one training step (forward, backward, AdamW step, zero_grad), lorakit LoRA against
PEFT LoRA and full fine-tuning, interleaved in one process."""

from __future__ import annotations

import torch

from lorakit.runtime.precision import autocast

from .common import MODELS, batch, interleave, summary, variants

# One row per entry: which model, LoRA dropout, precision. "cls" rows train the classifier head as well.
ROWS = {
    "cls": dict(model="minilm", dropout=0.1, precision="fp32"),
    "cls-d0": dict(model="minilm", dropout=0.0, precision="fp32"),
    "cls-bf16": dict(model="minilm", dropout=0.1, precision="bf16"),
    "gpt2": dict(model="gpt2", dropout=0.05, precision="fp32"),
    "llama": dict(model="llama", dropout=0.05, precision="fp32"),
    "gpt2-bf16": dict(model="gpt2", dropout=0.05, precision="bf16"),
    "cls-nf4": dict(model="minilm", dropout=0.1, precision="fp32", quantize="nf4"),  # QLoRA against plain LoRA
    "llama-bf16": dict(model="llama", dropout=0.05, precision="bf16"),
    # QLoRA against QLoRA: PEFT over bitsandbytes' 4-bit layers (CUDA only)
    "qlora-llama-bf16": dict(model="llama", dropout=0.05, precision="bf16", quantize="nf4", peft="peft_bnb"),
}
DEFAULT = ["cls", "cls-d0", "cls-bf16", "gpt2", "llama", "cls-nf4"]
# (warm-up rounds, timed rounds) per model and size; a round is one step of each variant. Chosen so that the
# default run takes about 20 minutes on 2 CPU cores.
ROUNDS = {"full": {"minilm": (3, 20), "gpt2": (2, 8), "llama": (2, 8)},
          "quick": {"minilm": (2, 5), "gpt2": (1, 3), "llama": (1, 3)},
          "tiny": {"minilm": (1, 1), "gpt2": (1, 1), "llama": (1, 1)},
          "gpu": {"minilm": (3, 15), "gpt2": (3, 15), "llama": (3, 15)}}
TARGET_VS_PEFT, TARGET_VS_FULL = 0.90, 0.70


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the same for every variant)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def step_fn(model, opt, inputs: dict, precision: str, device: str):
    """A function running one full training step of `model`."""
    def step():
        with autocast(precision, device):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def describe(key: str) -> str:
    """A human label for row `key`, e.g. 'MiniLM cls 32×128, dropout 0.1, fp32'."""
    spec = ROWS[key]
    label = {"minilm": "MiniLM cls", "gpt2": "GPT-2 124M", "llama": "Llama 134M"}[spec["model"]]
    qlora = ""
    if spec.get("quantize"):
        qlora = ", QLoRA NF4 (PEFT: bitsandbytes 4-bit)" if spec.get("peft") else ", QLoRA NF4 (PEFT: plain LoRA)"
    return f"{label}, dropout {spec['dropout']}, {spec['precision']}{qlora}"


def run_row(key: str, size: str = "full", device: str = "cpu") -> dict:
    """Interleaved step times of lorakit, PEFT and full fine-tuning for row `key`; medians in seconds."""
    spec = ROWS[key]
    peft_kind = spec.get("peft", "peft")
    models, base = variants(spec["model"], size, ["lorakit", peft_kind, "full"], spec["dropout"], device=device,
                            quantize=spec.get("quantize"))
    models["peft"] = models.pop(peft_kind)
    inputs = batch(spec["model"], size, base, device)
    del base
    steps = {k: step_fn(m.train(), optimizer(m), inputs, spec["precision"], device) for k, m in models.items()}
    warmup, repeats = ROUNDS[size][spec["model"]]
    stats = {k: summary(v) for k, v in interleave(steps, warmup, repeats, device).items()}
    lk, pf, full = (stats[k]["median"] for k in ("lorakit", "peft", "full"))
    n, t = MODELS[spec["model"]][size]
    return {
        "row": key, "workload": describe(key), "batch": f"{n}×{t}", "precision": spec["precision"],
        "qlora": bool(spec.get("quantize")),  # shown apart from the LoRA rows' targets
        "peft_bnb": spec.get("peft") == "peft_bnb",
        "lorakit_s": lk, "peft_s": pf, "full_s": full,
        "lorakit_vs_peft": lk / pf, "lorakit_vs_full": lk / full, "peft_vs_full": pf / full,
        "meets_vs_peft": lk / pf <= TARGET_VS_PEFT, "meets_vs_full": lk / full <= TARGET_VS_FULL,
        "warmup": warmup, "rounds": repeats, "quartiles": {k: (s["p25"], s["p75"]) for k, s in stats.items()},
    }
