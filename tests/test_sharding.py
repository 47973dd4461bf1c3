"""Sharded training with FSDP2 (`--sharding fsdp`), on CPU with gloo under torchrun: 2 processes × batch B give the
adapter of DDP with 2 × B and of one process with 2B (also with all-linear, DoRA, an NF4 base, gradient
checkpointing, accumulation, tied embeddings, no blocks); the frozen weights are sharded; a checkpoint resumes to
the uninterrupted adapter, also in one process; 3 processes with sizes that nothing divides; `lorakit train
--sharding fsdp` as README shows it, its adapter loaded by PEFT; --keep-best restoring an earlier step; refusals
before any work.

The cases themselves are in sharding_cases.py: one torchrun per process count runs them all, and each test checks
its own case against a reference trained here, in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sharding_cases import build, run_case

from lorakit.errors import ConfigError
from lorakit.runtime.distributed import World
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train

REPO = Path(__file__).resolve().parents[1]
CASES = Path(__file__).with_name("sharding_cases.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
B, STEPS = 2, 3  # per process, in every 2-process case
# Sharded and one-process runs sum gradients in another order; AdamW turns that float noise, on elements whose
# gradient nearly cancels, into steps of up to lr. Measured: 3e-5 (2 processes, all-linear) and 9e-5 (3 processes,
# odd sizes) on CPUs with AVX-512, under 2e-5 elsewhere. A real defect (a shard not stepping, the wrong rows) moves
# the adapter by about as much as training does (> 1e-2, checked below).
FP32_REDUCTION_NOISE = 2e-4


def torchrun(n: int, *args: str) -> str:
    """Run torchrun with `n` CPU processes; returns its stderr (warnings), failing with it shown."""
    done = subprocess.run([TORCHRUN, f"--nproc_per_node={n}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def case(name: str, **kw) -> dict:
    return {"name": name, "mode": "fsdp", "batch": B, "steps": STEPS, **kw}


VARIANTS = {"lora": {}, "all-linear": dict(targets="all-linear"), "dora": dict(dora=True), "lora-bias": dict(lora_bias=True),
            "nf4": dict(quantize="nf4", targets="all-linear"), "checkpointing": dict(checkpointing="non-reentrant"),
            "checkpointing-reentrant": dict(checkpointing="reentrant"), "accumulation": dict(accum=2),
            "tied": dict(tie=True), "no-blocks": dict(no_blocks=True)}
TWO = [case(n, **kw) for n, kw in VARIANTS.items()] + [
    case("ddp", mode="ddp"), case("bf16", precision="bf16"), case("first", steps=2, save=True)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every 2-process case (and a resume from `first`'s checkpoint, after it) in one torchrun: (dir, report, stderr)."""
    out = tmp_path_factory.mktemp("two")
    cases = TWO + [case("resumed", resume=str(out / "first" / "checkpoints" / "step-2"))]
    stderr = torchrun(2, str(CASES), str(out), json.dumps(cases))
    return out, json.loads((out / "report.json").read_text()), stderr


def adapter(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def one_process(tmp_path: Path, **kw) -> dict:
    """The reference: the same case in this process with the global batch (2B), or `batch` given."""
    spec = {**case("one", mode="one", batch=2 * B), **kw}
    run_case(spec, World(), tmp_path)
    return adapter(tmp_path / spec["name"])


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fsdp_two_processes_train_the_adapter_of_one_process_with_double_batch(two, name, tmp_path):
    out, report, _ = two
    sharded, reference = adapter(out / name), one_process(tmp_path, **VARIANTS[name])
    assert largest_difference(sharded, reference) < FP32_REDUCTION_NOISE
    untrained = one_process(tmp_path, name="untrained", steps=0, **VARIANTS[name])
    assert largest_difference(reference, untrained) > 1e-2  # the steps did train: the comparison can fail
    assert report[name]["frozen_share"] == pytest.approx(0.5, abs=0.01)  # each process holds half the frozen base


def test_fsdp_equals_ddp_and_only_fsdp_shards_the_frozen_weights(two):
    out, report, _ = two
    assert largest_difference(adapter(out / "lora"), adapter(out / "ddp")) < 1e-7
    assert report["ddp"]["frozen_share"] == 1.0 and report["lora"]["frozen_share"] == 0.5
    assert report["lora"]["full_tensors_alive"] == 0 and report["nf4"]["full_tensors_alive"] == 0  # freed once sharded
    assert report["ddp"]["full_tensors_alive"] > 0


def test_tied_embeddings_stay_tied_and_no_blocks_warns(two):
    _, report, stderr = two
    assert report["tied"]["tied"]  # wrapped as separate units they would have come apart
    assert "has no transformer blocks to shard one by one" in stderr


def test_bf16_mixed_precision_computes_in_bf16_and_trains(two, tmp_path):
    out, report, _ = two
    assert report["bf16"]["forward_dtype"] == "torch.bfloat16" and report["lora"]["forward_dtype"] == "torch.float32"
    sharded, reference = adapter(out / "bf16"), one_process(tmp_path, precision="bf16")
    untrained = one_process(tmp_path, name="untrained", steps=0)
    relative = lambda a, b: max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)  # noqa: E731
    # bf16 rounding moves a 3-step tiny run by ~15% whichever way it runs; training moves it by ~120%
    assert relative(sharded, reference) < 0.3 < 1.0 < relative(reference, untrained)


