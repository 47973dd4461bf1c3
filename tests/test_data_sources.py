"""Data from several sources (--data given several times, a YAML list), mixed by --data-weights; --eval-split's
held-out rows; --streaming. Every error names its source; the trained and held-out examples are told apart by
content."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import topic_table
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.cli import main as cli
from lorakit.data.sources import apportion, mixed_order, parse_weights, split_indices
from lorakit.errors import ConfigError, DataError
from lorakit.training import dataset as dataset_module
from lorakit.training.dataset import load_data
from lorakit.training.settings import CONFIG_FILE, command_line_config, config_from, read_config_file
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train

QUESTIONS = ["hello there", "how are you", "what is the topic", "sports news", "world news today", "hello how are you",
             "what is the news", "the topic is sports"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int) -> list[dict]:
    """n distinct OpenAI-style conversations."""
    return [{"messages": [{"role": "user", "content": f"{QUESTIONS[i % 8]} {i}"},
                          {"role": "assistant", "content": f"fine thanks {i}"}]} for i in range(n)]


def qa_rows(n: int) -> list[dict]:
    """n distinct prompt/completion rows."""
    return [{"prompt": f"{QUESTIONS[i % 8]} question {i}:", "completion": f" sports {i}"} for i in range(n)]


def lm_cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), task="causal-lm", data=data, output=str(out), batch_size=4, max_length=48,
                lr=1e-2, dropout=0.0, max_steps=3, log_every=1, save_every=100, warmup=0, targets="all-linear",
                prompt_column="prompt", text_column="completion", precision="fp32")
    return TrainConfig(**{**base, **kw})


def refused(config: TrainConfig, error, match: str) -> None:
    with pytest.raises(error, match=match):
        train(config, progress=False)
    assert not Path(config.output).exists(), "a refused run must write nothing"


def trained_rows(monkeypatch) -> list:
    """The examples the run's batches are made of, as tuples of input ids (the collator's input, spied on)."""
    seen = []
    make = dataset_module.train_collator

    def spying(run_data, model, cfg):
        collate = make(run_data, model, cfg)
        return lambda rows: (seen.extend(tuple(r["input_ids"]) for r in rows), collate(rows))[1]

    monkeypatch.setattr(dataset_module, "train_collator", spying)
    return seen


# ---- the rule: counts, weights ----

def test_apportion_and_the_mixed_epoch_follow_the_rule():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]  # the one left over goes to the earliest of equal remainders
    assert apportion(40, [0.7, 0.3]) == [28, 12]
    assert apportion(7, [0, 1]) == [0, 7]
    order = mixed_order([10, 30], [0.7, 0.3], seed=3, epoch=0)
    assert len(order) == 40  # an epoch keeps the sources' total size
    first, second = Counter(i for i in order if i < 10), Counter(i for i in order if i >= 10)
    assert sum(first.values()) == 28 and sum(second.values()) == 12
    # The small source repeats in whole passes (each example 2 or 3 times), the large one is subsampled, no repeat.
    assert set(first) == set(range(10)) and set(first.values()) == {2, 3}
    assert set(second.values()) == {1}
    assert mixed_order([10, 30], [0.7, 0.3], seed=3, epoch=0) == order  # seeded
    assert mixed_order([10, 30], [0.7, 0.3], seed=3, epoch=1) != order  # each epoch drawn anew
    assert mixed_order([10, 30], [0.7, 0.3], seed=4, epoch=0) != order


def test_split_indices_hold_out_a_seeded_share_per_source():
    kept, held = split_indices(20, 0.25, seed=0, source=0)
    assert len(held) == 5 and len(kept) == 15 and sorted(kept + held) == list(range(20))
    assert split_indices(20, 0.25, seed=0, source=0) == (kept, held)
    assert split_indices(20, 0.25, seed=0, source=1)[1] != held  # each source its own draw
    assert len(split_indices(10, 0.05, seed=0, source=0)[1]) == 1  # 0.5 rounds up
    assert len(split_indices(9, 0.05, seed=0, source=0)[1]) == 0


@pytest.mark.parametrize("weights, match", [
    ("0.7", r"--data-weights: 1 weight for 2 --data sources"),
    ("0.5,0.3,0.2", r"--data-weights: 3 weights for 2 --data sources"),
    ("0.7,-0.3", r"--data-weights .*every weight must be a finite number >= 0"),
    ("0,0", r"--data-weights .*add up to 0"),
    ("a,b", r"--data-weights 'a,b': expected numbers"),
])
def test_bad_weights_are_refused_before_any_work(weights, match, tmp_path):
    # The files need not exist: the weights are checked first.
    refused(lm_cfg("no-model", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "run",
                   data_weights=weights), ConfigError, match)
    assert parse_weights([1, 3], 2) == [1.0, 3.0]


def test_sources_from_repeated_flags_and_a_yaml_list(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(cli, "run_training", lambda cfg, echo: got.append(cfg))
    result = CliRunner().invoke(cli.app, ["train", "--data", "a.jsonl", "--data", "b.csv", "--data-weights", "2,1"])
    assert result.exit_code == 0, result.output
    assert got[-1].data == ["a.jsonl", "b.csv"] and got[-1].data_weights == "2,1"
    CliRunner().invoke(cli.app, ["train", "--data", "a.jsonl"])
    assert got[-1].data == "a.jsonl"  # one source stays a string, as train_config.yaml always had it
    (tmp_path / "run.yaml").write_text("data:\n  - a.jsonl\n  - b.csv\ndata_weights: [0.7, 0.3]\n")
    cfg = command_line_config({}, tmp_path / "run.yaml")
    assert cfg.data == ["a.jsonl", "b.csv"] and cfg.data_weights == [0.7, 0.3]


def test_the_command_line_refuses_a_weight_count_naming_the_flag(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, ["train", "--data", "a.jsonl", "--data", "b.csv", "--data-weights", "1",
                                          "--output", str(out)])
    assert result.exit_code == 1 and "--data-weights: 1 weight for 2 --data sources" in result.output
    assert not out.exists()


# ---- several sources of different formats ----

def test_chat_and_prompt_completion_sources_become_one_kind_of_example(chat_llama_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    said = []
    run = load_data(lm_cfg(chat_llama_dir, [chats, qa], tmp_path / "run"), say=said.append)
    assert said == [f"training data: {chats}: openai data: 8 examples from 8 rows",
                    f"training data: {qa}: text data: 4 examples from 4 rows",
                    "training data: 12 examples from 2 sources, concatenated"]
    alone = [load_data(lm_cfg(chat_llama_dir, source, tmp_path / "run", prompt_column=prompt),
                       say=said.append).train for source, prompt in ((chats, None), (qa, "prompt"))]
    assert run.chat and len(run.train) == 12
    assert [run.train[i] for i in range(12)] == [alone[0][i] for i in range(8)] + [alone[1][i] for i in range(4)]
    # Each row has its own loss mask: the assistant's answer of a conversation, the completion of a qa row.
    for row in (run.train[0], run.train[8]):
        assert set(row) == {"input_ids", "attention_mask", "labels"}
        assert -100 in row["labels"] and any(label != -100 for label in row["labels"])


def test_weighted_sources_train_in_their_proportions_and_the_saved_config_repeats_the_run(chat_llama_dir, tmp_path,
                                                                                          monkeypatch):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    cfg = lm_cfg(chat_llama_dir, [chats, qa], tmp_path / "run", data_weights="1,3", max_steps=3, seed=5)
    seen = trained_rows(monkeypatch)
    train(cfg, progress=False)
    ids = {source: {tuple(row["input_ids"]) for row in load_data(lm_cfg(chat_llama_dir, source, tmp_path / "x",
                                                                       prompt_column=prompt), say=print).train}
           for source, prompt in ((chats, None), (qa, "prompt"))}
    # One epoch = 12 examples = 3 steps of 4: 1:3 of 12 is 3 conversations and 9 qa rows (each qa row 2 or 3 times).
    assert len(seen) == 12
    assert sum(r in ids[chats] for r in seen) == 3 and sum(r in ids[qa] for r in seen) == 9
    assert set(Counter(r for r in seen if r in ids[qa]).values()) <= {2, 3}
    saved = read_config_file(tmp_path / "run" / CONFIG_FILE)
    assert saved["data"] == [chats, qa] and saved["data_weights"] == [1.0, 3.0]
    again = config_from({**saved, "output": str(tmp_path / "again")})
    seen.clear()
    train(again, progress=False)
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("run", "again"))
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


def test_errors_name_the_source_and_its_row(chat_llama_dir, bert_dir, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(4))
    rows = chat_rows(3)
    rows[1]["messages"][1] = {"speaker": "assistant", "text": "fine"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    refused(lm_cfg(chat_llama_dir, [good, bad], tmp_path / "run"), DataError,
            rf"{bad}: row 2: message 2 is not a role/content pair")
    topics = tmp_path / "topics.csv"
    topic_table(4).to_csv(topics, index=False)
    labels = topic_table(4)
    labels.loc[2, "label"] = None
    unlabelled = tmp_path / "unlabelled.csv"
    labels.to_csv(unlabelled, index=False)
    classify = dict(task="classify", prompt_column=None, text_column="text")
    refused(lm_cfg(bert_dir, [str(topics), str(unlabelled)], tmp_path / "run", **classify), DataError,
            rf"{unlabelled}: 1 empty label, in row\(s\) 3")
    topic_table(4).rename(columns={"label": "topic"}).to_csv(tmp_path / "topic.csv", index=False)
    refused(lm_cfg(bert_dir, [str(topics), str(tmp_path / "topic.csv")], tmp_path / "run", **classify), DataError,
            rf"{tmp_path / 'topic.csv'}: no column 'label'")


# ---- --eval-split ----

def test_eval_split_holds_out_rows_never_trained_on(bert_dir, tmp_path, monkeypatch):
    first, second = topic_table(5, seed=1), topic_table(3, seed=2)  # 15 and 9 rows, each text its own (numbered)
    for name, table in (("a", first), ("b", second)):
        table["text"] = table["text"] + f" {name}" + table.index.astype(str)
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for table, path in zip((first, second), paths):
        table.to_csv(path, index=False)
    cfg = lm_cfg(bert_dir, list(map(str, paths)), tmp_path / "run", task="classify", prompt_column=None,
                 text_column="text", eval_split=0.25, max_steps=5, batch_size=4, max_length=16)
    seen = trained_rows(monkeypatch)
    said = []
    run = load_data(cfg, say=said.append)
    held = {tuple(r["input_ids"]) for r in run.eval}
    assert len(run.eval) == 4 + 2  # round(0.25 × 15) and round(0.25 × 9)
    assert [line for line in said if line.startswith("eval data:")] == [
        f"eval data: --eval-split 0.25 of {paths[0]} and {paths[1]}: 6 examples, not trained on"]
    train(cfg, progress=False)  # 5 steps of 4: every one of the 18 training rows at least once
    assert len(held) == 6 and set(seen).isdisjoint(held)
    assert set(seen) == {tuple(r["input_ids"]) for r in run.train} and len(set(seen)) == 18
    assert read_config_file(tmp_path / "run" / CONFIG_FILE)["eval_split"] == 0.25


def test_eval_split_refusals(bert_dir, tmp_path):
    data = tmp_path / "topics.csv"
    topic_table(2).to_csv(data, index=False)  # 6 rows
    one = tmp_path / "one.csv"
    topic_table(2).iloc[:1].to_csv(one, index=False)
    cfg = dict(task="classify", prompt_column=None, text_column="text")
    out = tmp_path / "run"
    refused(lm_cfg(bert_dir, str(data), out, eval_split=0.1, eval_data=str(data), **cfg), ConfigError,
            "--eval-split .* cannot be used with --eval-data")
    for share in (0, 1, 1.5, -0.2):
        refused(lm_cfg(bert_dir, str(data), out, eval_split=share, **cfg), ConfigError,
                r"--eval-split must be a share in \(0, 1\)")
    refused(lm_cfg(bert_dir, str(data), out, eval_split=0.05, **cfg), DataError,
            r"--eval-split 0.05 holds out no example .*topics.csv: 6 examples")
    refused(lm_cfg(bert_dir, [str(data), str(one)], out, eval_split=0.5, **cfg), DataError,
            rf"{one}: --eval-split 0.5 holds out all its 1 examples")


def test_causal_eval_split_is_said_once(chat_llama_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(10))
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    said = []
    run = load_data(lm_cfg(chat_llama_dir, [chats, qa], tmp_path / "run", eval_split=0.2), say=said.append)
    assert len(run.eval) == 2 + 1  # round(0.2 × 10) and round(0.2 × 6)
    assert [line for line in said if line.startswith("eval data:")] == [
        f"eval data: --eval-split 0.2 of {chats} and {qa}: 3 examples, not trained on"]


def test_a_resumed_run_keeps_its_sources_weights_and_split(chat_llama_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(10))
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    cfg = lm_cfg(chat_llama_dir, [chats, qa], tmp_path / "full", data_weights="0.5,0.5", eval_split=0.2, max_steps=6,
                 save_every=2, dropout=0.1)
    train(cfg, progress=False)

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    part = TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "part")})
    with pytest.raises(KeyboardInterrupt):
        train(part, on_step=stop, progress=False)
    with pytest.raises(ConfigError, match="eval_split: 0.2 -> 0.3"):
        train(command_line_config({"output": str(tmp_path / "part"), "resume": True, "eval_split": 0.3}),
              progress=False)
    # Resumed from the run's own train_config.yaml: the flags name nothing but the run.
    train(command_line_config({"output": str(tmp_path / "part"), "resume": True}), progress=False)
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "part"))
    assert all(first[k].equal(second[k]) for k in first)


def test_one_source_as_a_list_is_the_single_source_run(bert_dir, tmp_path):
    data = tmp_path / "topics.csv"
    topic_table(4).to_csv(data, index=False)
    cfg = dict(task="classify", prompt_column=None, text_column="text", max_steps=2)
    train(lm_cfg(bert_dir, [str(data)], tmp_path / "list", **cfg), progress=False)
    train(lm_cfg(bert_dir, str(data), tmp_path / "str", **cfg), progress=False)
    assert read_config_file(tmp_path / "list" / CONFIG_FILE)["data"] == str(data)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("list", "str"))
    assert all(a[k].equal(b[k]) for k in a)


# ---- --streaming ----

def stream_cfg(model, data, out, **kw) -> TrainConfig:
    return lm_cfg(model, data, out, **{"streaming": True, "max_steps": 6, "save_every": 2, "dropout": 0.1, **kw})


def test_streaming_refusals(chat_llama_dir, bert_dir, tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    out = tmp_path / "run"
    refused(stream_cfg(chat_llama_dir, qa, out, max_steps=None), ConfigError, "--streaming needs --max-steps")
    refused(stream_cfg(chat_llama_dir, qa, out, packing=True), ConfigError, "--packing with --streaming")
    refused(stream_cfg(chat_llama_dir, qa, out, eval_split=0.2), ConfigError, "--eval-split with --streaming")
    refused(stream_cfg(bert_dir, qa, out, task="classify"), ConfigError, "--streaming is for --task causal-lm")


def source_ids(model, tmp_path, *sources) -> list[set]:
    """The examples of each source tokenised whole (not streamed), as sets of input-id tuples."""
    return [{tuple(r["input_ids"]) for r in load_data(lm_cfg(model, source, tmp_path / "x", prompt_column=prompt),
                                                      say=print).train} for source, prompt in sources]


def test_a_stream_resumes_where_it_stopped_in_its_proportions(chat_llama_dir, tmp_path, monkeypatch):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    cfg = stream_cfg(chat_llama_dir, [chats, qa], tmp_path / "full", data_weights="1,3", seed=2)
    seen = trained_rows(monkeypatch)
    train(cfg, progress=False)
    full = list(seen)
    assert len(full) == 6 * 4
    # Each example comes from a source drawn with probability 1:3 by random.Random(seed): the counts follow.
    rng = random.Random(2)
    drawn = Counter(rng.choices([0, 1], weights=[1, 3])[0] for _ in range(24))
    ids = source_ids(chat_llama_dir, tmp_path, (chats, None), (qa, "prompt"))
    assert [sum(r in ids[i] for r in full) for i in (0, 1)] == [drawn[0], drawn[1]]

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "part")}), on_step=stop, progress=False)
    seen.clear()
    train(command_line_config({"output": str(tmp_path / "part"), "resume": True}), progress=False)
    assert seen == full[2 * 4:]  # resumed from the checkpoint of step 2: steps 3..6 see what the whole run saw
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "part"))
    assert all(first[k].equal(second[k]) for k in first)


def test_a_streamed_file_is_not_read_whole(chat_llama_dir, tmp_path, monkeypatch):
    from lorakit.data import streams

    rows = 3 * streams.STREAM_BUFFER
    big = write_jsonl(tmp_path / "big.jsonl", qa_rows(rows))
    read = []
    opened = streams.open_stream
    monkeypatch.setattr(streams, "open_stream", lambda source: opened(source).map(lambda r: read.append(1) or r))
    seen = trained_rows(monkeypatch)
    train(stream_cfg(chat_llama_dir, big, tmp_path / "run", max_steps=3), progress=False)
    assert len(seen) == 3 * 4
    # The rows read: the first row (the format is read from it), the 12 trained on, the shuffle buffer (and the row
    # the buffer reads ahead): far from the file's 3000.
    assert 12 <= len(read) <= 1 + 12 + streams.STREAM_BUFFER + 1 < rows


def test_a_bad_streamed_row_is_named_with_its_source(chat_llama_dir, tmp_path):
    rows = chat_rows(6)
    rows[4]["messages"][1] = {"speaker": "assistant", "text": "fine"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"{bad}: row 5: message 2 is not a role/content pair"):
        train(stream_cfg(chat_llama_dir, bad, tmp_path / "run", prompt_column=None), progress=False)


def test_preference_sources_are_read_each_on_its_own_and_held_out(chat_llama_dir, tmp_path):
    pairs = [{"prompt": f"{QUESTIONS[i % 8]} {i}", "chosen": " fine thanks", "rejected": " sports news"}
             for i in range(10)]
    first = write_jsonl(tmp_path / "a.jsonl", pairs[:6])
    second = write_jsonl(tmp_path / "b.jsonl", pairs[6:])
    cfg = lm_cfg(chat_llama_dir, [first, second], tmp_path / "run", task="dpo", prompt_column=None, eval_split=0.5)
    said = []
    run = load_data(cfg, say=said.append)
    assert len(run.train) == 3 + 2 and len(run.eval) == 3 + 2
    assert f"eval data: --eval-split 0.5 of {first} and {second}: 5 examples, not trained on" in said
    assert {tuple(r["prompt_ids"]) for r in run.train}.isdisjoint({tuple(r["prompt_ids"]) for r in run.eval})
    bad = write_jsonl(tmp_path / "bad.jsonl", [pairs[0], {**pairs[1], "chosen": pairs[1]["rejected"]}])
    refused(TrainConfig(**{**cfg.__dict__, "data": [first, bad], "eval_split": None}), DataError,
            rf"{bad}: row 2")
