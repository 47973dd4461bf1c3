"""The settings of `lorakit train`: TrainConfig, the demo's settings, YAML config files, and the checks of every value
that need no model or data. Keys may be written with dashes or underscores; `setting_names` is the one place that
maps the one to the other."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..adapters.config import LoraConfig
from ..data.prepare import OVERLONG
from ..data.sources import one_or_many, parse_weights, source_list
from ..data.tables import split_columns
from ..errors import ConfigError
from ..io.models import PACKAGED_MODEL
from ..runtime.kernels import KERNELS
from ..runtime.precision import DTYPES, PRECISIONS
from .tasks import DEFAULT, TASKS
from .tracking import REPORTERS, check_reporter

# --scheduler -> transformers' scheduler (each with warm-up)
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
CONFIG_FILE = "train_config.yaml"  # a run directory's resolved settings; --config reads it back
# Settings that may change when a run is resumed: they do not change the trained weights.
# Checkpoints hold whole tensors, so "sharding" is among them: a sharded run resumes unsharded, and the reverse.
# So are "compile" and "kernels": the same computation by other code (equal within rounding).
RESUME_FREE = {"output", "resume", "overwrite", "eval_every", "save_every", "log_every", "eval_data", "eval_text_column",
               "num_proc", "report_to", "save_total_limit", "sharding", "loss_chunk_tokens", "compile", "kernels"}
SHARDINGS = ("none", "fsdp")
log = logging.getLogger("lorakit")  # --sharding: none (DDP under torchrun) | fsdp (sharding.py)


DATA, MODEL, LORA, TRAINING, EVALUATION, OUTPUT, DISTRIBUTED, PREFERENCE = (
    "Data", "Model", "LoRA", "Training", "Evaluation and model selection", "Output and tracking", "Distributed",
    "Preference tuning (--task dpo | ipo | orpo | kto)")


def setting(default, group: str, help: str, flag: str | None = None, envvar: str | None = None, many: bool = False):
    """A settings field with what the command's --help says of it (cli/options.py builds the flags from these): its
    help panel, its help line, its flag when that is not the field's name with dashes, the environment variable
    that gives it when the flag is left out, and whether the flag may be given several times (`many`: a list)."""
    return field(default=default, metadata={"group": group, "help": help, "flag": flag, "envvar": envvar,
                                            "many": many})


@dataclass
class TrainConfig:
    """Every setting of `lorakit train`: each is a YAML key of --config, a key of a run's train_config.yaml and a flag
    (dashes for underscores), under the one name declared here."""

    model: str = setting(PACKAGED_MODEL, MODEL, "Hugging Face model id or local directory.")
    task: str = setting(DEFAULT.name, MODEL, f"What the model learns: {' | '.join(TASKS)}.")
    data: list[str] | str | None = setting(None, DATA, "Training data: .csv, .tsv, .jsonl or .parquet file, or a "
                                           "Hugging Face dataset name (name or name:split); give it several times (a "
                                           "YAML list) for several sources, each of any format. None: the shipped "
                                           "news demo.", many=True)
    data_weights: list[float] | str | None = setting(None, DATA, "Mixing proportions of the --data sources, e.g. "
                                                     "0.7,0.3: an epoch keeps the sources' total size, each source "
                                                     "giving its share (drawn seeded, without replacement in passes "
                                                     "over it); streamed, each example's source is drawn with "
                                                     "these odds. Default: by size (the sources concatenated).")
    streaming: bool = setting(False, DATA, "Language models: read --data as a stream (hub datasets, or large "
                              ".jsonl/.csv/.parquet files) without loading it whole; needs --max-steps.")
    eval_data: str | None = setting(None, DATA, "Evaluation data, same formats.")
    eval_split: float | None = setting(None, DATA, "Without --eval-data: hold out this share of each --data source "
                                       "(seeded) as eval data, e.g. 0.05; never trained on.")
    text_column: str = setting("text", DATA, "Text column(s), comma-separated, joined with a space.")
    eval_text_column: str | None = setting(None, DATA, "Text column(s) of the eval data if they differ.")
    label_column: str = setting("label", DATA, "Label column: integer ids or names.")
    prompt_column: str | None = setting(None, DATA, "Language models: the prompt column; the loss then covers only "
                                        "the text column (the completion).")
    r: int = setting(8, LORA, "LoRA rank.", flag="--r")
    alpha: float = setting(16, LORA, "LoRA alpha; scale = alpha / r.")
    dropout: float = setting(0.05, LORA, "Dropout on the LoRA branch.")
    targets: list[str] | str | None = setting(None, LORA, "Modules to adapt: comma-separated names or suffixes, or "
                                              "all-linear (default: per architecture, e.g. query,value for BERT).")
    partial_targets: bool = setting(False, LORA, "Train the --targets entries that match modules of the model even "
                                    "when others match none (else those are named, and the run stops).")
    use_rslora: bool = setting(False, LORA, "rsLoRA: scale alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = setting(False, LORA, "DoRA: weight-decomposed LoRA (a trainable magnitude per output).")
    lora_bias: bool = setting(False, LORA, "A trainable bias on lora_B (PEFT's lora_bias), scaled like B·A; not "
                              "with DoRA or on Embedding layers.")
    quantize: str | None = setting(None, MODEL, "nf4: QLoRA, every frozen Linear of the base in 4-bit NormalFloat, "
                                   "quantized while the checkpoint loads.")
    dtype: str = setting("auto", MODEL, "The base's weights: auto (the checkpoint's own) | bf16 | fp16 | fp32.")
    gradient_checkpointing: bool = setting(False, MODEL, "Recompute activations in backward: far less memory, about "
                                           "a third more compute.")
    compile: bool = setting(False, MODEL, "torch.compile each transformer block, its LoRA layers included (CPU and "
                            "CUDA): the first steps wait for the compiler; faster only where BENCHMARKS.md says so.")
    kernels: str = setting("auto", MODEL, "auto | liger | none: Liger Kernel's fused RMSNorm, RoPE, SwiGLU and "
                           "linear cross-entropy (CUDA only, pip install 'lorakit[liger]', Llama, Mistral and Qwen2 "
                           "models); auto: liger where it is installed and runs, else none.")
    epochs: float = setting(3, TRAINING, "Passes over the training data.")
    max_steps: int | None = setting(None, TRAINING, "Optimizer steps; wins over --epochs.")
    batch_size: int = setting(16, TRAINING, "Examples per step per process (capped at the data's size).")
    grad_accum: int = setting(1, TRAINING, "Micro-batches per optimizer step.")
    lr: float = setting(1e-3, TRAINING, "Peak learning rate.")
    warmup: float = setting(0.06, TRAINING, "Warm-up: a fraction of the steps if < 1, else a number of steps.")
    scheduler: str = setting("linear", TRAINING, "linear | cosine | constant (each after the warm-up).")
    weight_decay: float = setting(0.0, TRAINING, "AdamW weight decay.")
    lr_ratio: float = setting(1.0, TRAINING, "LoRA+: B learns lr_ratio times faster than A (the paper uses 16).")
    max_grad_norm: float = setting(1.0, TRAINING, "Gradient clipping norm, 0 for none.")
    max_length: int = setting(128, DATA, "Tokens per example; longer ones are truncated (or dropped: --overlong).")
    seed: int = setting(0, TRAINING, "Random seed: the same seed, the same run.")
    eval_every: int | None = setting(None, EVALUATION, "Evaluate every N steps (default: 5 times per run).")
    save_every: int = setting(100, OUTPUT, "Checkpoint every N steps.")
    log_every: int = setting(5, OUTPUT, "Write log.jsonl every N steps.")
    output: str | None = setting(None, OUTPUT, "Run directory (default: a new runs/<timestamp>).")
    resume: bool = setting(False, OUTPUT, "Continue the run in --output from its last checkpoint.")
    overwrite: bool = setting(False, OUTPUT, "Replace the run in --output.")
    precision: str = setting("auto", MODEL, "Compute: auto (bf16 where the device multiplies bf16 fast, else fp32) "
                             "| fp32 | bf16 (autocast).")
    chat_template: str | None = setting(None, DATA, "Language models: a Jinja chat template file for conversation "
                                        "data, for a tokenizer without one (or to replace its own); saved with the "
                                        "adapter for predict and chat.")
    num_proc: int | None = setting(None, DATA, "Language models: processes that tokenise the data (the result is "
                                   "cached between runs either way).")
    overlong: str = setting("truncate", DATA, "Language models: rows longer than --max-length are truncate(d) or "
                            "drop(ped).")
    packing: bool = setting(False, DATA, "Language models: pack examples into rows of --max-length tokens "
                            "(positions restart and attention stays inside each example).")
    loss_chunk_tokens: int = setting(512, TRAINING, "Language models: the output head's logits are made, used and "
                                     "freed this many target tokens at a time (the loss never holds them all); 0: "
                                     "the model's own loss.")
    report_to: str = setting("none", OUTPUT, "none | tensorboard | wandb: also send the log there.")
    keep_best: bool = setting(False, EVALUATION, "The final adapter is the checkpoint with the best eval metric "
                              "(accuracy, or loss for a language model); needs --eval-data or --eval-split.")
    early_stopping: int | None = setting(None, EVALUATION, "Stop after N evaluations without a better eval metric.")
    save_total_limit: int | None = setting(None, OUTPUT, "Keep the newest K checkpoints (and the best), also after "
                                           "the run (default: only the newest, removed at the end).")
    sharding: str | None = setting(None, DISTRIBUTED, "fsdp: shard the model across torchrun's processes (FSDP2: "
                                   "each holds 1/N of the frozen weights); none: DDP.")
    # preference tasks (training/preference; TRL's names and defaults)
    beta: float = setting(0.1, PREFERENCE, "dpo/ipo/kto: how far the policy may move from the reference (ipo's "
                          "tau); orpo: the odds-ratio term's weight.")
    label_smoothing: float = setting(0.0, PREFERENCE, "dpo: cDPO, the probability that a pair's preference is "
                                     "flipped, in [0, 0.5).")
    ref_adapter: str | None = setting(None, PREFERENCE, "dpo/ipo/kto: start from this (supervised) adapter; a frozen "
                                      "copy of it is the reference, on the same base. Default: a fresh adapter, the "
                                      "base as reference.")
    precompute_ref: bool = setting(False, PREFERENCE, "dpo/ipo: compute the reference's log-probabilities once "
                                   "before training, none per step.")
    max_prompt_length: int | None = setting(None, PREFERENCE, "Prompts longer than this keep their last tokens "
                                            "(default: no limit but --max-length).")
    orpo_alpha: float = setting(1.0, PREFERENCE, "orpo: the weight of the chosen completions' NLL.")
    desirable_weight: float = setting(1.0, PREFERENCE, "kto: weight of desirable rows' losses.")
    undesirable_weight: float = setting(1.0, PREFERENCE, "kto: weight of undesirable rows' losses.")


# Names a setting had before, still read (from flags, YAML and old runs' train_config.yaml) with a note.
RENAMED = {"dora": "use_dora", "rslora": "use_rslora"}


# The shipped demo's settings: a minute or two on 2 CPU cores, long enough to learn the topics.
DEMO = dict(epochs=4, batch_size=16, max_length=48, lr=2e-3, dropout=0.05, eval_every=12, log_every=2)


def demo_config(**changes) -> TrainConfig:
    """The settings of the demo run (no --data): the packaged MiniLM on the shipped headlines."""
    return dataclasses.replace(TrainConfig(**DEMO), **changes)


def setting_names(values: dict) -> dict:
    """`values` with every key as a TrainConfig field name: "max-steps" -> "max_steps"; a former name (RENAMED) is
    read as the current one, with a note."""
    names = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in RENAMED:
            log.warning("note: setting %r is now called %r (read as that)", name, RENAMED[name])
            name = RENAMED[name]
        names[name] = value
    return names


def config_from(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from `base` (defaults if None) updated with `values`; keys may use dashes; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    clean = setting_names(values)
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    if "data" in clean:  # a YAML list or repeated flags; one source stays a string
        clean["data"] = one_or_many(clean["data"])
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
    generating = [name for name, task in TASKS.items() if task.generates]
    rules = [
        (cfg.task in TASKS, f"task must be one of {tuple(TASKS)}, got {cfg.task!r}"),
        (cfg.scheduler in SCHEDULERS, f"scheduler must be one of {tuple(SCHEDULERS)}, got {cfg.scheduler!r}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {cfg.precision!r}"),
        (cfg.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}"),
        (cfg.kernels in KERNELS, f"kernels must be one of {KERNELS}, got {cfg.kernels!r}"),
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
        (cfg.task not in TASKS or TASKS[cfg.task].generates or not (cfg.packing or cfg.chat_template),
         f"--packing and --chat-template are for language models (--task {' or '.join(generating)})"),
        (cfg.report_to in REPORTERS, f"report_to must be one of {tuple(REPORTERS)}, got {cfg.report_to!r}"),
        (cfg.early_stopping is None or cfg.early_stopping >= 1,
         f"early_stopping must be >= 1, got {cfg.early_stopping}"),
        (cfg.save_total_limit is None or cfg.save_total_limit >= 1,
         f"save_total_limit must be >= 1, got {cfg.save_total_limit}"),
        (not (cfg.keep_best or cfg.early_stopping) or cfg.eval_data or cfg.eval_split or cfg.data is None,
         "--keep-best and --early-stopping compare evaluations: they need --eval-data or --eval-split"),
    ]
    for ok, message in rules + data_rules(cfg):
        if not ok:
            raise ConfigError(message)
    parse_weights(cfg.data_weights, len(source_list(cfg.data)))
    if TASKS[cfg.task].preference:
        from .preference.run import check

        check(cfg)
    check_reporter(cfg.report_to)
    try:
        lora_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def data_rules(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """check_values' rules for the data's sources: --eval-split, --streaming and what each excludes."""
    share, task = cfg.eval_split, TASKS.get(cfg.task)
    streamable = [name for name, t in TASKS.items() if t.generates and not t.preference]
    return [
        (share is None or 0 < share < 1, f"--eval-split must be a share in (0, 1), e.g. 0.05; got {share}"),
        (not (share and cfg.eval_data), "--eval-split holds eval rows out of --data, so it cannot be used with "
                                        "--eval-data: give one or the other"),
        (not (share and cfg.data is None), "--eval-split needs --data (the demo holds out its own eval rows)"),
        (not (cfg.packing and cfg.data_weights), "--packing with --data-weights: packed rows are made once, before "
                                                 "training, while a weighted epoch draws its examples anew; without "
                                                 "weights the sources are packed together"),
        (not cfg.streaming or cfg.data is not None, "--streaming needs --data (the demo is read whole)"),
        (not cfg.streaming or cfg.max_steps, "--streaming needs --max-steps: a stream's length is unknown until it "
                                             "has been read, so --epochs cannot say how many steps to train"),
        (not cfg.streaming or task is None or cfg.task in streamable,
         f"--streaming is for --task {' or '.join(streamable)}: a classifier's head is sized by every label of the "
         f"data before training, and preference rows are read whole"),
        (not (cfg.streaming and cfg.packing), "--packing with --streaming: packing places examples by their lengths "
                                              "across the whole data (best fit), which a stream does not have"),
        (not (cfg.streaming and share), "--eval-split with --streaming: a share of a stream of unknown length cannot "
                                        "be held out; give --eval-data"),
    ]


def normalised(cfg: TrainConfig) -> TrainConfig:
    """`cfg` (checked) with its sources in their saved form (one as a string, several as a list) and its weights as
    numbers, so that train_config.yaml holds what reproduces the run and --resume compares like with like."""
    return dataclasses.replace(cfg, data=one_or_many(cfg.data),
                               data_weights=parse_weights(cfg.data_weights, len(source_list(cfg.data))))


def lora_config(cfg: TrainConfig, default_targets: list[str] | None = None) -> LoraConfig:
    """The run's one LoraConfig (raises ValueError for values it refuses): --targets, else `default_targets` (the
    model's). A task model's head is trained and saved in full (inject's default for it, as in PEFT)."""
    return LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=parse_targets(cfg.targets) or
                      default_targets, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, lora_bias=cfg.lora_bias,
                      quantize=cfg.quantize)


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
