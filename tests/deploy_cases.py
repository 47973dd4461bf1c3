"""Shared by the `lorakit export` tests: tiny runs, the CLI, and llama.cpp (llama-cpp-python) next to lorakit's own
merged model as the oracle."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit.adapters.parts import lora_layers
from lorakit.cli.main import app
from lorakit.io.models import load_model
from lorakit.serving.generation import use_chat_template
from lorakit.training.rundir import save_chat_template
from lorakit.training.tasks import CAUSAL_LM
from lorakit.training.trained import load_trained

try:
    import gguf
    import llama_cpp
except ImportError:
    gguf = llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python and gguf are not installed "
                                     "(pip install 'lorakit[gguf]')")

runner = CliRunner()
PROMPT = [{"role": "user", "content": "hello there how are you"}]
# Largest |llama.cpp logit - lorakit logit| allowed per outtype. On these models logits reach about +-5 and the adapter
# moves them by about 6. Measured (LoRA, QLoRA, DoRA runs): f32 3e-6 to 8e-6 (float32 summation order alone; the KV
# cache held in f32), f16 0.009 to 0.027, bf16 0.08 to 0.29, q8_0 0.28 to 0.30 (llama.cpp also rounds the activations
# to the weights' type in each matrix product: f16, or 8-bit blocks for q8_0).
TOLERANCE = {"f32": 1e-4, "f16": 0.1, "bf16": 0.6, "q8_0": 0.6}


def make_adapter(base: Path, out: Path, quantize: str | None = None, **options) -> Path:
    """A run directory holding a random all-linear adapter of the model in `base`, with its chat template."""
    torch.manual_seed(1)
    net, tokenizer = load_model(str(base), CAUSAL_LM, quantize=quantize)
    config = dict(r=4, alpha=8, targets="all-linear", init="random", quantize=quantize)
    lorakit.inject(net, lorakit.LoraConfig(**{**config, **options}))
    for layer in lora_layers(net).values():
        if options.get("init") == "pissa":  # PiSSA starts where the base is: move B so that the adapter changes it
            layer.lora_B["default"].data += 0.5 * torch.randn_like(layer.lora_B["default"])
        if options.get("use_dora"):  # DoRA starts as the LoRA it wraps: move the magnitudes away from the norms
            magnitude = layer.lora_magnitude_vector["default"]
            magnitude.data *= 1 + 0.5 * torch.rand_like(magnitude)
    lorakit.save_adapter(net, out, base_model_name_or_path=str(base))
    save_chat_template(out, tokenizer.chat_template)
    return out


def export(*args) -> str:
    result = runner.invoke(app, ["export", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args) -> str:
    result = runner.invoke(app, ["export", *map(str, args)])
    assert result.exit_code == 1, result.output
    return result.output


def merged_model(adapter: Path):
    """lorakit's merged model in float32 (the oracle) and its tokenizer with the run's chat template."""
    net, tokenizer, _, _ = load_trained(None, str(adapter), precision="fp32")
    use_chat_template(tokenizer, str(adapter))
    lorakit.merge(net)
    return net.float(), tokenizer


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)


def llama(model: Path, lora: Path | None = None):
    """llama.cpp on the file (and LoRA), its KV cache in float32 (f16 by default, which would round K and V)."""
    return llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True,
                           n_threads=1, verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def hf_logits(net, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor([ids])).logits[0].numpy()


def base_logits(adapter: Path, ids: list[int]) -> np.ndarray:
    """The logits of the run's base model alone (what an export that lost the adapter would give)."""
    net, _, _, _ = load_trained(None, str(adapter), precision="fp32")
    with lorakit.disable_adapters(net):
        return hf_logits(net, ids)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out


def hf_greedy(net, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(net(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


