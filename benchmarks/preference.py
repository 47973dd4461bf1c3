"""Preference tuning measured: (1) the shipped demo learns (held-out reward accuracy before and after a short DPO run
on a small random Llama with a word-level tokenizer built from the demo's words), (2) lorakit DPO against TRL's
DPOTrainer with PEFT on the same model and batch in fp32: step time and peak memory (each in its own process), and
the memory a second (reference) copy of the model would add.

    python -m benchmarks.preference              # both, prints Markdown
    python -m benchmarks.preference --tiny       # seconds: what tests run
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


def learn(work: Path, epochs: float, hidden: int, lr: float = 3e-2, beta: float = 0.5) -> dict:
    """A DPO run on the shipped pairs; held-out reward accuracy before and after."""
    from lorakit.training.settings import TrainConfig
    from lorakit.training.train import train

    model = demo_model(work / "model", hidden=hidden)
    cfg = TrainConfig(model=str(model), task="dpo", data=str(TRAIN), eval_data=str(EVAL), output=str(work / "run"),
                      targets="all-linear", r=16, alpha=32, dropout=0.0, lr=lr, batch_size=16, epochs=epochs,
                      max_length=48, beta=beta, precision="fp32", warmup=0.05, eval_every=20, log_every=5)
    metrics = train(cfg, echo=lambda *_: None, progress=False)
    return {"before": metrics["eval_before"]["rewards/accuracies"], "after": metrics["eval"]["rewards/accuracies"],
            "loss_before": metrics["eval_before"]["loss"], "loss_after": metrics["eval"]["loss"],
            "steps": metrics["steps"], "seconds": metrics["seconds"], "plot": str(work / "run" / "training.png")}


# ---- lorakit against TRL, each in a fresh process ----

def one_side(side: str, model_dir: str, batch: int, steps: int) -> dict:
    """Mean step time (after one warm-up step) and peak RSS of `steps` DPO steps of lorakit or TRL on the demo."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()][:batch * (steps + 1)]
    if side == "lorakit":
        from lorakit.training.settings import TrainConfig
        from lorakit.training.train import train

        times = []
        cfg = TrainConfig(model=model_dir, task="dpo", data=str(TRAIN), output=tempfile.mkdtemp(), r=16, alpha=32,
                          targets="all-linear", dropout=0.0, batch_size=batch, max_steps=steps + 1, max_length=48,
                          precision="fp32", log_every=1000, save_every=10_000, dtype="fp32")
        train(cfg, on_step=lambda r: times.append(r["seconds"]), echo=lambda *_: None, progress=False)
    else:
        import peft
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        times, last = [], [0.0]

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                last[0] = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - last[0])

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1,
                             learning_rate=1e-3, max_length=48, report_to=[], use_cpu=True, bf16=False,
                             save_strategy="no", logging_steps=1000, dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()],
                                 peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
        trainer.train()
    return {"step_ms": 1000 * sum(times[1:]) / max(len(times) - 1, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare(work: Path, hidden: int, layers: int, batch: int, steps: int) -> dict:
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
    return out


def report(learned: dict, bench: dict, cmd: str) -> str:
    lk, tr = bench["lorakit"], bench["trl"]
    return "\n".join([
        f"Command: `{cmd}`", "",
        f"Demo (lorakit/demo/news_preferences_*.jsonl, 320 training / 80 held-out pairs): held-out reward accuracy "
        f"{learned['before']:.2f} -> {learned['after']:.2f}, eval DPO loss {learned['loss_before']:.4f} -> "
        f"{learned['loss_after']:.4f} in {learned['steps']} steps, {learned['seconds']:.0f} s.", "",
        f"DPO step on a random Llama of {bench['params']:,} parameters, LoRA r=16 on all linear layers, fp32:", "",
        "| | step time (ms) | peak RSS (MiB) |", "| --- | --- | --- |",
        f"| lorakit | {lk['step_ms']:.1f} | {lk['peak_rss_mib']:.0f} |",
        f"| TRL DPOTrainer + PEFT | {tr['step_ms']:.1f} | {tr['peak_rss_mib']:.0f} |", "",
        f"A second, frozen copy of this model as reference would add {bench['reference_copy_mib']:.1f} MiB of fp32 "
        f"weights; both lorakit and TRL with PEFT hold none (adapter off, or a frozen adapter copy)."])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--side")
    p.add_argument("--model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if a.side:
        print(json.dumps(one_side(a.side, a.model, a.batch, a.steps)))
        return
    work = Path(tempfile.mkdtemp())
    if a.tiny:
        learned, bench = learn(work, epochs=0.2, hidden=32), compare(work, 32, 1, 2, 1)
    else:
        learned, bench = learn(work, epochs=8, hidden=64), compare(work, 256, 4, 8, 5)
    print(report(learned, bench, "python -m benchmarks.preference" + (" --tiny" if a.tiny else "")))


if __name__ == "__main__":
    main()
