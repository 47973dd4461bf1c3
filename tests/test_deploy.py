"""`lorakit export`: GGUF files checked by llama.cpp itself (llama-cpp-python), Ollama Modelfiles, vLLM adapters.

The model is a tiny random Llama with a byte-level BPE tokenizer and a ChatML template (conftest's chat_llama_dir);
its adapters are drawn at random (A and B both), so that merging changes every logit. The oracle is lorakit's own
merged model in float32: llama.cpp must give its logits within what the outtype's rounding allows, the same greedy
tokens, and the same token ids for a chat prompt as the Hugging Face tokenizer.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.generate import use_chat_template
from lorakit.models import load_model, load_trained
from lorakit.parts import lora_layers
from lorakit.rundir import save_chat_template
from chat_tokenizers import CORPUS
from test_chat_cli import ANSWER, chat_run  # noqa: F401  (a fixture: a tiny Llama trained on conversations)

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
    net, tokenizer = load_model(str(base), "causal-lm", quantize=quantize)
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


@pytest.fixture(scope="module")
def runs(chat_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-runs")
    return {"lora": make_adapter(chat_llama_dir, root / "lora"),
            # rsLoRA and per-module ranks and alphas: llama.cpp's alpha / r must have the scale folded into B
            "patterns": make_adapter(chat_llama_dir, root / "patterns", use_rslora=True, rank_pattern={"q_proj": 8},
                                     alpha_pattern={"down_proj": 3.0}),
            "qlora": make_adapter(chat_llama_dir, root / "qlora", quantize="nf4"),
            # saved as the plain rank-2r LoRA it amounts to on the original weight
            "pissa": make_adapter(chat_llama_dir, root / "pissa", init="pissa"),
            "dora": make_adapter(chat_llama_dir, root / "dora", use_dora=True)}


@needs_llama_cpp
def test_merged_gguf_f32_gives_lorakits_logits_tokens_and_generation(runs, tmp_path):
    out = tmp_path / "model.gguf"
    said = export("--adapter", runs["lora"], "--format", "gguf", "--output", out, "--outtype", "f32")
    assert "adapter merged" in said
    net, tokenizer = merged_model(runs["lora"])
    llm = llama(out)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = prompt_ids(tokenizer)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # <|im_start|> etc. parsed as tokens
    expected, got = hf_logits(net, ids), cpp_logits(llm, ids)
    assert np.abs(base_logits(runs["lora"], ids) - expected).max() > 100 * TOLERANCE["f32"]  # the adapter matters
    assert np.abs(got - expected).max() < TOLERANCE["f32"]
    assert cpp_greedy(llm, ids, 12) == hf_greedy(net, ids, 12)
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # read from tokenizer.json, no hash list


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_merged_gguf_outtypes_within_their_rounding(runs, tmp_path, outtype):
    out = tmp_path / f"model-{outtype}.gguf"
    export("--adapter", runs["lora"], "--format", "gguf", "--output", out, "--outtype", outtype)
    net, tokenizer = merged_model(runs["lora"])
    ids = prompt_ids(tokenizer)
    expected = hf_logits(net, ids)
    error = np.abs(cpp_logits(llama(out), ids) - expected).max()
    assert 0 < error < TOLERANCE[outtype] < np.abs(base_logits(runs["lora"], ids) - expected).max() / 5
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"


@needs_llama_cpp
@pytest.mark.parametrize("run, outtype", [("lora", "f32"), ("patterns", "f32"), ("pissa", "f32"), ("lora", "q8_0")])
def test_adapter_gguf_on_base_gguf_gives_the_merged_logits(runs, tmp_path, run, outtype):
    adapter, base = tmp_path / "adapter.gguf", tmp_path / "base.gguf"
    said = export("--adapter", runs[run], "--format", "gguf-lora", "--output", adapter, "--base-output", base,
                  "--outtype", outtype)
    assert f"--lora {adapter}" in said
    net, tokenizer = merged_model(runs[run])
    ids = prompt_ids(tokenizer)
    expected = hf_logits(net, ids)
    assert np.abs(cpp_logits(llama(base, adapter), ids) - expected).max() < TOLERANCE[outtype]
    assert np.abs(cpp_logits(llama(base), ids) - expected).max() > 5 * TOLERANCE[outtype]  # the LoRA does apply
    fields = gguf.GGUFReader(adapter).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    saved = json.loads((runs[run] / "adapter_config.json").read_text())  # PiSSA's file: rank 2r, alpha doubled
    assert fields["adapter.lora.alpha"].contents() == saved["lora_alpha"]


@needs_llama_cpp
def test_qlora_run_merged_and_as_separate_lora(runs, tmp_path):
    merged, adapter, base = tmp_path / "merged.gguf", tmp_path / "adapter.gguf", tmp_path / "base.gguf"
    export("--adapter", runs["qlora"], "--format", "gguf", "--output", merged, "--outtype", "f32")
    export("--adapter", runs["qlora"], "--format", "gguf-lora", "--output", adapter, "--base-output", base,
           "--outtype", "f32")
    net, tokenizer = merged_model(runs["qlora"])  # the NF4 base dequantized, ΔW added: what the run computes
    ids = prompt_ids(tokenizer)
    expected = hf_logits(net, ids)
    assert np.abs(cpp_logits(llama(merged), ids) - expected).max() < TOLERANCE["f32"]
    assert np.abs(cpp_logits(llama(base, adapter), ids) - expected).max() < TOLERANCE["f32"]
    assert cpp_greedy(llama(merged), ids, 8) == hf_greedy(net, ids, 8)


@needs_llama_cpp
def test_a_qlora_export_frees_each_dequantized_weight_once_written(runs, tmp_path):
    """The base is never held in full precision: each NF4 weight is dequantized (and merged) when it is written,
    then released, so after the export no adapted layer holds a full-precision weight."""
    from lorakit.deploy.gguf import export_model_gguf

    net, tokenizer, _, _ = load_trained(None, str(runs["qlora"]), precision="fp32")
    layers = lora_layers(net)
    assert all(layer.kind.quantized for layer in layers.values())
    export_model_gguf(net, tokenizer, tmp_path / "m.gguf", "f16")
    assert all(layer.weight.device.type == "meta" for layer in layers.values())


@needs_llama_cpp
def test_dora_run_merges_and_is_refused_as_separate_lora(runs, tmp_path):
    merged = tmp_path / "merged.gguf"
    export("--adapter", runs["dora"], "--format", "gguf", "--output", merged, "--outtype", "f32")
    net, tokenizer = merged_model(runs["dora"])
    ids = prompt_ids(tokenizer)
    expected = hf_logits(net, ids)
    assert np.abs(cpp_logits(llama(merged), ids) - expected).max() < TOLERANCE["f32"]
    assert cpp_greedy(llama(merged), ids, 8) == hf_greedy(net, ids, 8)
    plain, _ = merged_model(runs["lora"])  # the same A and B (same seed) without DoRA's magnitudes
    assert np.abs(hf_logits(plain, ids) - expected).max() > 100 * TOLERANCE["f32"]
    said = refused("--adapter", runs["dora"], "--format", "gguf-lora", "--output", tmp_path / "a.gguf",
                   "--base-output", tmp_path / "b.gguf")
    assert "llama.cpp has no DoRA" in said and "--format gguf" in said
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


@needs_llama_cpp
def test_model_types_outside_the_llama_family_are_refused_naming_the_supported(gpt2_dir, tmp_path):
    net, _ = load_model(str(gpt2_dir), "causal-lm")
    lorakit.inject(net, lorakit.LoraConfig(r=2, targets=["c_attn"]))
    lorakit.save_adapter(net, tmp_path / "run", base_model_name_or_path=str(gpt2_dir))
    said = refused("--adapter", tmp_path / "run", "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert "['llama', 'mistral', 'qwen2']" in said and "'gpt2'" in said
    assert not (tmp_path / "m.gguf").exists()


def test_bad_flags_are_refused_before_loading(runs, tmp_path):
    assert "expected one of gguf, gguf-lora, vllm" in refused("--adapter", runs["lora"], "--format", "onnx",
                                                              "--output", tmp_path / "x")
    assert "--base-output goes with --format gguf-lora" in refused(
        "--adapter", runs["lora"], "--format", "gguf", "--output", tmp_path / "m.gguf", "--base-output", tmp_path / "b")
    assert "expected one of f32, f16, bf16, q8_0" in refused("--adapter", runs["lora"], "--format", "gguf",
                                                             "--output", tmp_path / "m.gguf", "--outtype", "q4_k")
    assert "needs --base-output" in refused("--adapter", runs["lora"], "--format", "gguf-lora", "--output",
                                            tmp_path / "a.gguf", "--ollama")
    (tmp_path / "m.gguf").write_text("keep")
    assert "pass --overwrite" in refused("--adapter", runs["lora"], "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep"


@needs_llama_cpp
def test_a_trained_chat_run_answers_in_llama_cpp_as_in_lorakit(chat_run, tmp_path):  # noqa: F811 (the fixture)
    """The chat run of test_chat_cli (trained to answer "fine thanks"), exported with the default outtype: llama.cpp's
    chat completion renders the GGUF's template, answers as `lorakit predict` does and stops at <|im_end|>."""
    out = tmp_path / "chat.gguf"
    export("--adapter", chat_run, "--format", "gguf", "--output", out)
    reply = llama(out).create_chat_completion([{"role": "user", "content": "hello there"}], max_tokens=20,
                                              temperature=0.0)["choices"][0]
    assert (reply["message"]["content"], reply["finish_reason"]) == (ANSWER, "stop")