def test_checkpoint_of_a_sharded_run_resumes_to_the_uninterrupted_adapter_sharded_or_in_one_process(two, tmp_path):
    out, _, _ = two
    checkpoint = out / "first" / "checkpoints" / "step-2"
    assert largest_difference(adapter(out / "resumed"), adapter(out / "lora")) < 1e-6
    # whole tensors, as one process saves them: the same file resumes unsharded, to the one-process adapter
    assert {k: v.shape for k, v in load_file(checkpoint / "trainable.safetensors").items()} == {
        n: p.shape for n, p in build(case("shapes")).named_parameters() if p.requires_grad}
    resumed = one_process(tmp_path, name="resumed-one", resume=str(checkpoint))
    assert largest_difference(resumed, one_process(tmp_path)) < 2e-5


def test_three_processes_with_sizes_nothing_divides(tmp_path):
    odd = dict(dims="odd", targets="all-linear")
    torchrun(3, str(CASES), str(tmp_path), json.dumps([case("odd", **odd)]))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["odd"]["frozen_share"] < 0.4  # about a third, padding included
    assert largest_difference(adapter(tmp_path / "odd"), one_process(tmp_path, batch=3 * B, **odd)) < FP32_REDUCTION_NOISE


# ---- lorakit train --sharding fsdp ----

def cli_flags(bert_dir, topics_csv) -> list[str]:
    return ["--model", str(bert_dir), "--data", str(topics_csv), "--eval-data", str(topics_csv), "--r", "4",
            "--max-steps", "4", "--max-length", "16", "--dropout", "0", "--lr", "5e-3", "--save-every", "2",
            "--log-every", "1", "--eval-every", "2", "--batch-size", "4", "--precision", "fp32"]


@pytest.fixture(scope="module")
def mislabelled_csv(topics_csv, tmp_path_factory) -> Path:
    """The topics with every label swapped for another: training makes its eval loss worse, so that --keep-best keeps
    an earlier step than the last."""
    table = pd.read_csv(topics_csv)
    table["label"] = table["label"].map({"World": "Sports", "Sports": "Business", "Business": "World"})
    path = tmp_path_factory.mktemp("data") / "mislabelled.csv"
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def sharded_keep_best(bert_dir, topics_csv, mislabelled_csv, tmp_path_factory) -> Path:
    """--sharding fsdp with --keep-best --save-total-limit 2, evaluated on mislabelled data, 4 steps."""
    out = tmp_path_factory.mktemp("cli") / "fsdp-best"
    flags = cli_flags(bert_dir, topics_csv)
    flags[flags.index("--eval-data") + 1] = str(mislabelled_csv)
    flags[flags.index("--lr") + 1] = "5e-2"  # steps that move the eval loss well past float noise
    torchrun(2, "-m", "lorakit", "--", "train", *flags, "--eval-every", "1", "--sharding", "fsdp", "--keep-best",
             "--save-total-limit", "2", "--output", str(out))
    return out


@pytest.fixture(scope="module")
def sharded_run(bert_dir, topics_csv, tmp_path_factory) -> Path:
    """README's line: `torchrun --nproc_per_node=2 -m lorakit -- train --sharding fsdp ...`, 4 steps."""
    out = tmp_path_factory.mktemp("cli") / "fsdp"
    torchrun(2, "-m", "lorakit", "--", "train", *cli_flags(bert_dir, topics_csv), "--sharding", "fsdp",
             "--output", str(out))
    return out


