"""`lorakit export`: GGUF files checked by llama.cpp itself (llama-cpp-python), Ollama Modelfiles, vLLM adapters.

The model is a tiny random Llama with a byte-level BPE tokenizer and a ChatML template (conftest's chat_llama_dir);
its adapters are drawn at random (A and B both), so that merging changes every logit. The oracle is lorakit's own
merged model in float32: llama.cpp must give its logits within what the outtype's rounding allows, the same greedy
tokens, and the same token ids for a chat prompt as the Hugging Face tokenizer.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from deploy_cases import (
    PROMPT,
    TOLERANCE,
    base_logits,
    cpp_greedy,
    cpp_logits,
    export,
    gguf,
    hf_greedy,
    hf_logits,
    llama,
    make_adapter,
    merged_model,
    needs_llama_cpp,
    prompt_ids,
    refused,
    runner,
)
from test_chat_cli import ANSWER, chat_run  # noqa: F401  (a fixture: a tiny Llama trained on conversations)

import lorakit
from lorakit.adapters.parts import lora_layers
from lorakit.cli.main import app
from lorakit.io.models import load_model
from lorakit.training.tasks import CAUSAL_LM
from lorakit.training.trained import load_trained


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
    net, _ = load_model(str(gpt2_dir), CAUSAL_LM)
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


def test_vllm_export_of_a_gpt2_adapter_keeps_fan_in_fan_out_and_peft_outputs(tmp_path):
    from peft import PeftModel
    from tiny_models import tiny_gpt2

    from lorakit.deploy.vllm import write

    ours = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"]))
    with torch.no_grad():
        for layer in lora_layers(ours).values():  # B starts at zero: give the adapter an effect
            layer.lora_B["default"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lorakit.save_adapter(ours, tmp_path / "run")
    write(tmp_path / "run", tmp_path / "out", "gpt2", 16)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out").eval()
    assert not [w for w in said if "fan_in_fan_out" in str(w.message)]  # PEFT corrects a wrong flag; vLLM does not
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        expected = ours.eval()(ids).logits
        assert not torch.allclose(tiny_gpt2()(ids).logits, expected, atol=1e-3)  # the adapter matters
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)


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


def test_export_is_a_command_with_help_for_every_option():
    from typer.main import get_command

    text = runner.invoke(app, ["export", "--help"]).output
    spec = get_command(app).commands["export"]
    missing = [o for p in spec.params for o in p.opts if o.startswith("--") and o not in text]
    assert "Usage: root export [OPTIONS]" in text and not missing