# ---- tokenizers: the pre-tokenizer from tokenizer.json ----

LLAMA3_TEMPLATE = ("{% for m in messages %}{% set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                   " + m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
                   "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def pre_tokenizer_spec(pre) -> dict:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return json.loads(tok.to_str())["pre_tokenizer"]


def test_pre_tokenizer_is_named_from_what_tokenizer_json_says():
    from tokenizers import Regex, pre_tokenizers

    from lorakit.deploy.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer
    from lorakit.settings import ConfigError

    split = lambda regex: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),  # noqa: E731
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer(pre_tokenizer_spec(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    assert pre_tokenizer(pre_tokenizer_spec(split(LLAMA3_SPLIT))) == "llama-bpe"
    assert pre_tokenizer(pre_tokenizer_spec(split(QWEN2_SPLIT))) == "qwen2"
    with pytest.raises(ConfigError, match="llama.cpp has no pre-tokenizer"):
        pre_tokenizer(pre_tokenizer_spec(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                                  pre_tokenizers.ByteLevel(use_regex=False)])))


@pytest.fixture(scope="module")
def llama3_style_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer splits as Llama 3's does (Split + ByteLevel without regex), Llama 3's template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.deploy.vocab import LLAMA3_SPLIT

    path = tmp_path_factory.mktemp("llama3-style")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the year 2024 was 12345 days long, wasn't it?\n\nI'll say  so\tthen"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=LLAMA3_TEMPLATE)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=len(fast), max_position_embeddings=64,
                                 bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)).save_pretrained(path)
    return path


