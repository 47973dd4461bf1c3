"""Model selection in `lorakit train`: --keep-best saves the adapter of the step with the best eval loss (its
checkpoint's tensors, its eval loss), --early-stopping ends the run, --save-total-limit keeps the newest checkpoints
and the best, and an interrupted run resumed ends with the same best step and adapter."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train import completion_loss

from lorakit.adapters.inject import inject
from lorakit.errors import Interrupted
from lorakit.training import train as train_module
from lorakit.training.rundir import read_log
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train
from lorakit.training.trained import load_trained


@pytest.fixture
def spoil(monkeypatch):
    """spoil(step) -> an on_step hook that, after `step`, adds large noise to every LoRA B of the model being
    trained, so that the evaluations after it are worse than the one at `step`."""
    injected = []
    monkeypatch.setattr(train_module, "inject", lambda model, cfg: injected.append(model) or inject(model, cfg))

    def at(step: int):
        def hook(record):
            if record["step"] == step:
                g = torch.Generator().manual_seed(123)  # not the global RNG: resume restores that one
                for name, p in injected[-1].named_parameters():
                    if "lora_B" in name:
                        p.data.add_(torch.randn(p.shape, generator=g))
        return hook

    return at


def run_cfg(gpt2_dir, qa_jsonl, out, **kw) -> TrainConfig:
    base = dict(model=str(gpt2_dir), task="causal-lm", data=str(qa_jsonl), eval_data=str(qa_jsonl),
                text_column="completion", prompt_column="prompt", output=str(out), batch_size=8, max_length=32,
                lr=2e-2, dropout=0.0, max_steps=12, eval_every=2, save_every=2, log_every=1, keep_best=True)
    return TrainConfig(**{**base, **kw})


def test_keep_best_saves_the_best_steps_adapter_and_early_stopping_ends_the_run(gpt2_dir, qa_jsonl, tmp_path, spoil):
    out = tmp_path / "run"
    metrics = train(run_cfg(gpt2_dir, qa_jsonl, out, early_stopping=2, save_total_limit=1), on_step=spoil(4),
                    progress=False)
    evals = {r["step"]: r["eval"] for r in read_log(out / "log.jsonl") if "eval" in r and r["step"] > 0}
    best = min(evals, key=lambda step: evals[step]["loss"])
    assert list(evals) == [2, 4, 6, 8] and best in (2, 4)  # 6 and 8 after the noise: 2 evaluations, none better
    assert metrics["steps"] == 8 and metrics["early_stopped"] is True
    assert metrics["best_step"] == best and metrics["best_eval"] == metrics["eval"] == evals[best]
    assert metrics["last_eval"] == evals[8] and json.loads((out / "metrics.json").read_text())["best_step"] == best

    # The newest checkpoint and the best are kept; the adapter is the best one's tensors, and has its eval loss.
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-6", f"step-{best}"}
    net, _, _, _ = load_trained(None, str(out))
    state = net.state_dict()
    for step, same in ((best, True), (6, False)):
        tensors = load_file(out / "checkpoints" / f"step-{step}" / "trainable.safetensors")
        assert all(torch.equal(state[k], t) for k, t in tensors.items()) is same, step
    assert completion_loss(out, qa_jsonl, 32) == pytest.approx(evals[best]["loss"], rel=1e-4)


def test_an_interrupted_keep_best_run_resumed_ends_the_same(gpt2_dir, qa_jsonl, tmp_path, spoil):
    whole = train(run_cfg(gpt2_dir, qa_jsonl, tmp_path / "whole", max_steps=8), on_step=spoil(4), progress=False)
    hook = spoil(4)

    def then_ctrl_c(record):
        hook(record)
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = run_cfg(gpt2_dir, qa_jsonl, tmp_path / "parts", max_steps=8)
    with pytest.raises(Interrupted):
        train(cfg, on_step=then_ctrl_c, progress=False)
    parts = train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
    assert whole["best_step"] in (2, 4) and parts["best_step"] == whole["best_step"]
    assert parts["best_eval"] == whole["best_eval"] and parts["early_stopped"] is False
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_alone_leaves_no_checkpoints_behind(gpt2_dir, qa_jsonl, tmp_path, spoil):
    # The help says checkpoints are removed at the end unless --save-total-limit keeps some; --keep-best has already
    # put the best step's adapter in the run directory.
    out = tmp_path / "run"
    metrics = train(run_cfg(gpt2_dir, qa_jsonl, out, max_steps=6), on_step=spoil(2), progress=False)
    assert metrics["best_step"] is not None and not (out / "checkpoints").exists()
    assert (out / "adapter_model.safetensors").exists()
