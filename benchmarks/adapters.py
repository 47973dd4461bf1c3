"""Workload 5: adapter save, load and merge time, lorakit against PEFT, and the adapter file's size against the
full model's."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

from .common import interleave, summary, variants

ROWS = {"adapters-cls": "minilm", "adapters-gpt2": "gpt2"}
DEFAULT = list(ROWS)
ROUNDS = {"full": (2, 10), "quick": (1, 3), "tiny": (1, 1)}
OPS = ["save", "load", "merge"]


def run_row(key: str, size: str = "full", device: str = "cpu") -> dict:
    """Median milliseconds of save_adapter / load_adapter (into a fresh copy of the base) / merge, lorakit and PEFT,
    interleaved; file sizes in KiB and the full model's safetensors size in MiB."""
    from peft import PeftModel
    from safetensors.torch import save_model

    import lorakit

    name = ROWS[key]
    models, base = variants(name, size, ["lorakit", "peft"], random_b=True, device=device)
    lk, pf = models["lorakit"].eval(), models["peft"].eval()
    with tempfile.TemporaryDirectory() as tmp:
        lk_dir, pf_dir = Path(tmp, "lorakit"), Path(tmp, "peft")
        fresh = lambda: copy.deepcopy(base)  # noqa: E731  (untimed: loading needs a model without the adapter)
        # Only merging is timed; the untimed prepare step unmerges what the previous round merged.
        steps = {
            "lorakit_save": lambda: lorakit.save_adapter(lk, lk_dir),
            "peft_save": lambda: pf.save_pretrained(pf_dir),
            "lorakit_load": (fresh, lambda m: lorakit.load_adapter(m, lk_dir)),
            "peft_load": (fresh, lambda m: PeftModel.from_pretrained(m, pf_dir)),
            "lorakit_merge": (lambda: lorakit.unmerge(lk), lambda _: lorakit.merge(lk)),
            "peft_merge": (pf.unmerge_adapter, lambda _: pf.merge_adapter()),
        }
        lorakit.save_adapter(lk, lk_dir), pf.save_pretrained(pf_dir)  # the load steps need files from the start
        warmup, repeats = ROUNDS[size]
        with warnings.catch_warnings():  # PEFT warns when the first round unmerges a model not merged yet
            warnings.filterwarnings("ignore", "Already unmerged")
            ms = {k: summary(v)["median"] * 1e3 for k, v in interleave(steps, warmup, repeats, device).items()}
        file_kib = {k: os.path.getsize(d / "adapter_model.safetensors") / 1024 for k, d in (("lorakit", lk_dir), ("peft", pf_dir))}
        save_model(base, Path(tmp, "full.safetensors"))  # save_model drops tied duplicates, as save_pretrained does
        full_mib = os.path.getsize(Path(tmp, "full.safetensors")) / 2**20
    label = {"minilm": "MiniLM cls (r=8 query,value + classifier)", "gpt2": "GPT-2 124M (r=8 c_attn)"}[name]
    return {"row": key, "workload": label, **{f"{k}_ms": v for k, v in ms.items()},
            "lorakit_file_kib": file_kib["lorakit"], "peft_file_kib": file_kib["peft"], "full_model_mib": full_mib,
            "adapter_share": file_kib["lorakit"] / 1024 / full_mib, "warmup": warmup, "rounds": repeats}