@needs_llama_cpp
def test_llama3_style_tokenizer_tokenizes_in_llama_cpp_as_in_transformers(llama3_style_dir, tmp_path):
    run = make_adapter(llama3_style_dir, tmp_path / "run")
    out = tmp_path / "m.gguf"
    export("--adapter", run, "--format", "gguf", "--output", out, "--outtype", "f32", "--ollama")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    _, tokenizer, _, _ = load_trained(None, str(run))
    llm = llama(out)
    for text in ["the year 2024 was 12345 days long, wasn't it?", "I'll  say so\n\n\tthen 7", "<|eot_id|>the"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile


# ---- Ollama ----

@needs_llama_cpp
def test_ollama_modelfile_for_chatml_and_for_a_separate_lora(runs, tmp_path):
    said = export("--adapter", runs["lora"], "--format", "gguf-lora", "--output", tmp_path / "adapter.gguf",
                  "--base-output", tmp_path / "base.gguf", "--ollama")
    assert "ChatML chat template" in said
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}') for line in lines)


def test_a_template_ollama_cannot_take_is_said_plainly(tmp_path):
    from chat_tokenizers import LLAMA2, chat_tokenizer

    from lorakit.deploy.ollama import write_modelfile

    said = write_modelfile(tmp_path / "Modelfile", tmp_path / "m.gguf", None, chat_tokenizer(LLAMA2))
    assert "not one lorakit can translate" in said
    assert (tmp_path / "Modelfile").read_text() == "FROM ./m.gguf\n"


