"""The `lorakit` command line: help everywhere, train -> info -> eval -> predict -> merge on a tiny BERT and a tiny
GPT-2, the merged export giving the adapter's results, YAML config with flags winning, and clean error messages."""

import json

import pandas as pd
import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.training.settings import saved_settings
from lorakit.training.trained import load_trained

runner = CliRunner()
FAST = ["--max-length", "16", "--batch-size", "8", "--log-every", "1", "--dropout", "0", "--precision", "fp32"]


def ok(*args: str) -> str:
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["train", "eval", "predict", "chat", "merge", "info", "serve", "export"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})  # wide: no flag name cut short
    assert result.exit_code == 0, result.output
    text, spec = result.output, get_command(app).commands[command]
    assert f"Usage: root {command} [OPTIONS]" in text
    assert " ".join(spec.help.split())[:60] in " ".join(text.split())  # the command's docstring, rewrapped
    missing = [o for p in spec.params if not p.hidden for o in p.opts + p.secondary_opts
               if o.startswith("--") and o not in text]
    assert not missing, f"{command} --help does not list {missing}"


def test_every_boolean_flag_has_its_no_form_and_no_value_in_help():
    group = get_command(app)  # typer's own click: options found by what they are, not by class
    flags = [(name, p) for name, command in group.commands.items() for p in command.params
             if getattr(p, "is_bool_flag", False) and not p.hidden and p.name != "help"]
    flags += [("lorakit", p) for p in group.params if getattr(p, "is_bool_flag", False)]  # --verbose
    assert {(name, p.opts[0]) for name, p in flags} >= {("predict", "--stream"), ("predict", "--json"),
                                                         ("eval", "--json"), ("merge", "--overwrite"),
                                                         ("export", "--ollama"), ("lorakit", "--verbose")}
    assert [(name, p.opts[0]) for name, p in flags if p.secondary_opts != [f"--no-{p.opts[0][2:]}"]] == []
    text = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "250"}).output
    assert "--stream" in text and "--no-json" in text and "<bool>" not in text.split("--json")[1].split("\n")[0]
    assert runner.invoke(app, ["predict", "--no-stream", "--no-json", "--help"]).exit_code == 0


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
    lines = dict(line.split(":", 1) for line in ok("info", classify_run).splitlines())
    shown = {key: value.strip() for key, value in lines.items()}
    assert shown["r"] == "8" and shown["alpha"] == "16" and shown["targets"] == "query, value"
    assert shown["labels"] == "Business, Sports, World" and shown["base_model"] == str(bert_dir)
    assert shown["file_bytes"].startswith(f"{info['file_bytes']:,} bytes")


