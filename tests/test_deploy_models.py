"""`lorakit export` across the Llama family and its tokenizers, checked by llama.cpp: Qwen2, Mistral and Llama 3.1's
RoPE scaling; byte-level BPE pre-tokenizers named from tokenizer.json (Llama 3's split), SentencePiece-style
tokenizers; the same token ids as transformers and lorakit's merged logits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_tokenizers import CORPUS
from deploy_cases import (
    PROMPT,
    TOLERANCE,
    cpp_logits,
    export,
    gguf,
    hf_logits,
    llama,
    make_adapter,
    merged_model,
    needs_llama_cpp,
    prompt_ids,
)

from lorakit.training.trained import load_trained

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
    from lorakit.errors import ConfigError

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


# ---- the rest of the Llama family ----

def family_dir(root: Path, model_type: str) -> Path:
    """A 1-layer Qwen2 (q/k/v biases, tied embeddings, rotate-half RoPE in llama.cpp too), Mistral (head_dim 16
    beside hidden 32 / 4 heads) or Llama with Llama 3.1's RoPE scaling (scaled from position 16 on), with random
    weights and the chat tokenizer, and more embeddings than tokens (as Qwen2's: Qwen2's tokenizer class adds
    <|endoftext|>, and the rest become unused padding tokens in GGUF)."""
    from chat_tokenizers import chat_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

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
    from chat_tokenizers import LLAMA2
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


