"""BENCHMARKS.md and the PNG charts, written from the results dict that benchmarks.run collects (results.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import fsdp, infer, kernels, memory, openai_serving, packing, rank, serving, train
from .common import md_table
from .memory import __doc__ as MEMORY_METHOD

ANALYSIS = Path(__file__).with_name("analysis.md")  # hand-written findings, appended verbatim when present
# Hand-written reading of a section's numbers (what explains a miss), appended under that section when present;
# the large-model and GPU sections are hand-written whole, from the tables benchmarks/scale.py and gpu.sh print.
NOTES = Path(__file__).with_name("notes")


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _table(header: list[str], rows: list[list]) -> str:
    return md_table(header, rows)


def _ok_rows(rows: dict) -> tuple[list[dict], list[str]]:
    # Rows that ran, and a line for each that failed (a failure is reported, never hidden).
    good = [r for r in rows.values() if "error" not in r]
    bad = [f"- `{r['row']}` failed: `{r['error']}`" for r in rows.values() if "error" in r]
    return good, bad


def chart(path: Path, title: str, rows: list[dict], series: dict[str, str], reference: str, target: float) -> None:
    """A small grouped bar chart: each series relative to `reference` per row, with a dashed target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) * len(series) + 1.2), dpi=72)
    height = 0.8 / len(series)
    for i, (key, label) in enumerate(series.items()):
        values = [r[key] / r[reference] for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height, label=label)
    ax.axvline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [r["workload"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"relative to {reference.rsplit('_', 1)[0]} (lower is better)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)


def _train_section(rows: dict, img: str) -> str:
    good, bad = _ok_rows(rows)
    table = _table(
        ["workload", "batch", "lorakit (s)", "PEFT (s)", "full FT (s)", "lorakit / PEFT", "lorakit / full",
         f"≤ {train.TARGET_VS_PEFT} × PEFT", f"≤ {train.TARGET_VS_FULL} × full", "warm-up + timed rounds"],
        [[r["workload"], r["batch"], f"{r['lorakit_s']:.3f}", f"{r['peft_s']:.3f}", f"{r['full_s']:.3f}",
          f"{r['lorakit_vs_peft']:.2f}", f"{r['lorakit_vs_full']:.2f}", _yes(r["meets_vs_peft"]),
          _yes(r["meets_vs_full"]), f"{r['warmup']} + {r['rounds']}"] for r in good])
    spread = "; ".join(f"{r['workload']}: " + ", ".join(f"{k} {q[0]:.3f}–{q[1]:.3f}" for k, q in r["quartiles"].items())
                       for r in good)
    return (f"Median seconds of one step (forward, backward, AdamW step, zero_grad). Interquartile ranges: {spread}.\n\n"
            f"{table}\n" + "\n".join(bad) + f"\n\n![training step time]({img}/train.png)\n")


def _infer_section(rows: dict, img: str) -> str:
    good, bad = _ok_rows(rows)
    table = _table(
        ["workload", "batch", "base (ms)", "lorakit unmerged", "lorakit merged", "PEFT unmerged", "PEFT merged",
         f"lorakit unmerged ≤ {infer.TARGET_UNMERGED} × base", f"lorakit merged ≤ {infer.TARGET_MERGED} × base",
         "warm-up + timed rounds"],
        [[r["workload"], r["batch"], f"{r['base_ms']:.1f}"]
         + [f"{r[k + '_ms']:.1f} ({r[k + '_vs_base']:.2f}×)" for k in infer.VARIANTS[1:]]
         + [_yes(r["meets_unmerged"]), _yes(r["meets_merged"]), f"{r['warmup']} + {r['rounds']}"] for r in good])
    return (f"Median milliseconds of one forward under `torch.no_grad()`, eval mode; (×) is relative to the base "
            f"model. Merged: lorakit `merge()` / PEFT `merge_adapter()`, the adapter layers stay in place.\n\n"
            f"{table}\n" + "\n".join(bad) + f"\n\n![inference latency]({img}/infer.png)\n")


def _memory_section(rows: dict, img: str) -> str:
    good, bad = _ok_rows(rows)
    table = _table(
        ["workload", "model (MiB)", "lorakit (MiB)", "PEFT (MiB)", "full FT (MiB)", "lorakit / PEFT", "lorakit / full",
         f"≤ {memory.TARGET_VS_PEFT} × PEFT", "steps"],
        [[r["workload"], f"{r['model_mb']:.0f}", f"{r['lorakit_mb']:.0f}", f"{r['peft_mb']:.0f}", f"{r['full_mb']:.0f}",
          f"{r['lorakit_vs_peft']:.2f}", f"{r['lorakit_vs_full']:.2f}", _yes(r["meets_vs_peft"]), r["steps"]]
         for r in good])
    method = good[0]["method"] if good else "?"
    return (f"Peak memory that training adds above the model (measured: {method}).\n\n{table}\n" + "\n".join(bad)
            + f"\n\n![training memory]({img}/memory.png)\n\nHow it is measured:\n\n"
            + "\n".join("> " + line for line in MEMORY_METHOD.strip().splitlines()[2:]) + "\n")


def _adapter_section(rows: dict) -> str:
    good, bad = _ok_rows(rows)
    table = _table(
        ["workload", "save lorakit / PEFT (ms)", "load lorakit / PEFT (ms)", "merge lorakit / PEFT (ms)",
         "adapter file lorakit / PEFT (KiB)", "full model (MiB)", "adapter / model"],
        [[r["workload"], f"{r['lorakit_save_ms']:.1f} / {r['peft_save_ms']:.1f}",
          f"{r['lorakit_load_ms']:.1f} / {r['peft_load_ms']:.1f}", f"{r['lorakit_merge_ms']:.1f} / {r['peft_merge_ms']:.1f}",
          f"{r['lorakit_file_kib']:.0f} / {r['peft_file_kib']:.0f}", f"{r['full_model_mib']:.0f}",
          f"{100 * r['adapter_share']:.2f}%"] for r in good])
    return ("Median milliseconds; load = read the files and inject into a fresh copy of the base model; merge = fold "
            "ΔW into the weights (unmerging, between rounds, is not timed). Full model = the base model's "
            f"safetensors file.\n\n{table}\n" + "\n".join(bad) + "\n")


def _behind(gap: float) -> str:
    return f"behind by {gap:.2f} points" if gap >= 0 else f"ahead by {-gap:.2f} points"


def _quality_section(path: Path) -> str:
    if not path.exists():
        return ("No quality results yet: `python -m benchmarks.quality` (or `python -m benchmarks.run --only quality`) "
                f"writes `{path.name}`.\n")
    data = json.loads(path.read_text())
    rows = data["rows"]
    table = _table(
        ["dataset", "variant", "train / dev rows", "epochs", "lr", "trainable", "accuracy", "after each epoch",
         "macro-F1", "points vs full FT", "s / step (threads)"],
        [[r["dataset"], r["variant"], f"{r['train_rows']:,} / {r['dev_rows']:,}", r["epochs"], f"{r['lr']:g}",
          f"{r['trainable_params']:,} ({100 * r['trainable_share']:.2f}%)", f"{100 * r['accuracy']:.2f}%",
          " → ".join(f"{100 * a:.2f}" for a in r.get("accuracy_by_epoch", [])) or "—",  # rows from before it was kept
          f"{r['macro_f1']:.4f}", f"{r.get('points_vs_full', 0):+.2f}",
          f"{r['seconds_per_step']:.3f} ({r['threads']})"] for r in rows])
    acc = {(r["dataset"], r["variant"]): r["accuracy"] for r in rows}
    checks = []
    for (dataset, variant), value in acc.items():
        if variant in ("lorakit", "peft") and (dataset, "full") in acc:
            gap = round(100 * (acc[dataset, "full"] - value), 2)  # dev sets count in steps of 0.1 points or more
            checks.append([f"{dataset}: {variant} LoRA within 1 point of full fine-tuning", _behind(gap),
                           _yes(gap <= 1.0)])
        if variant == "lorakit-nf4" and (dataset, "lorakit") in acc:
            gap = round(100 * (acc[dataset, "lorakit"] - value), 2)
            checks.append([f"{dataset}: QLoRA (NF4) within 1.5 points of fp32 LoRA", _behind(gap),
                           _yes(gap <= 1.5)])
    for r in rows:
        if "frozen_nf4_vs_fp32" in r:
            checks.append([f"{r['dataset']}: NF4 frozen weights of the quantized layers ≤ 0.15 × fp32",
                           f"{r['frozen_nf4_vs_fp32']:.3f} ×", _yes(r["frozen_nf4_vs_fp32"] <= 0.15)])
    commands = ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    return (f"Dev-set accuracy after training on the train split, every variant with one loop, one data order and "
            f"seed {data['seed']}, batch {data['batch']}; written to `{path.name}` by "
            f"{commands}. See `benchmarks/quality.py` for the settings.\n\n{table}\n\n"
            + _table(["target", "measured", "met"], checks) + "\n")


def _targets_section(groups: dict) -> str:
    # One line per target: how many rows meet it, and each row's ratio.
    checks = [
        ("train", f"training step: lorakit ≤ {train.TARGET_VS_PEFT} × PEFT", "lorakit_vs_peft", "meets_vs_peft"),
        ("train", f"training step: lorakit ≤ {train.TARGET_VS_FULL} × full fine-tuning", "lorakit_vs_full", "meets_vs_full"),
        ("memory", f"training memory: lorakit ≤ {memory.TARGET_VS_PEFT} × PEFT", "lorakit_vs_peft", "meets_vs_peft"),
        ("infer", f"inference: lorakit unmerged ≤ {infer.TARGET_UNMERGED} × base", "lorakit_vs_base", "meets_unmerged"),
        ("infer", f"inference: lorakit merged ≤ {infer.TARGET_MERGED} × base", "lorakit_merged_vs_base", "meets_merged"),
    ]
    lines = []
    for group, label, ratio, ok in checks:
        good = [r for r in _ok_rows(groups.get(group, {}))[0] if not r.get("qlora")]
        if good:
            met = sum(r[ok] for r in good)
            detail = ", ".join(f"{r['workload']} {r[ratio]:.2f}" + ("" if r[ok] else " (missed)") for r in good)
            lines.append([label, f"{met} / {len(good)}", detail])
    return _table(["target", "rows meeting it", "ratio per row"], lines) + "\n"


def _note(name: str, required: bool = True) -> str:
    path = NOTES / f"{name}.md"
    if path.exists():
        return "\n" + path.read_text()
    return f"\nNot written yet: benchmarks/notes/{name}.md.\n" if required else ""


def _packing_section(path: Path) -> str:
    if not path.exists():
        return "Not run yet: `python -m benchmarks.packing`.\n"
    r = json.loads(path.read_text())
    m = r["machine"]
    where = m["cpu"] if r["device"] == "cpu" else m["gpu"]
    return (f"`python -m benchmarks.packing --size {r['size']} --device {r['device']}` on {where} (torch {m['torch']}); "
            f"lengths lognormal, see the script's docstring.\n\n" + packing.report(r) + "\n" + _note("packing"))


def write(results: dict, md_path: Path, results_dir: Path) -> None:
    """Write BENCHMARKS.md at `md_path` and the charts into `results_dir` from `results`."""
    meta, groups = results["meta"], results["groups"]
    img = os.path.relpath(results_dir, md_path.parent)
    for group, ref, target, series, title in (
        ("train", "peft_s", train.TARGET_VS_PEFT, {"lorakit_s": "lorakit", "full_s": "full FT"}, "training step time vs PEFT"),
        ("infer", "base_ms", infer.TARGET_UNMERGED, {k + "_ms": k.replace("_", " ") for k in infer.VARIANTS[1:]},
         "forward latency vs base model"),
        ("memory", "peft_mb", memory.TARGET_VS_PEFT, {"lorakit_mb": "lorakit", "full_mb": "full FT"},
         "training memory above the model vs PEFT"),
    ):
        good = [r for r in _ok_rows(groups.get(group, {}))[0] if not r.get("qlora")]
        if good:
            chart(results_dir / f"{group}.png", title, good, series, ref, target)
    m = meta["machine"]
    machine = _table(["", ""], [
        ["CPU", f"{m['cpu']} ({m['cores']} cores; bf16 instructions: {m['bf16_isa']})"], ["GPU", m["gpu"]],
        ["memory", f"{m['ram_gib']} GiB"], ["torch threads", f"{m['torch_threads']} (`torch.set_num_threads`, one per core)"],
        ["versions", f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
                     f"lorakit {m['lorakit']}"],
        ["device", meta["device"]],
        ["runs", "; ".join(f"`{r['command']}` ({r['date']}, {r.get('minutes', 0):.1f} minutes)" for r in meta["runs"])]])
    sections = [
        "# lorakit benchmarks\n",
        "lorakit LoRA against Hugging Face PEFT LoRA in the identical configuration, full fine-tuning and the base "
        "model. Regenerate everything (about 20 minutes on 2 CPU cores) with:\n\n```bash\npython -m benchmarks.run\n```\n\n"
        "Options: `--size quick` (real models, small batches, few rounds) or `--size tiny` (2-layer random models, "
        "what the tests run); `--only GROUP_OR_ROW ...` (groups: `train`, `infer`, `memory`, `adapters`, `quality`; "
        "rows: `python -m benchmarks.run --list`); `--update` keeps the rows of the last run that were not re-run; "
        "`--quality` also runs the quality benchmark; `--device cuda` on a GPU.\n",
        f"## Machine and run\n\n{machine}\n",
        "## Method\n\n"
        "- Every variant starts from the same weights: one base model (seeded random weights for GPT-2 and Llama, the "
        "packaged all-MiniLM-L6-v2 with a seeded 4-class head), deep-copied per variant. PEFT (`get_peft_model` with "
        "the same r=8, alpha=16, dropout, targets and modules_to_save) receives lorakit's A, B and head through "
        "lorakit's PEFT-format state dict, and the two are checked to give the same logits before anything is timed.\n"
        "- Variants are interleaved: each round runs one step of every variant, in an order rotated every round, so "
        "that slow spells of a shared machine hit all of them alike. Warm-up rounds are dropped; tables show the "
        "median of the timed rounds (counts in each table) and `gc.collect()` runs, untimed, before every step.\n"
        "- Training step = forward + loss, backward, `torch.optim.AdamW.step()`, `zero_grad(set_to_none=True)`, in "
        "train mode (the models' own dropout on). bf16 rows run forward and loss under "
        "`torch.autocast('cpu', dtype=torch.bfloat16)` with fp32 weights (mixed precision).\n"
        "- Random token ids; MiniLM: 32 sequences × 128 tokens, 4 labels; GPT-2 small (`GPT2Config()`, 124M) and a "
        "Llama-style model (12 layers, hidden 768, 12 heads, SwiGLU 2048, vocabulary 32,000; 134M): 4 × 256 tokens, "
        "labels = inputs. LoRA targets: query,value (MiniLM, classifier trained in full), c_attn (GPT-2), "
        "q_proj,v_proj (Llama). LoRA dropout 0.1 (MiniLM) and 0.05 (GPT-2, Llama) unless a row says otherwise.\n",
    ]
    sections.append("## Targets at a glance\n\n" + _targets_section(groups))
    titles = {"train": "## 1-2. Training step time", "infer": "## 3. Inference latency",
              "memory": "## 4. Training memory", "adapters": "## 5. Adapter files: save, load, merge"}
    for group, title in titles.items():
        if groups.get(group):
            body = {"train": lambda r: _train_section(r, img), "infer": lambda r: _infer_section(r, img),
                    "memory": lambda r: _memory_section(r, img), "adapters": _adapter_section}[group](groups[group])
            sections.append(f"{title}\n\n{body}" + _note(group, required=False))
    sections.append("## 6. Quality\n\n" + _quality_section(results_dir / "quality.json"))
    sections.append("## 7. Serving many adapters\n\n" + serving.section(results_dir / "serving.json"))
    sections.append("## 8. Sharded training: DDP against FSDP\n\n" + fsdp.section(results_dir / "fsdp.json")
                    + _note("fsdp"))
    sections.append("## 9. Packing against padding\n\n" + _packing_section(results_dir / "packing.json"))
    sections.append("## 10. Large models on a small machine\n\n" + _note("large-models"))
    sections.append("## 11. On a GPU\n\n" + _note("gpu"))
    sections.append("## 12. Intrinsic rank\n\n" + rank.section(results_dir / "rank.json") + _note("rank"))
    sections.append("## 13. Preference tuning\n\n" + _note("preference"))
    sections.append("## 14. The loss and the training process on the CPU\n\n" + _note("losses"))
    sections.append("## 15. What bf16 does to exactness\n\n" + _note("exactness"))
    sections.append("## 16. OpenAI's API on lorakit serve\n\n" + openai_serving.section(results_dir / "openai_serving.json")
                    + _note("openai-serving"))
    sections.append("## 17. NF4 on a CPU with fast bf16\n\n" + _note("nf4-cpu"))
    sections.append("## 18. torch.compile and Liger Kernel\n\n" + _note("compile")
                    + ("\n" + kernels.section(groups["kernels"]) if groups.get("kernels") else ""))
    log = [[r["row"], r["log"]["date"], f"{r['log']['seconds']:.0f}", f"{100 * r['log']['other_load']:.0f}%"]
           for rows in groups.values() for r in rows.values() if "log" in r]
    sections.append("## Run log\n\nOther load: the share of the machine's cores that other processes kept busy while a "
                    "row ran (from /proc/stat, minus this run's own CPU time). It slows every interleaved variant "
                    "alike but widens the spread of the timings.\n\n" + _table(["row", "finished", "seconds", "other load"], log) + "\n")
    if ANALYSIS.exists():
        sections.append(ANALYSIS.read_text())
    md_path.write_text("\n".join(sections))
