"""`lorakit.training.train`: the run directory, causal LM, resume (after Ctrl-C and after SIGKILL), NaN stop, refusals of bad
input before training, gradient accumulation, torchrun/DDP, and training under transformers.Trainer."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import topic_table
from safetensors.torch import load_file

from lorakit.data import tables as data
from lorakit.errors import ConfigError, Interrupted, TrainingError
from lorakit.io.models import load_model
from lorakit.training import train as train_module
from lorakit.training.rundir import latest_checkpoint, read_log
from lorakit.training.settings import PACKAGED_MODEL, TrainConfig
from lorakit.training.tasks import CLASSIFY
from lorakit.training.train import train
from lorakit.training.trained import load_trained

REPO = Path(__file__).resolve().parents[1]


def run_cfg(model, data, out, **kw) -> TrainConfig:
    """Small, fast settings for tests."""
    base = dict(model=str(model), data=str(data), output=None if out is None else str(out), batch_size=8,
                max_length=16, lr=5e-3, dropout=0.0, max_steps=6, save_every=2, log_every=1, eval_every=3,
                precision="fp32")  # compared at fp32 tolerances whatever this CPU computes fastest in
    return TrainConfig(**{**base, **kw})


def adapter(out) -> dict:
    return load_file(Path(out) / "adapter_model.safetensors")


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


def test_classify_run_directory(bert_dir, topics_csv, tmp_path):
    out = tmp_path / "run"
    metrics = train(run_cfg(bert_dir, topics_csv, out, eval_data=str(topics_csv)), progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "train_config.yaml", "metrics.json",
            "log.jsonl", "training.png"} <= files
    assert "checkpoints" not in files and not any(f.endswith(".tmp") for f in files)
    assert json.loads((out / "labels.json").read_text()) == ["Business", "Sports", "World"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query", "value"] and config["modules_to_save"] == ["classifier"]
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(bert_dir)
    assert any(k.endswith("classifier.weight") for k in adapter(out))
    log = read_log(out / "log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "tokens_per_s", "epoch"} <= steps[0].keys()
    assert [r["step"] for r in log if "eval" in r] == [0, 3, 6]
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"

    # metrics.json against what it sums up: the log, the adapter file, and predictions made here from the adapter.
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 6 and saved["epochs"] == 0.75  # 6 of the 8 batches of 8 that cover 60 rows
    assert saved["train_loss"] == steps[-1]["loss"]
    assert saved["eval_before"] == log[0]["eval"] and saved["eval"] == log[-1]["eval"] == metrics["eval"]
    assert saved["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert saved["trainable_params"] == sum(t.numel() for t in adapter(out).values())
    assert saved["trainable_share"] == saved["trainable_params"] / saved["total_params"]
    assert saved["seconds"] > 0 and saved["peak_memory_mb"] > 0 and saved["world_size"] == 1
    model, tokenizer, _, labels = load_trained(None, str(out))
    table = pd.read_csv(topics_csv)
    enc = tokenizer(table["text"].tolist(), truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    true = torch.tensor([labels.index(label) for label in table["label"]])
    assert saved["eval"]["accuracy"] == int((pred == true).sum()) / len(table)  # exact: a count over 60
    assert saved["eval"]["macro_f1"] == pytest.approx(macro_f1(pred.tolist(), true.tolist()), abs=1e-12)


def macro_f1(pred: list[int], true: list[int]) -> float:
    """F1 per class from its own counts, averaged over the classes that occur."""
    scores = []
    for c in sorted(set(pred) | set(true)):
        hits = sum(p == t == c for p, t in zip(pred, true))
        precision = hits / max(pred.count(c), 1)
        recall = hits / max(true.count(c), 1)
        scores.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return sum(scores) / len(scores)


def test_minilm_learns_the_topics(tmp_path):
    table = topic_table(30, seed=1)
    table.iloc[:60].to_csv(tmp_path / "train.csv", index=False)
    table.iloc[60:].to_csv(tmp_path / "eval.csv", index=False)
    metrics = train(run_cfg(PACKAGED_MODEL, tmp_path / "train.csv", tmp_path / "run", lr=3e-3, batch_size=12,
                              eval_data=str(tmp_path / "eval.csv"), max_steps=10, eval_every=100), progress=False)
    assert metrics["eval"]["accuracy"] >= 0.9 > metrics["eval_before"]["accuracy"]


@pytest.mark.parametrize("model_fixture", ["gpt2_dir", "llama_dir"])
def test_causal_lm_prompt_completion(model_fixture, qa_jsonl, tmp_path, request):
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "run"
    metrics = train(run_cfg(model, qa_jsonl, out, task="causal-lm", text_column="completion", prompt_column="prompt",
                              eval_data=str(qa_jsonl), max_length=32, lr=2e-2, max_steps=8, eval_every=8),
                      progress=False)
    assert metrics["eval"]["loss"] < metrics["eval_before"]["loss"]
    assert metrics["eval"]["perplexity"] == math.exp(metrics["eval"]["loss"])
    assert metrics["eval"]["loss"] == pytest.approx(completion_loss(out, qa_jsonl, 32), rel=1e-4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not (out / "labels.json").exists()


def completion_loss(run_dir, qa_file, max_length: int) -> float:
    """Cross-entropy per completion token of the trained adapter on `qa_file`, one example at a time."""
    model, tokenizer, _, _ = load_trained(None, str(run_dir))
    table = data.read_table(qa_file)
    rows = data.causal_examples(tokenizer, data.texts(table, ["completion"]), data.texts(table, ["prompt"]), max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            target = torch.tensor(row["labels"][1:])  # token t predicts token t + 1; the prompt's are -100
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def test_causal_lm_plain_text(gpt2_dir, topics_csv, tmp_path):
    metrics = train(run_cfg(gpt2_dir, topics_csv, tmp_path / "run", task="causal-lm", max_steps=2), progress=False)
    assert metrics["steps"] == 2 and metrics["eval"] is None


def test_bf16_autocast_trains(bert_dir, topics_csv, tmp_path):
    metrics = train(run_cfg(bert_dir, topics_csv, tmp_path / "run", precision="bf16", max_steps=2), progress=False)
    assert metrics["steps"] == 2 and all(torch.isfinite(t).all() for t in adapter(tmp_path / "run").values())


def test_grad_accum_matches_the_bigger_batch(bert_dir, topics_csv, tmp_path):
    train(run_cfg(bert_dir, topics_csv, tmp_path / "a", batch_size=4, grad_accum=2, max_steps=3), progress=False)
    train(run_cfg(bert_dir, topics_csv, tmp_path / "b", batch_size=8, max_steps=3), progress=False)
    assert_same(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=1e-5)


# ---- resume ----

@pytest.fixture(scope="module")
def uninterrupted(bert_dir, topics_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(run_cfg(bert_dir, topics_csv, out, dropout=0.1, max_steps=8), progress=False)
    return adapter(out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_ends_identical(bert_dir, topics_csv, tmp_path, uninterrupted,
                                                                        signum):
    # SIGTERM is what a timeout or a preempted cluster job sends: it saves as Ctrl-C does.
    out = tmp_path / "run"
    cfg = run_cfg(bert_dir, topics_csv, out, dropout=0.1, max_steps=8)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN where run in background

    def stop(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted, match="interrupted at step 3 of 8"):
        train(cfg, on_step=stop, progress=False)
    assert latest_checkpoint(out).name == "step-3" and not (out / "adapter_model.safetensors").exists()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers put back as they were
    train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
    assert_same(adapter(out), uninterrupted)
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == list(range(1, 9))


KILLED_RUN = """
import sys, time
from pathlib import Path
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train
cfg = TrainConfig(**{cfg})
def hold(record):
    if record["step"] == 5:  # after the checkpoint of step 4: the test kills us here, mid-run
        Path(sys.argv[1]).write_text("5")
        time.sleep(600)
