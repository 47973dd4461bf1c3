"""Preference tuning under torchrun, 2 CPU processes with gloo: DDP (DPO and KTO) and FSDP (DPO) with batch B per
process train the adapter of one process with batch 2B, and log the metrics of the global batch (rewards, margins,
accuracies, log-probabilities and KTO's KL over all its pairs, not one process's). KTO pairs each prompt with the
completion before it in the global batch and estimates its KL term over the global batch, so its run does not
depend on the number of processes either."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.training.rundir import read_log

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
B, STEPS = 2, 3  # per process
# As in test_sharding.py: sums over processes add in another order than one process's, and AdamW turns that float
# noise into steps of up to lr on elements whose gradient nearly cancels; a real defect (the wrong rows, a
# process's own KL) moves the adapter by about as much as training does (checked below).
FP32_REDUCTION_NOISE = 2e-4
MORE_PAIRS = [{"prompt": "hello there how are", "chosen": " you fine thanks", "rejected": " sports news"},
              {"prompt": "what is the topic", "chosen": " world news", "rejected": " fine thanks what"},
              {"prompt": "be brief", "chosen": " answer", "rejected": " question there is the topic"},
              {"prompt": "sports", "chosen": " news", "rejected": " hello"},
              {"prompt": "how are you", "chosen": " fine", "rejected": " what topic"}]
# Mostly desirable rows: the policy then likes the mismatched pairs better than the reference does, and KTO's KL
# estimate is positive from step 2 (with as many undesirable rows it is negative, clamped to 0, and takes no part).
MORE_ROWS = [{"prompt": "hello there how are", "completion": " you fine thanks", "label": True},
             {"prompt": "what is the topic", "completion": " fine thanks what", "label": True},
             {"prompt": "be brief", "completion": " answer", "label": True},
             {"prompt": "how are you", "completion": " sports world news", "label": False},
             {"prompt": "sports", "completion": " world news", "label": True},
             {"prompt": "what is", "completion": " hello there", "label": True}]
CASES = {"dpo": dict(task="dpo"), "kto": dict(task="kto", beta=0.5), "dpo-fsdp": dict(task="dpo", sharding="fsdp")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_tensors(run: Path) -> dict:
    return load_file(run / "adapter_model.safetensors")


def settings(model, data_dir: Path, out: Path, task: str, **kw) -> dict:
    """TrainConfig's fields for a case (a dict: it reaches the torchrun processes as JSON)."""
    data = write_jsonl(data_dir / f"{task}.jsonl", MORE_ROWS if task == "kto" else MORE_PAIRS)
    return dict(model=str(model), task=task, data=str(data), output=str(out), max_length=48, lr=1e-2, dropout=0.0,
                max_steps=STEPS, log_every=1, save_every=100, warmup=0, targets="all-linear", precision="fp32",
                overwrite=True, **kw)


@pytest.fixture(scope="module")
def two(chat_llama_dir, tmp_path_factory):
    """Every case with 2 processes × batch B, in one torchrun."""
    out = tmp_path_factory.mktemp("two")
    cases = [settings(chat_llama_dir, out, out / name, batch_size=B, **kw) for name, kw in CASES.items()]
    done = subprocess.run([TORCHRUN, "--nproc_per_node=2", str(REPO / "tests" / "preference_cases.py"),
                           json.dumps(cases)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def one_process(model, tmp_path: Path, name: str) -> Path:
    from lorakit.training.settings import TrainConfig
    from lorakit.training.train import train

    kw = {k: v for k, v in CASES[name].items() if k != "sharding"}
    train(TrainConfig(**settings(model, tmp_path, tmp_path / name, batch_size=2 * B, **kw)), echo=lambda *_: None,
          progress=False)
    return tmp_path / name


def steps(run: Path) -> list[dict]:
    return [r for r in read_log(run / "log.jsonl") if "loss" in r and "step" in r]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_the_adapter_and_log_the_metrics_of_one_process_with_double_batch(two, chat_llama_dir,
                                                                                               tmp_path, name):
    one = one_process(chat_llama_dir, tmp_path, name)
    ours, theirs = adapter_tensors(two / name), adapter_tensors(one)
    assert ours.keys() == theirs.keys()
    assert max((theirs[k] - ours[k]).abs().max().item() for k in ours) <= FP32_REDUCTION_NOISE, name
    # B starts at 0: training moved the adapter far past the tolerance
    assert max(v.abs().max().item() for k, v in theirs.items() if "lora_B" in k) > 1e-2
    logged, reference = steps(two / name), steps(one)
    assert [r["step"] for r in logged] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for ours_step, ref_step in zip(logged, reference):
        assert ours_step.keys() == ref_step.keys()  # a KTO batch without undesirable rows has no rewards/rejected
    metrics = [k for k in reference[0] if k.startswith(("rewards/", "logps/", "kl"))] + ["loss"]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} & set(metrics)
    for key in metrics:  # step 1: the same numbers (but for float32 sums added in another order: a few ulp)
        assert logged[0][key] == pytest.approx(reference[0][key], rel=1e-6, abs=1e-6), key
    for ours_step, ref_step in zip(logged[1:], reference[1:]):  # after updates: equal within the noise above
        for key in set(ref_step) - {"step", "epoch", "lr", "tokens_per_s"}:
            assert ours_step[key] == pytest.approx(ref_step[key], abs=1e-3), key
    assert any(r["rewards/chosen"] != 0 for r in logged)  # the comparison is not between zeros
    if name == "kto":
        assert reference[-1]["kl"] > 0.1  # the KL term takes part