def test_eval_base_adapter_and_merged_export(classify_run, bert_dir, topics_csv, tmp_path):
    tuned = json.loads(ok("eval", "--adapter", classify_run, "--data", topics_csv, "--max-length", "16",
                          "--precision", "fp32", "--json"))
    metrics = json.loads((classify_run / "metrics.json").read_text())
    assert tuned["accuracy"] == metrics["eval"]["accuracy"] and tuned["examples"] == 60
    assert tuned["macro_f1"] == metrics["eval"]["macro_f1"]
    assert tuned["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)
    # accuracy is the share of right answers, exactly: count them from `predict` here
    predicted = [json.loads(line)["label"] for line in
                 ok("predict", "--adapter", classify_run, "--data", topics_csv, "--json").splitlines()]
    right = sum(p == t for p, t in zip(predicted, pd.read_csv(topics_csv)["label"]))
    assert len(predicted) == 60 and tuned["accuracy"] == right / 60

    # The base model, its head seeded here: the CLI's metrics are those of the model loaded directly.
    torch.manual_seed(0)
    base = json.loads(ok("eval", "--model", bert_dir, "--task", "classify", "--data", topics_csv, "--precision", "fp32",
                         "--json"))
    torch.manual_seed(0)
    labels = ["Business", "Sports", "World"]  # the eval data's labels, sorted: the base model has none
    direct, tok, _, _ = load_trained(str(bert_dir), None, "classify", labels)
    table = pd.read_csv(topics_csv)
    with torch.no_grad():
        logits = direct(**tok(table["text"].tolist(), padding=True, return_tensors="pt")).logits
    true = torch.tensor([labels.index(label) for label in table["label"]])
    assert base["accuracy"] == int((logits.argmax(-1) == true).sum()) / 60
    assert base["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, true).item(), rel=1e-5)

    ok("merge", "--adapter", classify_run, "--output", tmp_path / "merged")
    merged = json.loads(ok("eval", "--model", tmp_path / "merged", "--data", topics_csv, "--max-length", "16",
                           "--precision", "fp32", "--json"))
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
    model, tokenizer, _, _ = load_trained(None, str(out))
    enc = tokenizer("striker coach", return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ids.shape[1] > enc["input_ids"].shape[1]  # it generated something
    expected = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated == {"text": "striker coach", "generation": expected}


def test_yaml_config_with_flags_winning(bert_dir, topics_csv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bert_dir}\ndata: {topics_csv}\nmax-steps: 5\nr: 4\nlr: 0.005\nmax_length: 16\n")
    ok("train", "--config", config, "--max-steps", "2", "--output", tmp_path / "run")
    saved = saved_settings(tmp_path / "run")
    assert saved.r == 4 and saved.max_steps == 2 and saved.max_length == 16 and saved.lr == 0.005
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_qlora_rslora_and_lora_plus_flags(bert_dir, topics_csv, tmp_path):
    ok("train", "--model", bert_dir, "--data", topics_csv, "--max-steps", "2", "--quantize", "nf4", "--rslora",
       "--lr-ratio", "16", "--output", tmp_path / "run", *FAST)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lorakit_quantize"] == "nf4"
    info = json.loads(ok("info", tmp_path / "run", "--json"))  # what the file says, shown by lorakit info
    assert info["scale"] == "alpha/sqrt(r) (rsLoRA)" and info["quantize"] == "nf4" and info["variant"] == "LoRA"
    assert saved_settings(tmp_path / "run").lr_ratio == 16


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


def test_third_party_log_noise_stays_off_the_output_unless_verbose(classify_run, caplog):
    # bitsandbytes (imported by PEFT when transformers builds a scheduler) warns on every run on some CPUs that it
    # cannot fetch an optional kernel; lorakit's own lines are all a user should see, --verbose shows the rest.
    import logging

    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    try:
        for flags, shown in (([], False), (["--verbose"], True)):
            ok(*flags, "info", classify_run)
            caplog.clear()
            noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
            assert any("kernels-community" in r.getMessage() for r in caplog.records) is shown
    finally:
        logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)


def test_max_length_past_the_models_positions_is_capped_not_an_index_error(classify_run, bert_dir, gpt2_dir, qa_jsonl,
                                                                          tmp_path):
    # The tiny BERT and GPT-2 have 128 positions: a 400-word text at --max-length 1000 would index past them.
    long_text = " ".join(["shares profit merger"] * 140)
    pd.DataFrame({"text": [long_text, "coach league medal"], "label": ["Business", "Sports"]}).to_csv(
        tmp_path / "long.csv", index=False)
    result = runner.invoke(app, ["eval", "--adapter", str(classify_run), "--data", str(tmp_path / "long.csv"),
                                 "--max-length", "1000", "--json", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "--max-length 1000 is more than the model's 128 positions" in result.output
    assert json.loads(result.output[result.output.index("{"):])["examples"] == 2
    assert "Business" in ok("predict", "--adapter", classify_run, "--max-length", "1000", long_text)
    said = ok("train", "--model", gpt2_dir, "--task", "causal-lm", "--data", qa_jsonl, "--text-column", "completion",
              "--prompt-column", "prompt", "--max-steps", "1", "--output", tmp_path / "run", *FAST, "--max-length", "200")
    assert "--max-length 200 is more than the model's 128 positions: inputs are cut to 128 tokens" in said
    assert saved_settings(tmp_path / "run").max_length == 128


def test_a_run_finds_its_base_model_from_any_directory_and_says_when_it_is_gone(bert_dir, topics_csv, tmp_path,
                                                                                 monkeypatch):
    import shutil

    base = tmp_path / "models" / "tiny-bert"
    shutil.copytree(bert_dir, base)
    monkeypatch.chdir(tmp_path / "models")
    ok("train", "--model", "./tiny-bert", "--data", topics_csv, "--max-steps", "1", "--output", tmp_path / "run", *FAST)
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    monkeypatch.chdir(tmp_path)  # elsewhere: the stored path still leads to the base model
    assert "World" in ok("predict", "--adapter", tmp_path / "run", "--json", "summit treaty")
    shutil.rmtree(base)
    result = runner.invoke(app, ["predict", "--adapter", str(tmp_path / "run"), "summit treaty"])
    assert result.exit_code == 1 and f"was trained on {base}, which cannot be loaded here" in result.output
    assert "pass --model" in result.output


def test_every_command_help_ends_with_examples_whose_flags_exist():
    import re

    from lorakit.cli.examples import EXAMPLES

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert commands == set(EXAMPLES)  # every command has examples, and every table row is a command
    group = get_command(app)
    for command, lines in EXAMPLES.items():
        assert "Examples:" in runner.invoke(app, [command, "--help"]).output and 2 <= len(lines) <= 4, command
        flags = {o for p in group.commands[command].params for o in (*p.opts, *p.secondary_opts)}
        for line in lines:
            assert line.startswith(f"lorakit {command} "), line
            for flag in re.findall(r"\s(--[a-z][a-z-]*)", line.split("#")[0]):
                assert flag in flags, (command, flag)