# ---- vLLM ----

def test_vllm_export_writes_a_plain_peft_adapter_and_the_serve_line(runs, tmp_path):
    said = export("--adapter", runs["lora"], "--format", "vllm", "--output", tmp_path / "news")
    config = json.loads((tmp_path / "news" / "adapter_config.json").read_text())
    assert not any(key.startswith("lorakit_") for key in config) and config["r"] == 4 and not config["use_dora"]
    assert f"vllm serve {config['base_model_name_or_path']} --enable-lora --lora-modules news={tmp_path / 'news'}" \
        in said
    assert f"--chat-template {tmp_path / 'news' / 'chat_template.jinja'}" in said


def test_vllm_export_of_per_module_ranks_loads_in_peft_with_the_same_outputs(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export("--adapter", runs["patterns"], "--format", "vllm", "--output", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["rank_pattern"]) == (8, 8, False, {})
    ours, tokenizer, _, _ = load_trained(None, str(runs["patterns"]), precision="fp32")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                           tmp_path / "out").eval()
    ids = torch.tensor([prompt_ids(tokenizer)])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_vllm_refuses_what_it_cannot_serve_with_the_reason(runs, chat_llama_dir, tmp_path):
    said = refused("--adapter", runs["dora"], "--format", "vllm", "--output", tmp_path / "d")
    assert "vLLM does not support DoRA" in said and not (tmp_path / "d").exists()
    wide = make_adapter(chat_llama_dir, tmp_path / "wide", r=32, targets=["q_proj"])
    assert "pass --max-lora-rank 32" in refused("--adapter", wide, "--format", "vllm", "--output", tmp_path / "w")
    said = export("--adapter", wide, "--format", "vllm", "--output", tmp_path / "w", "--max-lora-rank", "32")
    assert "--max-lora-rank 32" in said
    saved = make_adapter(chat_llama_dir, tmp_path / "saved", modules_to_save=["norm"])
    assert "saves ['model.norm']" in refused("--adapter", saved, "--format", "vllm", "--output", tmp_path / "s")
    said = export("--adapter", runs["qlora"], "--format", "vllm", "--output", tmp_path / "q")
    assert "NF4-quantized base" in said


# ---- the rest of the Llama family ----