def test_lorakit_train_sharded_matches_one_process_and_its_adapter_loads_in_peft(sharded_run, bert_dir, topics_csv,
                                                                                tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from lorakit.training.trained import load_trained

    one = TrainConfig(model=str(bert_dir), data=str(topics_csv), eval_data=str(topics_csv), r=4, max_steps=4,
                      max_length=16, dropout=0.0, lr=5e-3, save_every=2, log_every=1, eval_every=2, batch_size=8,
                      precision="fp32", output=str(tmp_path / "one"))
    metrics = train(one, progress=False, echo=lambda *a: None)
    assert largest_difference(adapter(sharded_run), adapter(tmp_path / "one")) < 1e-5
    sharded_metrics = json.loads((sharded_run / "metrics.json").read_text())
    assert sharded_metrics["eval"]["loss"] == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert sharded_metrics["trainable_params"] == metrics["trainable_params"]

    ours, tokenizer, _, _ = load_trained(str(bert_dir), str(sharded_run))
    base = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=3)
    theirs = peft.PeftModel.from_pretrained(base, str(sharded_run)).eval()
    batch = tokenizer(["shares profit merger news today", "coach league medal news today"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-6)


INTERRUPTED = """
import os, signal, sys
from lorakit.cli.main import app
def ctrl_c(record):
    if record["step"] == 3 and os.environ["RANK"] == "1":  # one process is enough: all stop at the same step
        os.kill(os.getpid(), signal.SIGINT)
import lorakit.cli.main, lorakit.training.train
real = lorakit.training.train.train
lorakit.cli.main.run_training = lambda cfg, echo: real(cfg, on_step=ctrl_c, echo=echo)
app(sys.argv[1:])
"""


def test_lorakit_train_sharded_resume_ends_with_the_uninterrupted_adapter(sharded_run, bert_dir, topics_csv, tmp_path):
    out, script = tmp_path / "run", tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    with pytest.raises(AssertionError, match="interrupted at step 3 of 4"):  # exit 130, as after Ctrl-C
        torchrun(2, str(script), "--", "train", *cli_flags(bert_dir, topics_csv), "--sharding", "fsdp", "--output", str(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    torchrun(2, "-m", "lorakit", "--", "train", "--output", str(out), "--resume")  # the saved settings: sharded
    assert largest_difference(adapter(out), adapter(sharded_run)) < 1e-7


# ---- refusals ----

def test_sharding_without_torchrun_is_refused_before_any_work(topics_csv, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cfg = TrainConfig(data=str(topics_csv), sharding="fsdp", output=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node=N -m lorakit -- train --sharding fsdp .*"
                                          r"not set here: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="sharding must be one of"):
        train(TrainConfig(data=str(topics_csv), sharding="zero3"), progress=False)


def test_sharding_on_a_torch_without_fsdp2_is_refused_before_any_work(topics_csv, tmp_path, monkeypatch):
    import torch.distributed.fsdp

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")  # as in torch < 2.6
    cfg = TrainConfig(data=str(topics_csv), sharding="fsdp", output=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"needs FSDP2 .* from torch 2.6; this is torch "):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_sharding_is_a_setting_a_resumed_run_may_change():
    from lorakit.training.settings import check_resumable

    check_resumable(TrainConfig(output="run", sharding="none"), TrainConfig(sharding="fsdp"))
    with pytest.raises(ConfigError, match="r: 8 -> 4"):
        check_resumable(TrainConfig(output="run", r=4), TrainConfig(sharding="fsdp"))


def test_keep_best_under_fsdp_restores_the_best_step_on_every_process(sharded_keep_best, bert_dir, mislabelled_csv,
                                                                       topics_csv, tmp_path):
    one = TrainConfig(model=str(bert_dir), data=str(topics_csv), eval_data=str(mislabelled_csv), r=4, max_steps=4,
                      max_length=16, dropout=0.0, lr=5e-2, save_every=2, log_every=1, eval_every=1, batch_size=8,
                      keep_best=True, save_total_limit=2, precision="fp32", output=str(tmp_path / "one"))
    metrics = train(one, progress=False, echo=lambda *a: None)
    sharded = json.loads((sharded_keep_best / "metrics.json").read_text())
    assert metrics["best_step"] < 4 and sharded["best_step"] == metrics["best_step"]  # an earlier step was restored
    assert sharded["eval"]["loss"] == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert largest_difference(adapter(sharded_keep_best), adapter(tmp_path / "one")) < 1e-5
    # The adapter saved is the best step's: evaluated afresh, it gives that step's loss, not the last step's.
    from typer.testing import CliRunner

    from lorakit.cli.main import app

    done = CliRunner().invoke(app, ["eval", "--adapter", str(sharded_keep_best), "--data", str(mislabelled_csv),
                                    "--max-length", "16", "--precision", "fp32", "--json"])
    assert done.exit_code == 0, done.output
    loss = json.loads(done.output[done.output.index("{"):])["loss"]
    assert loss == pytest.approx(sharded["best_eval"]["loss"], abs=1e-5)
    assert abs(loss - sharded["last_eval"]["loss"]) > 1e-3
    kept = sorted(p.name for p in (sharded_keep_best / "checkpoints").iterdir())
    assert f"step-{sharded['best_step']}" in kept and len(kept) <= 3  # the newest 2 and the best
