"""`lorakit train`: check the settings, load the data, load the model and add the adapter, fit(), save the results.
Each phase is a function below; the run directory's files are described in rundir.py."""

from __future__ import annotations

import dataclasses
import math
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .data import collator
from .dataset import load_tables, run_examples
from .distributed import World, barrier, from_main, init_distributed, peak_memory_mb, shutdown
from .evaluation import describe, evaluate, main_metric
from .files import save_adapter
from .fit import Hooks, Interrupted, Loop, RunState, fit, seeded_batches
from .inject import count_parameters
from .models import add_adapter, load_model, resolve_model
from .optim import optimizer as make_optimizer
from .rundir import (CHECKPOINTS, LOG_FILE, METRICS_FILE, PLOT_FILE, append_log, check_output, clear_run,
                     first_eval, fresh_run_dir, last_loss, latest_checkpoint, load_checkpoint, plot, read_log,
                     save_checkpoint, start_files, write_json)
from .settings import PACKAGED_MODEL, SCHEDULERS, TrainConfig, check_values, resolved
from .sharding import check_launch, is_sharded, shard


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None,
          echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Fine-tune `cfg.model` with LoRA on `cfg.data` and write the run directory; returns metrics.json's content.

    Everything the user can get wrong is checked before training (ConfigError / data.DataError). Raises
    TrainingError on a non-finite loss, Interrupted after saving a checkpoint on Ctrl-C. `on_step(record)` gets each
    optimizer step's record (step, epoch, loss, lr, tokens, seconds). Under torchrun only rank 0 writes and prints."""
    check_values(cfg)
    check_launch(cfg.sharding)
    world = init_distributed(sharded=cfg.sharding == "fsdp")
    say = echo if world.main else (lambda *_: None)
    cfg = with_output(cfg, world)
    check_output(cfg)
    out = Path(cfg.output)
    tables = load_tables(cfg)  # every file, column and label checked before the model loads

    model, tokenizer, adapter = setup_model(cfg, tables.labels, world)
    train_rows, eval_rows = run_examples(tables, cfg, tokenizer)
    collate = collator(tokenizer, cfg.task)
    batches = seeded_batches(train_rows, collate, cfg.batch_size, cfg.seed, world)
    loop = plan(cfg, batches.per_epoch)
    opt, sched = optimizer_and_scheduler(model, cfg, loop.total_steps)
    state = start(cfg, out, resolved(cfg, adapter.targets), tables.labels, (model, opt, sched), loop, world, say)

    check = partial(evaluate, model, eval_rows, collate, cfg.task, cfg.batch_size, cfg.precision) if eval_rows else None
    log = partial(append_log, out / LOG_FILE)
    before = evaluate_before(check, state, log, world, say, collective=is_sharded(model))
    params = count_parameters(model)
    say(f"training {params[0]:,} of {params[1]:,} parameters ({100 * params[0] / params[1]:.2f}%), {loop.total_steps} "
        f"steps of {cfg.batch_size * world.size * cfg.grad_accum} examples, output {out}")
    hooks = Hooks(evaluate=check, log=log, checkpoint=partial(save_checkpoint, out, model, opt, sched),
                  on_step=on_step, echo=say, progress=progress)
    try:
        state = fit(model, batches, opt, sched, loop, state, world=world, hooks=hooks)
    except Interrupted as e:
        raise Interrupted(f"{e}; continue with: lorakit train --output {out} --resume") from None

    metrics = results(cfg, state, before, batches.per_epoch, params, world)
    save_run(cfg, out, model, metrics, world)
    if world.main:
        summary(say, metrics, cfg.task, out, demo=cfg.data is None)
    barrier(world)
    shutdown(world)
    return metrics


def setup_model(cfg: TrainConfig, labels: list[str] | None, world: World):
    """(model with the run's adapter, on this process's device (sharded across the processes with --sharding fsdp);
    tokenizer; the adapter's LoraConfig)."""
    path = resolve_model(cfg.model)
    torch.manual_seed(cfg.seed)  # the same head and LoRA A on every process and every resumed run
    model, tokenizer = load_model(path, cfg.task, labels)
    adapter = add_adapter(model, cfg)
    if cfg.sharding == "fsdp":  # fully_shard moves each unit's shards to the device: the device never holds it all
        return shard(model, world, cfg.precision), tokenizer, adapter
    return model.to(world.device), tokenizer, adapter


