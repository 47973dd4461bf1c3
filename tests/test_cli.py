"""The `lorakit` command line: help everywhere, train -> info -> eval -> predict -> merge on a tiny BERT and a tiny
GPT-2, the merged export giving the adapter's results, YAML config with flags winning, and clean error messages."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.models import load_trained
from lorakit.settings import CONFIG_FILE, read_config_file

runner = CliRunner()
FAST = ["--max-length", "16", "--batch-size", "8", "--log-every", "1", "--dropout", "0"]


def ok(*args: str) -> str:
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "info"])
def test_every_command_has_help(command):
    assert "--help" in ok(command, "--help") or "Usage" in ok(command, "--help")


@pytest.fixture(scope="module")
def classify_run(bert_dir, topics_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    ok("train", "--model", bert_dir, "--data", topics_csv, "--eval-data", topics_csv, "--max-steps", "6",
       "--lr", "5e-3", "--output", out, *FAST)
    return out


def test_info_shows_the_adapter(classify_run, bert_dir):
    info = json.loads(ok("info", classify_run, "--json"))
    assert info["r"] == 8 and info["alpha"] == 16 and info["targets"] == ["query", "value"]
    assert info["task"] == "SEQ_CLS" and info["base_model"] == str(bert_dir)
    assert info["labels"] == ["Business", "Sports", "World"] and info["modules_to_save"] == ["classifier"]
    assert info["trainable_params"] > 0 and info["file_bytes"] == (classify_run / "adapter_model.safetensors").stat().st_size
    assert "rank" in ok("info", classify_run).lower() or "r:" in ok("info", classify_run)


def test_eval_base_adapter_and_merged_export(classify_run, bert_dir, topics_csv, tmp_path):
    tuned = json.loads(ok("eval", "--adapter", classify_run, "--data", topics_csv, "--max-length", "16", "--json"))
    metrics = json.loads((classify_run / "metrics.json").read_text())
    assert tuned["accuracy"] == pytest.approx(metrics["eval"]["accuracy"]) and tuned["examples"] == 60
    assert {"accuracy", "macro_f1", "loss"} <= tuned.keys()
    base = json.loads(ok("eval", "--model", bert_dir, "--task", "classify", "--data", topics_csv, "--json"))
    assert 0 <= base["accuracy"] <= 1
    ok("merge", "--adapter", classify_run, "--output", tmp_path / "merged")
    merged = json.loads(ok("eval", "--model", tmp_path / "merged", "--data", topics_csv, "--max-length", "16",
                           "--json"))
    assert merged["accuracy"] == tuned["accuracy"] and merged["loss"] == pytest.approx(tuned["loss"], abs=1e-5)

    # The export is a plain transformers model with the adapter's outputs.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.id2label == {0: "Business", 1: "Sports", 2: "World"}
    adapted, tok, _, _ = load_trained(None, str(classify_run))
    enc = AutoTokenizer.from_pretrained(tmp_path / "merged")(["shares profit merger"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, adapted(**enc).logits, atol=1e-5, rtol=1e-4)
    assert "not empty" in runner.invoke(app, ["merge", "--adapter", str(classify_run), "--output",
                                              str(tmp_path / "merged")]).output
    (tmp_path / "file").write_text("x")
    assert "is a file" in runner.invoke(app, ["merge", "--adapter", str(classify_run), "--output",
                                              str(tmp_path / "file")]).output


def test_predict_gives_labels_with_probabilities(classify_run):
    lines = ok("predict", "--adapter", classify_run, "--json", "shares profit merger news", "striker coach league").splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["text"] for r in results] == ["shares profit merger news", "striker coach league"]
    for r in results:
        assert r["label"] in ("Business", "Sports", "World")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_causal_lm_train_eval_predict(gpt2_dir, qa_jsonl, tmp_path):
    out = tmp_path / "run"
    ok("train", "--model", gpt2_dir, "--task", "causal-lm", "--data", qa_jsonl, "--text-column", "completion",
       "--prompt-column", "prompt", "--max-steps", "3", "--output", out, *FAST)
    result = json.loads(ok("eval", "--adapter", out, "--data", qa_jsonl, "--text-column", "completion",
                           "--prompt-column", "prompt", "--json"))
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-4)
    generated = json.loads(ok("predict", "--adapter", out, "--max-new-tokens", "4", "--json", "striker coach"))
    assert generated["text"] == "striker coach" and isinstance(generated["generation"], str)


def test_yaml_config_with_flags_winning(bert_dir, topics_csv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bert_dir}\ndata: {topics_csv}\nmax-steps: 5\nr: 4\nlr: 0.005\nmax_length: 16\n")
    ok("train", "--config", config, "--max-steps", "2", "--output", tmp_path / "run")
    saved = read_config_file(tmp_path / "run" / CONFIG_FILE)
    assert saved["r"] == 4 and saved["max_steps"] == 2 and saved["max_length"] == 16
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_qlora_rslora_and_lora_plus_flags(bert_dir, topics_csv, tmp_path):
    ok("train", "--model", bert_dir, "--data", topics_csv, "--max-steps", "2", "--quantize", "nf4", "--rslora",
       "--lr-ratio", "16", "--output", tmp_path / "run", *FAST)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lorakit_quantize"] == "nf4"
    assert read_config_file(tmp_path / "run" / CONFIG_FILE)["lr_ratio"] == 16


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.csv"], "data file not found: missing.csv"),
    (["--scheduler", "steep"], "scheduler must be one of"),
    (["--quantize", "int3"], "quantize must be one of"),
    (["--resume"], "--resume needs --output"),
])
def test_bad_input_is_a_clean_error(args, message, bert_dir, topics_csv, tmp_path):
    base = ["train", "--model", str(bert_dir), "--data", str(topics_csv), "--output", str(tmp_path / "run")]
    if "--resume" in args:
        base = base[:-2]
    result = runner.invoke(app, base + args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
