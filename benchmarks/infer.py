"""Workload 3: inference latency (one forward under torch.no_grad) of the base model, one unmerged adapter and the
merged adapter, lorakit and PEFT, interleaved in one process."""

from __future__ import annotations

import copy

import torch

from .common import MODELS, batch, check_same, interleave, summary, variants

ROWS = {"infer-cls": "minilm", "infer-gpt2": "gpt2"}
DEFAULT = ["infer-cls", "infer-gpt2"]
ROUNDS = {"full": {"minilm": (3, 20), "gpt2": (2, 12)}, "quick": {"minilm": (2, 5), "gpt2": (1, 3)},
          "tiny": {"minilm": (1, 1), "gpt2": (1, 1)}, "gpu": {"minilm": (3, 15), "gpt2": (3, 15)}}
TARGET_UNMERGED = 1.10  # an unmerged adapter adds at most 10% over the base model
TARGET_MERGED = 1.05  # "merged runs at the base's speed", within the noise of a median on a shared machine
VARIANTS = ["base", "lorakit", "lorakit_merged", "peft", "peft_merged"]


def run_row(key: str, size: str = "full", device: str = "cpu") -> dict:
    """Interleaved forward latency of the base model and of lorakit / PEFT adapters, unmerged and merged; medians
    in milliseconds. B is random so that the adapter (and merging) changes the output."""
    import lorakit

    name = ROWS[key]
    models, base = variants(name, size, ["base", "lorakit", "peft"], dropout=0.0, random_b=True, device=device)
    inputs = batch(name, size, base, device)
    inputs.pop("labels")  # the forward alone, no loss
    models["lorakit_merged"] = copy.deepcopy(models["lorakit"])
    lorakit.merge(models["lorakit_merged"])
    models["peft_merged"] = copy.deepcopy(models["peft"])
    models["peft_merged"].merge_adapter()
    for k in ("lorakit_merged", "peft_merged"):  # merged must compute what unmerged computes
        check_same(models["lorakit"], models[k], inputs)

    def forward(model):
        model.eval()
        return lambda: model(**inputs)

    warmup, repeats = ROUNDS[size][name]
    with torch.no_grad():
        times = interleave({k: forward(models[k]) for k in VARIANTS}, warmup, repeats, device)
    ms = {k: summary(v)["median"] * 1e3 for k, v in times.items()}
    n, t = MODELS[name][size]
    row = {"row": key, "workload": {"minilm": "MiniLM cls", "gpt2": "GPT-2 124M"}[name] + " forward",
           "batch": f"{n}×{t}", **{f"{k}_ms": ms[k] for k in VARIANTS}, "warmup": warmup, "rounds": repeats}
    for k in VARIANTS[1:]:
        row[f"{k}_vs_base"] = ms[k] / ms["base"]
    row["meets_unmerged"] = row["lorakit_vs_base"] <= TARGET_UNMERGED
    row["meets_merged"] = row["lorakit_merged_vs_base"] <= TARGET_MERGED
    return row
