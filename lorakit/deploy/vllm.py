"""A run's adapter checked against what vLLM's LoRA loader accepts, and written for it.

vLLM (vllm/lora/peft_helper.py, `validate_legal`) refuses DoRA, trained biases, ranks above the server's
--max-lora-rank (16 unless set; one of MAX_LORA_RANKS) and modules saved in full other than the embeddings and the
output head. Those are refused here too, before anything is written, with the reason. What vLLM does not read is
left out and listed: lorakit's own run files and config keys. vLLM versions before rank_pattern/alpha_pattern
support apply one rank and one alpha to every module, so an adapter with per-module ranks or alphas is written as
one that needs neither: A and B zero-padded to the largest rank (which adds nothing to B·A) and each module's scale
folded into its B, under alpha = r. The file still loads in PEFT, with the same outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.config import replace, to_peft_dict
from ..adapters.files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    atomic_write,
    check_converted,
    read_adapter,
    read_fan_in_fan_out,
)
from ..errors import ConfigError
from ..nn.kinds import FILE_KEYS
from ..training.rundir import CHAT_TEMPLATE_FILE

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
SAVED_OK = ("embed_tokens", "lm_head")  # modules a vLLM LoRA may carry in full
FACTORS = {key: factor for pair in FILE_KEYS for key, factor in zip(pair, "AB")}  # file key -> "A" | "B"


def split_keys(tensors: dict) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({module path: {"A": file key, "B": file key}}, [file keys of modules saved in full]) of an adapter's tensors
    (files.read_adapter's: keys without PEFT's prefix)."""
    pairs, full = {}, []
    for key in tensors:
        for suffix, factor in FACTORS.items():
            if key.endswith("." + suffix):
                pairs.setdefault(key[: -len(suffix) - 1], {})[factor] = key
                break
        else:
            full.append(key)
    return pairs, full


def check(config, tensors: dict, max_lora_rank: int, where: Path) -> None:
    """ConfigError with vLLM's reason if it would refuse the adapter read from `where` (files.read_adapter's config
    and tensors) under --max-lora-rank."""
    if max_lora_rank not in MAX_LORA_RANKS:
        raise ConfigError(f"--max-lora-rank {max_lora_rank}: vLLM accepts one of {list(MAX_LORA_RANKS)}")
    check_converted(config, where)
    if config.use_dora:
        raise ConfigError("vLLM does not support DoRA adapters; merge it (lorakit merge) and serve the merged model, "
                          "or export it for llama.cpp with --format gguf")
    if config.lora_bias:
        raise ConfigError("lorakit's vLLM export does not carry a bias on lora_B (lora_bias: vLLM's support for it "
                          "depends on its version and flags); merge it (lorakit merge) and serve the merged model")
    if config.bias != "none":
        raise ConfigError(f"vLLM does not support adapters that train biases (bias={config.bias!r}); merge it "
                          f"(lorakit merge) and serve the merged model")
    pairs, full = split_keys(tensors)
    modules = {key.rpartition(".")[0] for key in full}  # "lm_head.weight" -> "lm_head"
    refused = sorted(m for m in modules if m.rpartition(".")[2] not in SAVED_OK)
    if refused:
        raise ConfigError(f"vLLM loads no module saved in full except {'/'.join(SAVED_OK)}; this adapter saves "
                          f"{refused} (modules_to_save); merge it (lorakit merge) and serve the merged model")
    rank = max(tensors[keys["A"]].shape[0] for keys in pairs.values())
    if rank > max_lora_rank:
        allowed = next((r for r in MAX_LORA_RANKS if r >= rank), None)
        hint = f"pass --max-lora-rank {allowed} here and to vllm serve" if allowed else "vLLM's largest is 512"
        raise ConfigError(f"the adapter's rank {rank} is above --max-lora-rank {max_lora_rank}: {hint}")


def uniform(config, tensors: dict, pairs: dict) -> tuple[object, dict]:
    """(config, tensors) with one rank and one alpha for every module: factors zero-padded to the largest rank,
    each module's scale folded into B (alpha = r, no rsLoRA, no patterns). Unchanged when already uniform."""
    if not config.rank_pattern and not config.alpha_pattern:
        return config, tensors
    rank = max(tensors[keys["A"]].shape[0] for keys in pairs.values())
    out = dict(tensors)
    for path, keys in pairs.items():
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        r = a.shape[0]
        scale = config.scale_for(path)
        out[keys["A"]] = torch.cat([a, a.new_zeros(rank - r, *a.shape[1:])]) if r < rank else a
        b = (b.double() * scale).to(b.dtype)  # alpha = rank below: vLLM's scale is then 1
        out[keys["B"]] = torch.cat([b, b.new_zeros(b.shape[0], rank - r, *b.shape[2:])], dim=1) if r < rank else b
    return replace(config, r=rank, alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}), out


def write(adapter: Path, out: Path, name: str, max_lora_rank: int, base: str | None = None) -> list[str]:
    """Check, then write the adapter in `adapter` to directory `out` for vLLM. Returns the lines to print: what was
    left out, and the `vllm serve` command."""
    config, tensors = read_adapter(adapter)  # each file read once; keys without PEFT's prefix
    check(config, tensors, max_lora_rank, adapter)
    pairs, _ = split_keys(tensors)
    config, tensors = uniform(config, tensors, pairs)
    data = to_peft_dict(config, fan_in_fan_out=read_fan_in_fan_out(adapter))  # GPT-2's Conv1D: else applied as Wᵀ
    dropped_keys = sorted(k for k in data if k.startswith("lorakit_"))
    data = {k: v for k, v in data.items() if not k.startswith("lorakit_")}
    out.mkdir(parents=True, exist_ok=True)
    weights = {PREFIX + k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
    return _report(adapter, out, name, config, base, max_lora_rank, dropped_keys)


def _report(adapter: Path, out: Path, name: str, config, base: str | None, max_lora_rank: int,
            dropped_keys: list[str]) -> list[str]:
    lines = [f"vLLM adapter written to {out} (rank {config.r})"]
    left = sorted(p.name for p in adapter.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME, CHAT_TEMPLATE_FILE))
    if left or dropped_keys:
        lines.append(f"left out (vLLM does not read them): {', '.join(left + dropped_keys)}")
    if config.quantize:
        lines.append("the adapter was trained on an NF4-quantized base (QLoRA); vLLM applies it to the base as it "
                     "loads it, so outputs differ slightly from lorakit's")
    command = f"vllm serve {base or config.base_model_name_or_path or 'BASE_MODEL'} --enable-lora " \
              f"--lora-modules {name}={out}"
    if config.r > 16:
        command += f" --max-lora-rank {next(r for r in MAX_LORA_RANKS if r >= max(config.r, max_lora_rank))}"
    template = adapter / CHAT_TEMPLATE_FILE
    if template.is_file():
        shutil.copyfile(template, out / CHAT_TEMPLATE_FILE)
        command += f" --chat-template {out / CHAT_TEMPLATE_FILE}"
        lines.append(f"the run's chat template is copied to {out / CHAT_TEMPLATE_FILE} for --chat-template (vLLM "
                     f"uses one template for the whole server)")
    return lines + [command]
