"""Tokenising through `datasets`: every format, truncate or drop with counts, row numbers through worker processes,
the prompt/text path unchanged, and a cache that is reused until the tokenizer, template or settings change."""

import json

import pandas as pd
import pytest
from chat_tokenizers import CHATML, LLAMA2, chat_tokenizer
from transformers import AutoTokenizer

from lorakit.data import conversations as C
from lorakit.data import prepare as P
from lorakit.data import tables as D
from lorakit.errors import DataError


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ROWS = [conversation("hello there", "fine thanks"), conversation("what is the topic", "sports news"),
        conversation("how are you " * 12, "fine"), conversation("hi", "world news " * 12)]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in ROWS])


def test_chat_rows_are_tokenised_as_chat_labels_does(chat_file, tmp_path):
    tok = chat_tokenizer(CHATML)
    got = P.prepare(chat_file, tok, max_length=512, cache_dir=str(tmp_path / "cache"))
    assert got.format == "openai" and got.rows == 4 and got.too_long == 0 and got.unlearnable == 0
    assert got.dataset.column_names == ["input_ids", "attention_mask", "labels"]
    for i, messages in enumerate(ROWS):
        assert got.dataset[i] == C.chat_labels(tok, messages, i + 1)
    assert got.summary() == "openai data: 4 examples from 4 rows"


def test_sharegpt_and_alpaca_files_and_a_dataframe(tmp_path):
    tok = chat_tokenizer(CHATML)
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hello there"},
                                                                  {"from": "gpt", "value": "fine thanks"}]}])
    alpaca = tmp_path / "a.csv"
    table = pd.DataFrame({"instruction": ["hello there"], "input": [None], "output": ["fine thanks"]})
    table.to_csv(alpaca, index=False)
    frame = pd.DataFrame({"messages": [ROWS[0]]})
    want = C.chat_labels(tok, ROWS[0], 1)
    for source, name in ((share, "sharegpt"), (alpaca, "alpaca"), (frame, "openai")):
        got = P.prepare(source, tok, max_length=64, cache_dir=str(tmp_path / "cache"))
        assert (got.format, got.dataset[0]) == (name, want), name


def test_long_rows_are_truncated_or_dropped_and_counted(chat_file, tmp_path):
    tok = chat_tokenizer(CHATML)
    lengths = [len(C.chat_labels(tok, m, 1)["input_ids"]) for m in ROWS]
    limit = 32
    assert lengths[0] <= limit and lengths[1] <= limit and min(lengths[2:]) > limit  # the data's premise
    cut = P.prepare(chat_file, tok, max_length=limit, overlong="truncate", cache_dir=str(tmp_path / "cache"))
    # Row 3's answer lies beyond the cut: it is dropped either way, and said so.
    assert (cut.too_long, cut.unlearnable, len(cut.dataset)) == (2, 1, 3)
    assert [len(ids) for ids in cut.dataset["input_ids"]] == [lengths[0], lengths[1], limit]
    assert cut.summary() == ("openai data: 3 examples from 4 rows; truncated 2 of 4 rows longer than 32 tokens; "
                             "dropped 1 rows with no target token within the first 32 tokens")
    dropped = P.prepare(chat_file, tok, max_length=limit, overlong="drop", cache_dir=str(tmp_path / "cache"))
    assert (dropped.too_long, dropped.unlearnable, len(dropped.dataset)) == (2, 0, 2)
    assert dropped.summary().endswith("dropped 2 of 4 rows longer than 32 tokens")
    with pytest.raises(ValueError, match="overlong must be one of"):
        P.prepare(chat_file, tok, max_length=limit, overlong="wrap")


def test_a_bad_row_is_named_by_its_line_also_from_worker_processes(tmp_path):
    records = [{"messages": m} for m in ROWS] * 2
    records[5] = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    for num_proc in (None, 2):
        with pytest.raises(DataError, match=r"bad.jsonl: row 6: the conversation has no assistant message"):
            P.prepare(path, chat_tokenizer(CHATML), max_length=64, num_proc=num_proc, cache_dir=str(tmp_path / "c"))


