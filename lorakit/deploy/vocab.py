"""A Hugging Face tokenizer as GGUF's tokenizer.ggml.* keys: its llama.cpp tokenizer model, tokens, token types,
merges or scores, special token ids, whether BOS/EOS are added, the pre-tokenizer and the chat template.

Two kinds of tokenizer.json are written. Byte-level BPE (GPT-2, Llama 3, Qwen2) becomes llama.cpp's "gpt2" model
with its merges. llama.cpp's converter names its pre-tokenizer by hashing the token ids of a test string and looking
the hash up in a list of known tokenizers, so a tokenizer built from standard parts that is on no list is refused
there; here the pre-tokenizer is read from what tokenizer.json says it does (its split regex) and named by the
llama.cpp pre-tokenizer that runs the same regex. SentencePiece's BPE with byte fallback, as transformers converts
Llama 2's and Mistral's tokenizer.model, becomes llama.cpp's "llama" model; its scores (which llama.cpp merges by)
are the merge ranks, so that the highest score is the merge BPE makes first.

Hand-written because the `gguf` package's vocab classes read only files, treat every token of a BPE vocabulary as a
normal token (chat tokens trained into it must be control tokens for llama.cpp to parse them in prompts), and give
every SentencePiece-style token the same score.
"""

from __future__ import annotations

import json
import re

from ..errors import ConfigError

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


def tokenizer_model(spec: dict) -> str:
    """llama.cpp's tokenizer model for tokenizer.json `spec`: "gpt2" for byte-level BPE, "llama" for SentencePiece's
    BPE with byte fallback (as transformers converts Llama 2's and Mistral's); ConfigError for any other."""
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in NORMALIZERS:
            raise ConfigError(f"GGUF export: llama.cpp would not apply this tokenizer's {normalizer} normalizer")
        pre_tokenizer(spec.get("pre_tokenizer") or {})
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        space_prefix(spec)
        return "llama"
    raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) and "
                      f"SentencePiece-style BPE with byte fallback (Llama 2, Mistral); this one is a "
                      f"{model.get('type')} model decoded by {decoder.get('type')}")


def space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (llama.cpp's add_space_prefix); ConfigError
    for a normalizer or pre-tokenizer llama.cpp's SentencePiece tokenizer does not reproduce."""
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    steps = [step for step in steps if step]
    kinds = [step.get("type") for step in steps]
    replaces_spaces = bool(steps) and steps[-1].get("pattern", {}).get("String") == " " and \
        steps[-1].get("content") == "\u2581"
    if not pre and kinds in (["Prepend", "Replace"], ["Replace"]) and replaces_spaces:
        return kinds[0] == "Prepend"  # Llama 2's "legacy" tokenizer.json
    if not normalizer and pre.get("type") == "Metaspace" and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "never"
    raise ConfigError(f"GGUF export: llama.cpp's SentencePiece tokenizer does not reproduce this tokenizer's "
                      f"normalizer {json.dumps(normalizer)[:200]} and pre-tokenizer {json.dumps(pre)[:200]}")


def token_list(tokenizer, vocab_size: int, byte_tokens: bool = False) -> tuple[list[str], list[int]]:
    """(tokens, GGUF token types) for ids 0..vocab_size-1: special added tokens are control tokens, other added
    tokens user-defined, ids the tokenizer does not use (embedding rows past its end) unused padding; with
    `byte_tokens` (SentencePiece), <0xXX> tokens are byte tokens and the unknown token is one."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has token id {max(by_id)} but the model only {vocab_size} "
                          f"embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif byte_tokens and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        elif byte_tokens and i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
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


def merge_scores(spec: dict, tokens: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp, from the merges: minus the rank of the first merge making each token (its
    tokenizer merges the adjacent pair whose result scores highest, as BPE merges the pair of lowest rank); 0 for
    tokens no merge makes."""
    rank = {}
    for i, merge in enumerate(spec["model"].get("merges", [])):
        rank.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


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
    if tokenizer_model(spec) == "gpt2":
        merges(spec)
    token_list(tokenizer, vocab_size)


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* keys and the chat template (the tokenizer's `chat_template`, if any)."""
    spec = tokenizer_json(tokenizer)
    model = tokenizer_model(spec)
    tokens, types = token_list(tokenizer, vocab_size, byte_tokens=model == "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer(spec.get("pre_tokenizer") or {}))
        writer.add_token_merges(merges(spec))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(merge_scores(spec, tokens))
        writer.add_add_space_prefix(space_prefix(spec))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    bos, eos = adds_special(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