def family_dir(root: Path, model_type: str) -> Path:
    """A 1-layer Qwen2 (q/k/v biases, tied embeddings, rotate-half RoPE in llama.cpp too), Mistral (head_dim 16
    beside hidden 32 / 4 heads) or Llama with Llama 3.1's RoPE scaling (scaled from position 16 on), with random
    weights and the chat tokenizer, and more embeddings than tokens (as Qwen2's: Qwen2's tokenizer class adds
    <|endoftext|>, and the rest become unused padding tokens in GGUF)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from chat_tokenizers import chat_tokenizer

    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(root)
    shape = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer) + 16, max_position_embeddings=64,
                 initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    llama31_rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    extra = {"qwen2": dict(tie_word_embeddings=True), "mistral": dict(head_dim=16, max_position_embeddings=8192),
             "llama": dict(rope_scaling=llama31_rope)}[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**shape, **extra}))
    if model_type == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)  # biases that matter, in llama.cpp's row order too
    model.save_pretrained(root)
    return root


@needs_llama_cpp
@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "llama"])
def test_qwen2_mistral_and_llama31_rope_merged_and_separate(tmp_path, model_type):
    run = make_adapter(family_dir(tmp_path / "base-model", model_type), tmp_path / "run")
    merged, adapter, base = tmp_path / "m.gguf", tmp_path / "a.gguf", tmp_path / "b.gguf"
    said = export("--adapter", run, "--format", "gguf", "--output", merged, "--outtype", "f32")
    assert ("sliding window of 4096 tokens" in said) == (model_type == "mistral")  # llama.cpp would attend past it
    export("--adapter", run, "--format", "gguf-lora", "--output", adapter, "--base-output", base, "--outtype", "f32")
    arch = gguf.GGUFReader(merged).fields["general.architecture"].contents()
    assert arch == {"qwen2": "qwen2", "mistral": "llama", "llama": "llama"}[model_type]
    net, tokenizer = merged_model(run)
    ids = prompt_ids(tokenizer)
    expected = hf_logits(net, ids)
    assert np.abs(cpp_logits(llama(merged), ids) - expected).max() < TOLERANCE["f32"]
    assert np.abs(cpp_logits(llama(base, adapter), ids) - expected).max() < TOLERANCE["f32"]


@pytest.fixture(scope="module")
def sentencepiece_style_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer laid out as transformers converts Llama 2's SentencePiece model: BPE with byte
    fallback (<0x00>..<0xFF> in the vocabulary), "▁" for spaces and before the text, and merges that are every
    split of every piece into two pieces, in the order of the pieces (SentencePiece's scores)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from chat_tokenizers import LLAMA2

    path = tmp_path_factory.mktemp("sentencepiece-style")
    fixed = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=420, special_tokens=fixed))
    pieces = sorted(trained.get_vocab(), key=trained.get_vocab().get)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    splits = [(p[:k], p[k:]) for p in pieces[len(fixed):] for k in range(1, len(p)) if {p[:k], p[k:]} <= vocab.keys()]
    merges = sorted(splits, key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA2)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=len(fast), max_position_embeddings=64,
                                 initializer_range=0.2, bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    return path


@needs_llama_cpp
def test_sentencepiece_style_tokenizer_runs_in_llama_cpp_as_in_transformers(sentencepiece_style_dir, tmp_path):
    run = make_adapter(sentencepiece_style_dir, tmp_path / "run")
    out = tmp_path / "m.gguf"
    export("--adapter", run, "--format", "gguf", "--output", out, "--outtype", "f32")
    fields = gguf.GGUFReader(out).fields
    assert (fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.add_space_prefix"].contents()) == \
        ("llama", True)
    net, tokenizer = merged_model(run)
    llm = llama(out)
    # Word fragments make pieces that several merge orders could build: these need the merge ranks as scores (with
    # equal scores llama.cpp tokenizes some of them differently, "question is ws" among them).
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS).split()
    fragments = [" ".join(w[rng.integers(3):] for w in rng.choice(words, 4)) for _ in range(200)]
    for text in ["hello there how are you", "what is the topic? sports news", "be brief é 7", "[INST] hi [/INST]",
                 "question is ws assistant", *fragments]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
    ids = tokenizer.apply_chat_template(PROMPT, tokenize=True, return_dict=False)
    assert llm.tokenize(tokenizer.apply_chat_template(PROMPT, tokenize=False).encode(), add_bos=False,
                        special=True) == ids
    assert np.abs(cpp_logits(llm, ids) - hf_logits(net, ids)).max() < TOLERANCE["f32"]


def test_export_is_a_command_with_help_for_every_option():
    from typer.main import get_command

    text = runner.invoke(app, ["export", "--help"]).output
    spec = get_command(app).commands["export"]
    missing = [o for p in spec.params for o in p.opts if o.startswith("--") and o not in text]
    assert "Usage: root export [OPTIONS]" in text and not missing