def test_worker_processes_give_the_same_examples(chat_file, tmp_path):
    tok = chat_tokenizer(LLAMA2)
    one = P.prepare(chat_file, tok, max_length=64, cache_dir=str(tmp_path / "a"))
    two = P.prepare(chat_file, tok, max_length=64, num_proc=2, cache_dir=str(tmp_path / "b"))
    assert one.dataset.to_list() == two.dataset.to_list()


def test_prompt_and_text_rows_are_tokenised_as_before(qa_jsonl, gpt2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    df = D.read_table(qa_jsonl)
    for limit in (64, 6):  # 6 cuts every row: the EOS stays, as causal_examples keeps it
        got = P.prepare(qa_jsonl, tok, max_length=limit, text_columns=["completion"], prompt_column="prompt",
                        cache_dir=str(tmp_path / "cache"))
        want = D.causal_examples(tok, D.texts(df, ["completion"]), D.texts(df, ["prompt"]), limit)
        assert got.format == "text" and got.dataset.to_list() == want
    assert got.too_long == len(df) and got.summary().endswith(f"truncated {len(df)} of {len(df)} rows longer than "
                                                               f"6 tokens")


def test_list_or_dict_columns_are_no_plain_text(tmp_path):
    tok = chat_tokenizer(CHATML)
    frame = pd.DataFrame({"turns": [None, ROWS[0]], "meta": [{"a": 1}, {"a": 2}], "text": ["x", "y"]})
    with pytest.raises(DataError, match=r"row 2: column 'turns' holds lists .*not text; conversations are read from"):
        P.prepare(frame, tok, max_length=64, text_columns=["turns"])
    with pytest.raises(DataError, match=r"row 1: column 'meta' holds dicts"):
        P.prepare(frame, tok, max_length=64, prompt_column="meta")
    with pytest.raises(DataError, match=r"no column 'body'"):
        P.prepare(frame, tok, max_length=64, text_columns=["body"])
    with pytest.raises(DataError, match=r"holds openai data .* --prompt-column system has no use"):
        P.prepare(pd.DataFrame({"messages": [ROWS[0]], "system": ["x"]}), tok, max_length=64, prompt_column="system")


def test_chat_data_needs_a_usable_chat_template():
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        P.prepare(pd.DataFrame({"messages": [ROWS[0]]}), chat_tokenizer(None), max_length=64)


def test_unreadable_sources(tmp_path):
    tok = chat_tokenizer(CHATML)
    with pytest.raises(DataError, match="data file not found"):
        P.prepare(tmp_path / "none.jsonl", tok, max_length=8)
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(DataError, match="could not read .*empty.csv.*no data"):
        P.prepare(tmp_path / "empty.csv", tok, max_length=8, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    with pytest.raises(DataError, match="could not read"):
        P.prepare(tmp_path / "broken.jsonl", tok, max_length=8, cache_dir=str(tmp_path / "cache"))


def test_the_cache_is_reused_until_tokenizer_template_or_settings_change(chat_file, tmp_path, monkeypatch):
    calls = []
    real = P._encode

    def counting(batch, indices, **kwargs):
        calls.append(len(indices))
        return real(batch, indices, **kwargs)

    monkeypatch.setattr(P, "_encode", counting)
    cache = str(tmp_path / "cache")

    def tokenises(tok, max_length=64, path=chat_file) -> bool:
        before = len(calls)
        got = P.prepare(path, tok, max_length=max_length, cache_dir=cache)
        assert got.dataset[0] == C.chat_labels(tok, ROWS[0], 1)  # from the cache or not, the right examples
        return len(calls) > before

    tok = chat_tokenizer(CHATML)
    assert tokenises(tok)
    assert not tokenises(tok) and not tokenises(chat_tokenizer(CHATML))  # same file, tokenizer and settings
    assert tokenises(tok, max_length=65)
    assert tokenises(chat_tokenizer(LLAMA2))  # another chat template
    bigger = chat_tokenizer(CHATML)
    bigger.add_tokens(["fine thanks"])  # another vocabulary
    assert tokenises(bigger)
    write_jsonl(chat_file, [{"messages": m} for m in ROWS[::-1]] + [{"messages": ROWS[0]}])  # the file changed
    calls.clear()
    P.prepare(chat_file, tok, max_length=64, cache_dir=cache)
    assert calls
