"""A Hugging Face tokenizer as GGUF's tokenizer.ggml.* keys: the byte-level BPE model ("gpt2" in llama.cpp), its
tokens, token types, merges, special token ids, whether BOS/EOS are added, the pre-tokenizer and the chat template.

llama.cpp's converter names the pre-tokenizer by hashing the token ids of a test string and looking the hash up in a
list of known tokenizers; a tokenizer built from standard parts that is on no list is refused there. Here the
pre-tokenizer is read from what tokenizer.json says it does (its split regex), and named by the llama.cpp
pre-tokenizer that runs that same regex. Hand-written because the `gguf` package's vocab classes read only files
and treat every token of the BPE vocabulary as a normal token, while chat tokens trained into it must be control
tokens for llama.cpp to parse them in prompts.
"""

from __future__ import annotations

import json

from ..settings import ConfigError

# GPT-2's split, as tokenizers' ByteLevel pre-tokenizer runs it with use_regex=True.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The split regex a tokenizer runs before byte-level BPE -> the llama.cpp pre-tokenizer that runs it.
PRE_TOKENIZERS = {GPT2_SPLIT: "gpt-2", LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
NORMALIZERS = (None, "NFC")  # llama.cpp applies none; NFC (Qwen2's) leaves ordinary text as it is


def tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json a fast tokenizer is built from; ConfigError for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    return json.loads(backend.to_str())


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the byte-level BPE pre-tokenizer `spec` (tokenizer.json's "pre_tokenizer") describes."""
    parts = spec.get("pretokenizers", [spec]) if spec and spec.get("type") == "Sequence" else [spec]
    split = None
    if len(parts) == 1 and parts[0] and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        if parts[0].get("add_prefix_space"):
            raise ConfigError("GGUF export: this tokenizer adds a space before the text (ByteLevel "
                              "add_prefix_space), which llama.cpp's BPE tokenizer does not do")
        split = GPT2_SPLIT
    elif (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
          and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel"
          and not parts[1].get("use_regex", True)):
        split = parts[0].get("pattern", {}).get("Regex")
    if split not in PRE_TOKENIZERS:
        raise ConfigError(f"GGUF export: llama.cpp has no pre-tokenizer for this tokenizer's "
                          f"{json.dumps(spec)[:300]}; supported: byte-level BPE with the split of "
                          f"{', '.join(PRE_TOKENIZERS.values())}")
    return PRE_TOKENIZERS[split]


def check_byte_level_bpe(spec: dict) -> None:
    """ConfigError unless tokenizer.json `spec` is a byte-level BPE llama.cpp's "gpt2" tokenizer model runs."""
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this one "
                          f"is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''}"
                          f" decoded by {decoder.get('type')} (a SentencePiece-style tokenizer is not supported yet)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in NORMALIZERS:
        raise ConfigError(f"GGUF export: llama.cpp would not apply this tokenizer's {normalizer} normalizer")


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, GGUF token types) for ids 0..vocab_size-1: special added tokens are control tokens, other added
    tokens user-defined, ids the tokenizer does not use (embedding rows past its end) unused padding."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has token id {max(by_id)} but the model only {vocab_size} "
                          f"embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merges(spec: dict) -> list[str]:
    """BPE merges as GGUF stores them, "left right" (tokenizers writes pairs as lists since 0.20)."""
    out = []
    for merge in spec["model"].get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ConfigError(f"GGUF export: cannot store the BPE merge {merge!r} (a space inside a token)")
        out.append(" ".join(pair))
    return out


def adds_special(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the tokenizer puts around a text when asked for special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return bos, eos


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """ConfigError if the tokenizer cannot be written to GGUF (the checks write_tokenizer makes, writing nothing)."""
    spec = tokenizer_json(tokenizer)
    check_byte_level_bpe(spec)
    pre_tokenizer(spec.get("pre_tokenizer") or {})
    token_list(tokenizer, vocab_size)
    merges(spec)


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* keys and the chat template (the tokenizer's `chat_template`, if any)."""
    spec = tokenizer_json(tokenizer)
    check_byte_level_bpe(spec)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    bos, eos = adds_special(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
