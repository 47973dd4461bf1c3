"""What `lorakit train --task dpo|ipo|orpo|kto` adds to a run, as functions train.py calls at its phases: the
settings' checks, the data, the adapter (and the frozen reference adapter of --ref-adapter), the reference
log-probabilities precomputed once (--precompute-ref), fit()'s loss hook and the evaluation.

--keep-best and --early-stopping select on the eval loss (lower is better), for every preference task.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ...adapters.attach import load_adapter
from ...adapters.files import read_adapter_config
from ...adapters.inject import set_adapter
from ...errors import ConfigError
from ...runtime.distributed import World
from .data import read_rows, tokenize_rows
from .logps import REF_ADAPTER, precompute_reference
from .objectives import OBJECTIVES, Settings, batch_loss, evaluate, metric_means

if TYPE_CHECKING:
    from ..settings import TrainConfig


def settings(cfg: TrainConfig) -> Settings:
    return Settings(beta=cfg.beta, label_smoothing=cfg.label_smoothing, orpo_alpha=cfg.orpo_alpha,
                    desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                    precision=cfg.precision, max_length=cfg.max_length)


def check(cfg: TrainConfig) -> None:
    """ConfigError for a preference setting that cannot work (before any data or model is read)."""
    objective = OBJECTIVES[cfg.task]
    rules = [
        (not cfg.packing, "--packing does not apply to preference tasks: a pair's chosen and rejected completions are "
                          "scored as whole sequences after their shared prompt, and the loss compares them pair by "
                          "pair; packed rows would hold pieces of several pairs"),
        (cfg.data is not None, f"--task {cfg.task} needs --data (prompt/chosen/rejected rows; kto: "
                               f"prompt/completion/label); lorakit ships lorakit/demo/news_preferences_train.jsonl"),
        (cfg.beta > 0, f"beta must be > 0, got {cfg.beta}"),
        (0 <= cfg.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}"),
        (cfg.label_smoothing == 0 or objective.label_smoothing,
         f"--label-smoothing (cDPO) is not for --task {cfg.task}"),
        (cfg.orpo_alpha >= 0, f"orpo_alpha must be >= 0, got {cfg.orpo_alpha}"),
        (cfg.desirable_weight > 0 and cfg.undesirable_weight > 0, "desirable and undesirable weights must be > 0"),
        (cfg.max_prompt_length is None or 1 <= cfg.max_prompt_length < cfg.max_length,
         f"max_prompt_length must be in [1, max_length), got {cfg.max_prompt_length}"),
        (objective.reference or not (cfg.ref_adapter or cfg.precompute_ref),
         f"--task {cfg.task} has no reference model: --ref-adapter and --precompute-ref do not apply"),
        (not (cfg.precompute_ref and not objective.paired),
         "--precompute-ref is not for unpaired rows (kto): its KL estimate pairs each prompt with another row's "
         "completion, which changes with every shuffled batch"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    if cfg.ref_adapter and not (Path(cfg.ref_adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--ref-adapter {cfg.ref_adapter}: no adapter_config.json there")


def load_rows(cfg: TrainConfig, tokenizer, say=print) -> tuple[list[list[dict]], list[dict], bool]:
    """(training rows, one list per --data source; eval rows; conversational) tokenised; every row checked before
    the model loads, errors naming the source."""
    from ...data.conversations import set_chat_template
    from ...data.sources import source_list

    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    objective = OBJECTIVES[cfg.task]
    parts, chat = [], False
    sources = source_list(cfg.data)
    for source in sources + ([cfg.eval_data] if cfg.eval_data else []):
        records = read_rows(source, objective.fields, source)
        tokenized = tokenize_rows(records, tokenizer, cfg.max_length, cfg.max_prompt_length, source, objective.paired)
        label = "training" if len(parts) < len(sources) else "eval"
        say(f"{label} data: {f'{source}: ' if len(sources) > 1 else ''}{tokenized.summary()}")
        chat = chat or (tokenized.chat and label == "training")
        parts.append(tokenized.rows)
    return parts[: len(sources)], (parts[len(sources)] if cfg.eval_data else []), chat


def attach_adapter(model, cfg: TrainConfig, add_adapter):
    """The run's trainable adapter: a fresh one (`add_adapter`, the reference is then the base), or with
    --ref-adapter a trainable copy of that adapter beside a frozen one named "ref", the reference. Its LoraConfig."""
    if not cfg.ref_adapter:
        return add_adapter(model, cfg)
    saved = read_adapter_config(cfg.ref_adapter)
    base = saved.base_model_name_or_path
    if base and cfg.model and base != cfg.model and Path(base).resolve() != Path(cfg.model).resolve():
        raise ConfigError(f"--ref-adapter {cfg.ref_adapter} was trained on {base}, not on --model {cfg.model}")
    try:
        load_adapter(model, cfg.ref_adapter, trainable=True)
        load_adapter(model, cfg.ref_adapter, name=REF_ADAPTER)
    except ValueError as e:
        raise ConfigError(f"--ref-adapter: {e}") from None
    set_adapter(model, "default")
    return saved


def with_reference(model, train_rows, eval_rows, cfg: TrainConfig, pad_id: int, say=print):
    """The rows with their reference log-probabilities when --precompute-ref asks for them (computed once, here)."""
    if not cfg.precompute_ref:
        return train_rows, eval_rows
    collate = OBJECTIVES[cfg.task].collate(pad_id, cfg.max_length)
    train_rows = precompute_reference(model, list(train_rows), collate, cfg.batch_size, cfg.precision)
    eval_rows = precompute_reference(model, list(eval_rows), collate, cfg.batch_size, cfg.precision) if len(
        eval_rows) else eval_rows
    say(f"reference log-probabilities precomputed for {len(train_rows)} training and {len(eval_rows)} eval rows")
    return train_rows, eval_rows


def loop_hooks(cfg: TrainConfig, world: World = World()) -> dict:
    """fit.Loop's loss_of and metric_means for a preference task: a batch's loss and metric totals (KTO's KL
    estimate over the global batch of `world`'s processes), and the logged means of the totals fit adds up; what
    the loss is a mean over (pairs, or KTO's examples) is the task record's count."""
    return {"loss_of": partial(batch_loss, OBJECTIVES[cfg.task], settings(cfg), world=world),
            "metric_means": metric_means}


def batch_parts(cfg: TrainConfig) -> dict:
    """fit.seeded_batches' arguments for a preference task: the tokens a row puts through the model and, for KTO,
    the global batch's row before each process's first (its mismatched pairs span the global batch)."""
    objective = OBJECTIVES[cfg.task]
    return {"tokens": objective.tokens, "previous": not objective.paired}


def collator(cfg: TrainConfig, pad_id: int):
    return OBJECTIVES[cfg.task].collate(pad_id, cfg.max_length)


def evaluator(model, rows, cfg: TrainConfig, pad_id: int):
    """The eval hook: loss and metrics over the eval rows."""
    objective = OBJECTIVES[cfg.task]
    return partial(evaluate, model, rows, objective.collate(pad_id, cfg.max_length), objective, settings(cfg),
                   cfg.batch_size)


def summary(say, before: dict | None, after: dict | None, metric: str) -> None:
    """The run's last lines: eval loss and the plotted reward metric before and after."""
    if not (before and after):
        return
    say(f"eval loss before: {before['loss']:.4f}  after: {after['loss']:.4f}; {metric} before: "
        f"{before.get(metric, float('nan')):.3f}  after: {after.get(metric, float('nan')):.3f}")


def saved_settings(cfg: TrainConfig, adapter) -> TrainConfig:
    """With --ref-adapter the adapter's own rank, alpha and targets are the run's: the settings saved say so."""
    if not cfg.ref_adapter:
        return cfg
    return dataclasses.replace(cfg, r=adapter.r, alpha=adapter.alpha)
