"""Reading tables, checking columns and labels, tokenising, batching and the order of examples."""

import json

import pandas as pd
import pytest
import torch
from conftest import shared_data
from transformers import AutoTokenizer

from lorakit.data import tables as data


def test_reads_every_format_by_extension(tmp_path):
    df = pd.DataFrame({"text": ["a b", "c"], "label": [0, 1]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.tsv", "t.jsonl", "t.parquet"):
        got = data.read_table(tmp_path / name)
        assert got["text"].tolist() == ["a b", "c"] and got["label"].tolist() == [0, 1], name


def test_tsv_keeps_quotes_inside_sentences(tmp_path):
    (tmp_path / "q.tsv").write_text('label\tsentence\n1\t"a quote that never closes\n0\tit \'s "fine" really\n')
    got = data.read_table(tmp_path / "q.tsv")
    assert got["sentence"].tolist() == ['"a quote that never closes', 'it \'s "fine" really']


@pytest.mark.parametrize("content, message", [("", "is empty"), ("text,label\n", "has no rows")])
def test_empty_files_are_refused(tmp_path, content, message):
    (tmp_path / "e.csv").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.read_table(tmp_path / "e.csv")


def test_missing_file_unknown_type_and_unloadable_dataset(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="data file not found"):
        data.read_table(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.read_table(tmp_path / "x.xlsx")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="could not be loaded as a Hugging Face dataset"):
        data.read_table("some_user/some_dataset:test")


def test_hub_dataset_name_and_split(monkeypatch):
    import datasets

    seen = {}

    def fake(name, split):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_dict({"text": ["x"], "label": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.read_table("ag_news:test")["label"].tolist() == [1]
    assert seen == {"name": "ag_news", "split": "test"}


def test_missing_column_lists_the_columns_found():
    df = pd.DataFrame({"sentence": ["x"], "label": [0]})
    with pytest.raises(data.DataError, match=r"no column 'text'; columns found: sentence, label"):
        data.check_columns(df, ["text", "label"], "train.tsv")


def test_several_text_columns_are_joined_with_a_space():
    df = pd.DataFrame({"title": ["Big win", "Shares fall"], "description": ["for the home team", None]})
    assert data.texts(df, data.split_columns("title, description")) == ["Big win for the home team", "Shares fall"]


def test_label_maps_for_ids_and_names():
    assert data.label_names(pd.Series([2, 0, 1, 0]), "t") == ["0", "1", "2"]
    assert data.label_names(pd.Series(["World", "Sports", "World"]), "t") == ["Sports", "World"]
    assert data.encode_labels(pd.Series([1, 0]), ["0", "1"], "t") == [1, 0]
    assert data.encode_labels(pd.Series(["World", "Sports"]), ["Sports", "World"], "t") == [1, 0]
    with pytest.raises(data.DataError, match=r"labels \['Tech'\] are not in the training label map"):
        data.encode_labels(pd.Series(["World", "Tech"]), ["Sports", "World"], "eval.csv")
    # rows counted from 1, the first data row, as every message about a row counts them
    with pytest.raises(data.DataError, match=r"t: 1 empty label, in row\(s\) 2$"):
        data.label_names(pd.Series(["World", None]), "t")
    with pytest.raises(data.DataError, match=r"eval.csv: 2 empty labels, in row\(s\) 1, 3$"):
        data.encode_labels(pd.Series([None, "World", None]), ["World"], "eval.csv")


def test_causal_examples_mask_the_prompt_and_end_with_eos(gpt2_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    (row,) = data.causal_examples(tok, [" sports"], ["striker coach question answer:"], max_length=64)
    prompt = tok("striker coach question answer:")["input_ids"]
    assert row["input_ids"][: len(prompt)] == prompt and row["input_ids"][-1] == tok.eos_token_id
    assert row["labels"][: len(prompt)] == [-100] * len(prompt)
    assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):]
    (plain,) = data.causal_examples(tok, ["election summit"], None, max_length=64)
    assert plain["labels"] == plain["input_ids"] and plain["input_ids"][-1] == tok.eos_token_id
    (short,) = data.causal_examples(tok, [" sports league stadium medal"], ["striker coach"], max_length=6)
    assert len(short["input_ids"]) == 6 and short["input_ids"][-1] == tok.eos_token_id
    assert any(label != -100 for label in short["labels"])


def test_collators_pad_inputs_and_ignore_padded_labels(gpt2_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    data.ensure_pad_token(tok)
    rows = data.causal_examples(tok, [" a", " sports league"], ["q:", "q:"], max_length=32)
    batch = data.token_collator(tok)(rows)
    n0 = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][0, n0:] == -100).all() and (batch["attention_mask"][0, n0:] == 0).all()


def test_classification_examples_and_padding(bert_dir):
    tok = AutoTokenizer.from_pretrained(bert_dir)
    rows = data.classification_examples(tok, ["short", "a much longer headline " * 20], [0, 1], max_length=16)
    assert len(rows[1]["input_ids"]) == 16 and rows[1]["labels"] == 1
    batch = data.label_collator(tok)(rows)
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [0, 1]


def test_two_processes_see_the_batches_of_one_with_double_batch():
    for n in (10, 16, 3):
        order = data.epoch_order(n, global_batch=8, seed=1, epoch=0)
        assert len(order) % 8 == 0 and set(order) == set(range(n))
        for step in range(len(order) // 8):
            single = data.micro_batch(order, step, 8, rank=0, world=1)
            pair = data.micro_batch(order, step, 4, rank=0, world=2) + data.micro_batch(order, step, 4, rank=1, world=2)
            assert single == pair
    assert data.epoch_order(10, 2, seed=1, epoch=0) != data.epoch_order(10, 2, seed=1, epoch=1)
    assert data.epoch_order(10, 2, seed=1, epoch=3) == data.epoch_order(10, 2, seed=1, epoch=3)


def test_load_labels(tmp_path):
    assert data.load_labels(tmp_path) is None
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    assert data.load_labels(tmp_path) == ["a", "b"]


def test_demo_headlines_are_shipped_and_split():
    df = data.demo_table()
    assert list(df.columns) == ["text", "label"] and len(df) >= 300 and df["label"].nunique() >= 4
    train, held_out = data.demo_split(seed=0)
    assert len(held_out) == data.DEMO_EVAL_ROWS and len(train) == len(df) - data.DEMO_EVAL_ROWS
    assert not set(train["text"]) & set(held_out["text"])


def test_real_sst2_and_ag_news_read_cleanly():
    sst2 = data.read_table(shared_data("sst2", "train.tsv"))
    assert list(sst2.columns) == ["label", "sentence"] and len(sst2) == 67_349
    assert set(sst2["label"]) == {0, 1}
    ag = data.read_table(shared_data("ag_news", "train.csv"))
    assert len(ag) == 4_800 and data.label_names(ag["label"], "ag") == ["0", "1", "2", "3"]
    assert torch.tensor(data.encode_labels(ag["label"], ["0", "1", "2", "3"], "ag")).max() == 3
