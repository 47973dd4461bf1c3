"""`lorakit train` on conversation data: recognised by its columns, rendered with the chat template (the tokenizer's
or --chat-template FILE, saved with the adapter), refused before training with the row named, truncated or dropped
as --overlong says, and packed with --packing to the loss of the unpacked batch."""

import json
from pathlib import Path

import pandas as pd
import pytest
from chat_tokenizers import CHATML

from lorakit.errors import ConfigError, DataError
from lorakit.training.rundir import read_log
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train

QUESTIONS = ["hello there", "how are you", "what is the topic", "sports news", "world news today",
             "hello how are you", "what is the news", "the topic is sports"]


def chats(n: int = 8, answer: str = "fine thanks") -> list[dict]:
    """n OpenAI-style conversations, each a question and the same answer."""
    return [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                          {"role": "assistant", "content": answer}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), task="causal-lm", data=str(data), output=str(out), batch_size=8, max_length=48,
                lr=1e-2, dropout=0.0, max_steps=2, log_every=1, save_every=100, warmup=0, targets="all-linear",
                precision="fp32")  # compared at fp32 tolerances whatever this CPU computes fastest in
    return TrainConfig(**{**base, **kw})


def test_conversations_train_and_the_template_is_saved(chat_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chats())
    said = []
    train(cfg(chat_llama_dir, data, tmp_path / "run", eval_data=str(data)), echo=said.append, progress=False)
    assert "training data: openai data: 8 examples from 8 rows" in said
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == CHATML
    # Plain prompt/text data trains without it: predict then gives prompts as they are.
    pd.DataFrame({"text": QUESTIONS}).to_json(tmp_path / "plain.jsonl", orient="records", lines=True)
    train(cfg(chat_llama_dir, tmp_path / "plain.jsonl", tmp_path / "plain"), echo=said.append, progress=False)
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()


def test_alpaca_rows_with_a_chat_template_file(chat_llama_dir, tmp_path):
    # The tokenizer's own template replaced by a file's (a system line first): the file is what gets saved.
    template = tmp_path / "system-first.jinja"
    template.write_text("<|im_start|>system\nbe brief<|im_end|>\n" + CHATML)
    rows = [{"instruction": q, "input": "", "output": "fine thanks"} for q in QUESTIONS]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    said = []
    train(cfg(chat_llama_dir, data, tmp_path / "run", chat_template=str(template)), echo=said.append, progress=False)
    assert "training data: alpaca data: 8 examples from 8 rows" in said
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == template.read_text()


def refused(config, error, match):
    with pytest.raises(error, match=match):
        train(config, progress=False)
    assert not Path(config.output).exists(), "a refused run must write nothing"


def test_bad_conversations_are_refused_before_training_naming_the_row(chat_llama_dir, bert_dir, tmp_path):
    out = tmp_path / "run"
    turns = write_jsonl(tmp_path / "turns.jsonl", [{"turns": c["messages"]} for c in chats(3)])
    refused(cfg(chat_llama_dir, turns, out, text_column="turns"), DataError,
            r"row 1: column 'turns' holds lists .*not text")
    topics = write_jsonl(tmp_path / "topics.jsonl", [{"text": c["messages"], "label": i % 2}
                                                     for i, c in enumerate(chats(4))])
    refused(cfg(bert_dir, topics, out, task="classify"), DataError, r"row 1: column 'text' holds a list, not text")
    rows = chats(3)
    rows[1]["messages"][1] = {"speaker": "assistant", "text": "fine"}
    refused(cfg(chat_llama_dir, write_jsonl(tmp_path / "pairs.jsonl", rows), out), DataError,
            r"row 2: message 2 is not a role/content pair")
    rows = chats(3)
    rows[2]["messages"] = rows[2]["messages"][:1]
    refused(cfg(chat_llama_dir, write_jsonl(tmp_path / "silent.jsonl", rows), out), DataError,
            r"row 3: the conversation has no assistant message")
    mute = tmp_path / "mute.jinja"  # a template that drops what the assistant says
    mute.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
                    "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    refused(cfg(chat_llama_dir, write_jsonl(tmp_path / "ok.jsonl", chats(3)), out, chat_template=str(mute)),
            DataError, "renders without the assistant's text")
    refused(cfg(chat_llama_dir, tmp_path / "ok.jsonl", out, packing=True, task="classify"), ConfigError,
            "--packing and --chat-template are for language models \\(--task causal-lm ")


def test_overlong_rows_are_truncated_or_dropped_and_counted(chat_llama_dir, tmp_path):
    rows = chats(6) + chats(2, answer="fine thanks " * 20)  # 2 answers far over 48 tokens
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    said = []
    train(cfg(chat_llama_dir, data, tmp_path / "cut"), echo=said.append, progress=False)
    assert "training data: openai data: 8 examples from 8 rows; truncated 2 of 8 rows longer than 48 tokens" in said
    train(cfg(chat_llama_dir, data, tmp_path / "drop", overlong="drop"), echo=said.append, progress=False)
    assert "training data: openai data: 6 examples from 8 rows; dropped 2 of 8 rows longer than 48 tokens" in said


def test_packed_step_has_the_loss_and_tokens_of_the_unpacked_step(chat_llama_dir, tmp_path):
    # One step over all 8 conversations (about 25 tokens each): packed 2 to a row of 64 tokens (4 rows, a batch of
    # 4), or padded one per row (a batch of 8). The step's loss is the mean over the same target tokens either way,
    # and the real tokens are counted alike.
    data = write_jsonl(tmp_path / "chats.jsonl", chats())
    said, steps = [], {}
    for name, packing, batch in (("padded", False, 8), ("packed", True, 4)):
        records = []
        train(cfg(chat_llama_dir, data, tmp_path / name, max_length=64, max_steps=1, packing=packing,
                  batch_size=batch), on_step=records.append, echo=said.append, progress=False)
        steps[name] = records[0]
    assert any(line.endswith("packed into 4 rows of up to 64 tokens") for line in said), said
    assert steps["packed"]["loss"] == pytest.approx(steps["padded"]["loss"], abs=1e-5)
    assert steps["packed"]["tokens"] == steps["padded"]["tokens"] > 8 * 20
    logged = read_log(tmp_path / "packed" / "log.jsonl")
    assert logged[0]["loss"] == steps["packed"]["loss"]


def test_conversations_without_a_language_model_task_get_the_hint(bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chats())
    cfg = TrainConfig(model=str(bert_dir), data=str(data), output=str(tmp_path / "run"), max_steps=1)  # classify
    with pytest.raises(DataError, match=r"no column 'text', 'label'; columns found: messages; these are openai "
                                        r"conversations: train a language model on them with --task causal-lm"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
