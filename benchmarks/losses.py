"""Issue 25's CPU targets: peak memory and step time of the whole `lorakit train` process (chunked loss, the default)
against a plain PEFT loop with transformers' own loss, on a random Llama-134M (vocabulary 32,000, fp32), causal-LM
LoRA r=8 on q_proj,v_proj, batch 4 × 1024 tokens, with and without gradient checkpointing on both sides.

    python -m benchmarks.losses [--size full|tiny] [--steps 2] [--out benchmarks/results/losses.json]

Each run is a fresh process, run in the order lorakit, PEFT, PEFT, lorakit (checkpointing, then without), so that a
slow spell of the shared machine does not land on one side only. Memory is the process's peak resident set
(VmHWM from /proc/self/status at its end: model loading, data, training, everything the user sees); the lorakit
process also samples its resident set every 20 ms to say which phase peaked (before training: imports, data, model;
training). Step time is each optimizer step's wall time (lorakit: fit's step record; PEFT: timed the same way);
the median over the steps is reported, the first step included (both sides create AdamW's state there), with the
process's CPU seconds per step beside it (user + system, getrusage). The machine's load average is recorded before
and after each process: other jobs slow both sides alike but widen the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {  # model dims, (batch, tokens)
    "full": (dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000), (4, 1024)),
    "tiny": (dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512), (2, 32)),
}
TARGETS = {True: 0.5, False: 0.75}  # lorakit / PEFT peak memory, with / without gradient checkpointing
STEP_TARGET = 1.0
RUNS = [("lorakit", True), ("peft", True), ("peft", False), ("lorakit", False)]


def prepare(folder: Path, size: str) -> None:
    """A random Llama of `size` with a byte-level tokenizer (one token per character of the data) and a JSON Lines
    file of 8 rows, each longer than the batch's tokens."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims, (_, tokens) = SIZES[size]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a"], trainers.BpeTrainer(vocab_size=258, special_tokens=["</s>", "<s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(**dims, max_position_embeddings=2 * tokens, bos_token_id=1, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": "".join(rng.choice("abcdefghij klmnop") for _ in range(tokens + 50))}) + "\n")


# ---- one measured process ----

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) * 1024


def _cpu_seconds() -> float:
    # This process's CPU time (user + system, all threads): less sensitive than wall time to other jobs' load.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Sampler:
    # The resident set every 20 ms, its peak per phase (the phase is switched by the run's own messages).
    def __init__(self):
        self.phase, self.peaks, self.done = "before training", {}, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done:
            rss = _status("VmRSS")
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.02)


def run_lorakit(folder: Path, size: str, steps: int, checkpointing: bool) -> dict:
    """`lorakit train` in this process (the CLI's code path: train(TrainConfig)), default loss settings."""
    from lorakit.training.settings import TrainConfig
    from lorakit.training.train import train

    _, (batch, tokens) = SIZES[size]
    sampler, records, said, cpu = _Sampler(), [], [], [_cpu_seconds()]

    def on_step(record):
        records.append(record)
        cpu.append(_cpu_seconds())

    def echo(line):
        said.append(line)
        if line.startswith("training "):
            sampler.phase = "training"

    cfg = TrainConfig(model=str(folder), data=str(folder / "data.jsonl"), task="causal-lm", output=str(folder / "run"),
                      overwrite=True, r=8, alpha=16, dropout=0.05, targets="q_proj,v_proj", batch_size=batch,
                      max_length=tokens, max_steps=steps, lr=1e-4, precision="fp32", save_every=1000, log_every=1,
                      gradient_checkpointing=checkpointing)
    train(cfg, on_step=on_step, echo=echo, progress=False)
    sampler.done = True
    # fit's step record times the step alone; the CPU seconds between records add its logging (small)
    return {"steps_s": [r["seconds"] for r in records], "cpu_s": [b - a for a, b in zip(cpu, cpu[1:])][-len(records):],
            "peak_bytes": _status("VmHWM"),
            "phase_peaks": sampler.peaks, "said": [s for s in said if "loss" in s]}


def run_peft(folder: Path, size: str, steps: int, checkpointing: bool) -> dict:
    """A plain PEFT loop: from_pretrained, get_peft_model, transformers' own loss, AdamW, the same 4 × 1024 rows."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, (batch, tokens) = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [json.loads(line)["text"] for line in open(folder / "data.jsonl")]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds, cpu = [], []
    for step in range(steps):
        rows = [texts[(step * batch + i) % len(texts)] for i in range(batch)]  # wraps round, as lorakit's epochs do
        enc = tokenizer(rows, truncation=True, max_length=tokens, return_tensors="pt")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - cpu_start)
    return {"steps_s": seconds, "cpu_s": cpu, "peak_bytes": _status("VmHWM"), "loss": float(loss)}


# ---- the side-by-side run ----

def measure(folder: Path, size: str, steps: int) -> list[dict]:
    """Every run of RUNS in its own process, in order; each with the load average before and after."""
    found = []
    for side, checkpointing in RUNS:
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "benchmarks.losses", "worker", side, str(folder), size, str(steps)]
        cmd += ["--checkpointing"] if checkpointing else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        found.append({"side": side, "checkpointing": checkpointing, **result,
                      "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
    return found


def verdicts(found: list[dict]) -> list[dict]:
    """Per checkpointing setting: lorakit / PEFT peak memory and median step time, against the targets."""
    rows = []
    for checkpointing in (True, False):
        lk, pf = (next(r for r in found if r["side"] == s and r["checkpointing"] == checkpointing)
                  for s in ("lorakit", "peft"))
        memory = lk["peak_bytes"] / pf["peak_bytes"]
        step = statistics.median(lk["steps_s"]) / statistics.median(pf["steps_s"])
        rows.append({"checkpointing": checkpointing, "lorakit_peak_gib": lk["peak_bytes"] / 2**30,
                     "peft_peak_gib": pf["peak_bytes"] / 2**30, "memory_ratio": memory,
                     "memory_target": TARGETS[checkpointing], "memory_met": memory <= TARGETS[checkpointing],
                     "lorakit_step_s": statistics.median(lk["steps_s"]),
                     "peft_step_s": statistics.median(pf["steps_s"]),
                     "step_ratio": step,
                     "cpu_ratio": statistics.median(lk["cpu_s"]) / statistics.median(pf["cpu_s"]),
                     "step_target": STEP_TARGET if checkpointing else None,
                     "step_met": step <= STEP_TARGET if checkpointing else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    args = parser.parse_args()
    from .common import machine

    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.size)
        found = measure(Path(tmp), args.size, args.steps)
    data = {"command": f"python -m benchmarks.losses --size {args.size} --steps {args.steps}", "size": args.size,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "runs": found,
            "verdicts": verdicts(found)}
    text = json.dumps(data, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def worker(argv: list[str]) -> None:
    """One measured process: `worker lorakit|peft FOLDER SIZE STEPS [--checkpointing]`; prints one JSON line."""
    side, folder, size, steps = argv[0], Path(argv[1]), argv[2], int(argv[3])
    run = {"lorakit": run_lorakit, "peft": run_peft}[side]
    print(json.dumps(run(folder, size, steps, "--checkpointing" in argv)))


if __name__ == "__main__":
    main()