train(cfg, on_step=hold, progress=False)
"""


def test_sigkill_mid_training_then_resume_ends_identical(bert_dir, topics_csv, tmp_path, uninterrupted):
    out, marker = tmp_path / "run", tmp_path / "at-step-5"
    cfg = run_cfg(bert_dir, topics_csv, out, dropout=0.1, max_steps=8)
    script = KILLED_RUN.replace("{cfg}", repr(cfg.__dict__))
    child = subprocess.Popen([sys.executable, "-c", script, str(marker)], cwd=REPO)
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the training child did not reach step 5"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert latest_checkpoint(out).name == "step-4"
    train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
    assert_same(adapter(out), uninterrupted)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(bert_dir, topics_csv, tmp_path, monkeypatch):
    from lorakit.adapters.inject import inject
    from lorakit.adapters.parts import saved_modules

    out, injected = tmp_path / "run", []
    monkeypatch.setattr(train_module, "inject", lambda model, cfg: injected.append(model) or inject(model, cfg))

    def poison(record):
        if record["step"] == 3:  # the trainable head copy turns NaN, so step 4's loss is NaN
            head = next(iter(saved_modules(injected[0]).values()))
            head.modules_to_save["default"].weight.data.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*last good checkpoint is .*step-2"):
        train(run_cfg(bert_dir, topics_csv, out), on_step=poison, progress=False)
    assert latest_checkpoint(out).name == "step-2"
    assert not (out / "adapter_model.safetensors").exists()


# ---- refusals before training ----

def refused(cfg, match):
    with pytest.raises((ConfigError, data.DataError), match=match):
        train(cfg, progress=False)


def test_bad_input_is_refused_before_training(bert_dir, topics_csv, tmp_path):
    out = tmp_path / "run"
    refused(run_cfg(bert_dir, tmp_path / "missing.csv", out), "data file not found")
    refused(run_cfg(bert_dir, topics_csv, out, text_column="headline"),
            r"no column 'headline'; columns found: text, label")
    (tmp_path / "empty.csv").write_text("text,label\n")
    refused(run_cfg(bert_dir, tmp_path / "empty.csv", out), "has no rows")
    odd = topic_table(2)
    odd.loc[0, "label"] = "Weather"
    odd.to_csv(tmp_path / "odd.csv", index=False)
    refused(run_cfg(bert_dir, topics_csv, out, eval_data=str(tmp_path / "odd.csv")),
            r"labels \['Weather'\] are not in the training label map")
    (tmp_path / "not-a-model").mkdir()
    refused(run_cfg(tmp_path / "not-a-model", topics_csv, out), "not a Hugging Face model directory")
    refused(run_cfg(bert_dir, topics_csv, out, targets="qurey"), r"--targets: 'qurey' matches no module.*query")
    # One entry of two matching nothing is named as well (a typo would else train fewer layers than asked)...
    refused(run_cfg(bert_dir, topics_csv, out, targets="query,valeu"),
            r"--targets: 'valeu' matches no module of this model; its adaptable layers are named .*value")
    # ...unless partial matches are asked for: then the entries that match train.
    partial = tmp_path / "partial"
    train(run_cfg(bert_dir, topics_csv, partial, targets="query,valeu", partial_targets=True, max_steps=1),
          progress=False)
    assert {k.split(".")[-3] for k in adapter(partial) if "lora_A" in k} == {"query"}
    refused(run_cfg(bert_dir, topics_csv, out, resume=True), "no checkpoint")
    refused(run_cfg(bert_dir, topics_csv, out, lr=-1.0), "lr must be > 0")
    assert not out.exists(), "a refused run must write nothing"


def test_output_holding_another_run_is_refused(bert_dir, topics_csv, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(bert_dir, topics_csv, out, max_steps=1), progress=False)
    refused(run_cfg(bert_dir, topics_csv, out, max_steps=1), "holds another run; pass --resume .* or --overwrite")
    train(run_cfg(bert_dir, topics_csv, out, max_steps=2, overwrite=True), progress=False)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_default_output_is_a_fresh_run_dir(bert_dir, topics_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        train(run_cfg(bert_dir, topics_csv, None, max_steps=1), progress=False)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "adapter_model.safetensors").exists() for r in runs)


# ---- distributed ----

def test_torchrun_as_documented_two_processes_match_one_with_double_batch(bert_dir, topics_csv, tmp_path):
    # README's line shape, `torchrun --nproc_per_node=N -m lorakit -- train ...`, with --r among the flags.
    common = ["--model", str(bert_dir), "--data", str(topics_csv), "--r", "4", "--max-steps", "4", "--max-length", "16",
              "--dropout", "0", "--lr", "5e-3", "--save-every", "2", "--log-every", "1", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "-m", "lorakit", "--", "train"]
    subprocess.run(torchrun + [*common, "--batch-size", "4", "--output", str(tmp_path / "ddp")],
                   check=True, cwd=REPO, env=env, timeout=300)
    train(run_cfg(bert_dir, topics_csv, tmp_path / "one", r=4, batch_size=8, max_steps=4), progress=False)
    assert_same(adapter(tmp_path / "ddp"), adapter(tmp_path / "one"), atol=1e-5)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert json.loads((tmp_path / "ddp" / "adapter_config.json").read_text())["r"] == 4


def test_every_train_flag_reaches_lorakit_through_torchrun():
    from torch.distributed.run import get_args_parser
    from typer.main import get_command

    from lorakit.cli.main import app

    flags = [opt for p in get_command(app).commands["train"].params for opt in p.opts if opt.startswith("--")]
    args = ["train", *[x for flag in flags for x in (flag, "1")]]  # torchrun passes values through unread
    parsed = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "lorakit", "--", *args])
    assert parsed.module and parsed.training_script == "lorakit" and parsed.training_script_args == args
    with pytest.raises(SystemExit):  # without the `--`, torchrun reads --r as an abbreviation of its own options
        get_args_parser().parse_args(["--nproc_per_node=2", "-m", "lorakit", "train", "--r", "8"])


# ---- transformers.Trainer ----

def test_injected_model_trains_under_transformers_trainer(bert_dir, topics_csv, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    import lorakit

    model, tok = load_model(str(bert_dir), CLASSIFY, ["Business", "Sports", "World"])
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]))
    df = pd.read_csv(topics_csv)
    rows = data.classification_examples(tok, df["text"].tolist(), data.encode_labels(df["label"], ["Business", "Sports", "World"], "t"), 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=rows, data_collator=data.label_collator(tok)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# ---- on a GPU (run where one is lent: benchmarks/gpu.sh runs `pytest -k cuda`) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_cuda_computes_in_bf16_and_fp32_matches_the_cpu(llama_dir, qa_jsonl, tmp_path, monkeypatch):
    """A QLoRA run on CUDA: the default precision computes in bf16 there, the base is NF4, the trained adapter
    loads back on CUDA with the eval loss of training; in fp32 the CUDA run trains the CPU run's adapter."""
    kw = dict(task="causal-lm", text_column="completion", prompt_column="prompt", eval_data=str(qa_jsonl),
              max_length=32, lr=2e-2, max_steps=4, eval_every=4, quantize="nf4", gradient_checkpointing=True)
    metrics = train(run_cfg(llama_dir, qa_jsonl, tmp_path / "bf16", **kw), progress=False)
    assert metrics["device"].startswith("cuda") and metrics["compute_dtype"] == "bf16" and "nf4" in metrics["weights"]
    assert math.isfinite(metrics["eval"]["loss"]) and metrics["eval"]["loss"] < metrics["eval_before"]["loss"]
    model, *_ = load_trained(None, str(tmp_path / "bf16"))
    assert next(model.parameters()).device.type == "cuda"

    cuda = train(run_cfg(llama_dir, qa_jsonl, tmp_path / "cuda", precision="fp32", **kw), progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = train(run_cfg(llama_dir, qa_jsonl, tmp_path / "cpu", precision="fp32", **kw), progress=False)
    assert cpu["device"] == "cpu" and cuda["compute_dtype"] == cpu["compute_dtype"] == "fp32"
    assert cuda["eval"]["loss"] == pytest.approx(cpu["eval"]["loss"], rel=1e-4)
    # Mean, not max: Adam's first steps move a weight whose gradient is within rounding of 0 by about ±lr either way.
    a, b = adapter(tmp_path / "cuda"), adapter(tmp_path / "cpu")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().mean() < 1e-4 for k in a)


def test_empty_texts_are_counted_and_named_by_row(bert_dir, tmp_path):
    table = topic_table(4)
    table.loc[[1, 6], "text"] = ""
    table.to_csv(tmp_path / "gaps.csv", index=False)
    said = []
    train(run_cfg(bert_dir, tmp_path / "gaps.csv", tmp_path / "run", max_steps=1), echo=said.append, progress=False)
    assert f"{tmp_path / 'gaps.csv'}: 2 of 12 rows have an empty text (row(s) 2, 7)" in said