def with_output(cfg: TrainConfig, world: World) -> TrainConfig:
    """`cfg` with its output directory: the one given, else a fresh runs/<timestamp> (rank 0's, on every process)."""
    if cfg.output is not None:
        return cfg
    return dataclasses.replace(cfg, output=from_main(str(fresh_run_dir()) if world.main else None, world))


def plan(cfg: TrainConfig, micro_per_epoch: int) -> Loop:
    """How run `cfg` trains: its number of optimizer steps (grad_accum micro-batches each), and when it logs,
    evaluates (5 times by default) and checkpoints."""
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    return Loop(total_steps=total, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                precision=cfg.precision, seed=cfg.seed, log_every=cfg.log_every,
                eval_every=cfg.eval_every or max(1, total // 5), save_every=cfg.save_every)


def optimizer_and_scheduler(model, cfg: TrainConfig, total_steps: int):
    """AdamW over the adapter (LoRA+ rates with lr_ratio) and the learning-rate schedule with its warm-up."""
    from transformers import get_scheduler

    opt = make_optimizer(model, lr=cfg.lr, lr_ratio=cfg.lr_ratio, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    return opt, get_scheduler(SCHEDULERS[cfg.scheduler], opt, num_warmup_steps=warmup, num_training_steps=total_steps)


def start(cfg: TrainConfig, out: Path, settings: dict, labels, trained: tuple, loop: Loop, world: World,
          say) -> RunState:
    """The state to train from (a resumed run's last checkpoint, restored into model, optimizer and scheduler, or
    step 0), and the run's first files."""
    state = RunState()
    if cfg.resume:
        found = latest_checkpoint(out)
        state = load_checkpoint(found, *trained)
        say(f"resuming {out} from {found.name} (step {state.step} of {loop.total_steps})")
    if world.main:
        if cfg.overwrite:
            clear_run(out)
        start_files(out, settings, labels, state.step if cfg.resume else None)
    barrier(world)
    return state


def evaluate_before(check, state: RunState, log, world: World, say, collective: bool = False) -> dict | None:
    """A fresh run's evaluation before training (main process; every process if `collective`: a sharded model's
    forward needs them all), logged as step 0."""
    if check is None or state.step > 0 or not (world.main or collective):
        return None
    state.last_eval = check()
    if world.main:
        log({"step": 0, "eval": state.last_eval})
        say(f"before training: eval {describe(state.last_eval)}")
    return state.last_eval


def results(cfg: TrainConfig, state: RunState, before, micro_per_epoch: int, params: tuple, world: World) -> dict:
    """metrics.json's content (the log-derived entries on the main process only)."""
    trainable, total = params
    records = read_log(Path(cfg.output) / LOG_FILE) if world.main else []
    return {"task": cfg.task, "steps": state.step, "epochs": round(state.micro / micro_per_epoch, 3),
            "train_loss": last_loss(records) if world.main else None, "eval": state.last_eval,
            "eval_before": before if before is not None else first_eval(records) if world.main else None,
            "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
            "seconds": round(state.seconds, 2), "peak_memory_mb": round(peak_memory_mb(world.device), 1),
            "world_size": world.size}


def save_run(cfg: TrainConfig, out: Path, model, metrics: dict, world: World) -> None:
    """The adapter, metrics.json and training.png; the checkpoints go (the adapter is the final state). Called on
    every process: a sharded adapter is gathered by all of them; the main process writes."""
    save_adapter(model, out, base_model_name_or_path=cfg.model or PACKAGED_MODEL)
    if not world.main:
        return
    metrics["adapter_bytes"] = (out / "adapter_model.safetensors").stat().st_size
    write_json(out / METRICS_FILE, metrics)
    plot(read_log(out / LOG_FILE), out / PLOT_FILE, main_metric(cfg.task))
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def summary(say, metrics: dict, task: str, out: Path, demo: bool) -> None:
    """The end of a run in a few lines: the eval metric before and after, the trainable share, the adapter's size."""
    before, after = metrics.get("eval_before"), metrics.get("eval")
    if before and after:
        if main_metric(task) == "accuracy":
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
