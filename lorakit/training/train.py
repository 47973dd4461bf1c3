"""`lorakit train`: check the settings, load the data, load the model and add the adapter, fit(), save the results.
Each phase is a function below; the run directory's files are described in rundir.py."""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..adapters.config import LoraConfig, name_matches
from ..adapters.inject import count_parameters, enable_gradient_checkpointing, inject, quantized_weights
from ..adapters.optim import optimizer as make_optimizer
from ..adapters.parts import base_modules, default_targets
from ..errors import ConfigError, Interrupted
from ..io.models import load_model, resolve_model, stored_name, within_positions
from ..nn.kinds import kind_of
from ..runtime import kernels as fused_kernels
from ..runtime.compiling import compile_blocks
from ..runtime.distributed import World, barrier, from_main, init_distributed, peak_memory_mb, shutdown
from ..runtime.heap import release_freed_memory
from ..runtime.precision import NAMES, compute_dtype, fast_bf16, resolve
from ..runtime.sharding import check_launch, is_sharded, local, save_adapter, shard
from .chunked_loss import loss_model
from .dataset import RunData, load_data, training_batches
from .evaluation import describe, evaluate
from .fit import Hooks, Loop, RunState, fit
from .preference import run as preference
from .rundir import (
    CHECKPOINTS,
    LOG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    append_log,
    check_output,
    clear_run,
    first_eval,
    fresh_run_dir,
    last_loss,
    latest_checkpoint,
    load_checkpoint,
    plot,
    read_log,
    restore_trainable,
    save_chat_template,
    save_checkpoint,
    start_files,
    write_json,
)
from .settings import SCHEDULERS, TrainConfig, check_values, lora_config, normalised, resolved
from .tasks import Task, task_named
from .tracking import open_reporter


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None,
          echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Fine-tune `cfg.model` with LoRA on `cfg.data` and write the run directory; returns metrics.json's content.

    Everything the user can get wrong is checked before training (ConfigError / data.DataError). Raises
    TrainingError on a non-finite loss, Interrupted after saving a checkpoint on Ctrl-C. `on_step(record)` gets each
    optimizer step's record (step, epoch, loss, lr, tokens, seconds). Under torchrun only rank 0 writes and prints."""
    check_values(cfg)
    cfg = normalised(cfg)  # its sources and weights as train_config.yaml saves them
    check_launch(cfg.sharding)
    release_freed_memory()  # resident memory follows the live tensors (runtime/heap.py)
    world = init_distributed(sharded=cfg.sharding == "fsdp")
    say = echo if world.main else (lambda *_: None)
    cfg = with_output(cfg, world)
    check_output(cfg)
    out = Path(cfg.output)
    cfg = capped_length(cfg, say)
    kernels = choose_kernels(cfg, world, say)  # refused here, before any work, where --kernels liger cannot run
    run_data = load_data(cfg, world, say)  # every file, column, row and label checked before the model loads
    cfg = capped_batch(cfg, None if cfg.streaming else len(run_data.train), world, say)  # a stream: length unknown
    model, adapter = setup_model(cfg, run_data, world, kernels)
    task = task_named(cfg.task)
    net = with_loss(model, task, cfg, say, kernels)  # what fit() and evaluate() run: a language model's loss chunked
    compiled(model, cfg, say)  # after the adapters, checkpointing and sharding: the blocks hold the LoRA layers
    if task.preference:  # --precompute-ref: the reference's log-probabilities, once
        run_data.train, run_data.eval = preference.with_reference(model, run_data.train, run_data.eval, cfg,
                                                                  run_data.tokenizer.pad_token_id, say)
    batches = training_batches(run_data, model, cfg, world, **(preference.batch_parts(cfg) if task.preference else {}))
    loop = plan(cfg, batches.per_epoch, world)
    opt, sched = optimizer_and_scheduler(model, cfg, loop.total_steps)
    state = start(cfg, out, resolved(cfg, adapter.targets), run_data.labels, (model, opt, sched), loop, world, say)

    check = evaluator(task, model, net, run_data, cfg)
    reporter = open_reporter(cfg.report_to, out, resolved(cfg, adapter.targets),
                             state.step if cfg.resume else None) if world.main else None
    log = partial(log_record, out / LOG_FILE, reporter)
    before = evaluate_before(check, state, log, world, say, collective=is_sharded(model))
    params = count_parameters(model)
    say(f"training {params[0]:,} of {params[1]:,} parameters ({100 * params[0] / params[1]:.2f}%), {loop.total_steps} "
        f"steps of {cfg.batch_size * world.size * cfg.grad_accum} {'rows' if cfg.packing else 'examples'}, "
        f"output {out}")
    keep = cfg.save_total_limit or 1
    hooks = Hooks(evaluate=check, log=log, checkpoint=partial(save_checkpoint, out, model, opt, sched, keep=keep),
                  on_step=on_step, echo=say, progress=progress)
    try:
        state = fit(net, batches, opt, sched, loop, state, world=world, hooks=hooks)
    except Interrupted as e:
        raise Interrupted(f"{e}; continue with: lorakit train --output {out} --resume") from None
    finally:
        if reporter:
            reporter.close()

    metrics = {**results(cfg, state, before, batches.per_epoch, params, world), **precisions(cfg, model, world),
               **selection(cfg, state, loop), "kernels": kernels.name, "compiled": cfg.compile}
    save_run(cfg, out, model, metrics, state, run_data, world)
    if world.main:
        summary(say, metrics, task_named(cfg.task), out, demo=cfg.data is None)
    barrier(world)
    shutdown(world)
    return metrics


def evaluator(task: Task, model, net, run_data: RunData, cfg: TrainConfig) -> Callable[[], dict] | None:
    """The eval hook of fit(): the task's metrics over the eval data (None without eval data). `net` is `model` with
    its loss chunked (with_loss); preference tasks score pairs with their own objective."""
    if not len(run_data.eval):
        return None
    if task.preference:
        return preference.evaluator(model, run_data.eval, cfg, run_data.tokenizer.pad_token_id)
    return partial(evaluate, net, run_data.eval, task.collator(run_data.tokenizer), task, cfg.batch_size, cfg.precision)


def with_loss(model, task: Task, cfg: TrainConfig, say, kernels=fused_kernels.Kernels("none", "")) -> torch.nn.Module:
    """A language model whose loss never holds the whole logits (chunked_loss.py; Liger's fused one with --kernels
    liger), unless --loss-chunk-tokens 0; a model the chunked loss cannot run on keeps its own loss, and the run says
    why. Preference tasks compute their own loss (preference/objectives.py)."""
    if not task.generates or task.preference:
        return model
    fused = fused_kernels.liger_linear_cross_entropy if kernels.liger else None
    net, why = loss_model(model, cfg.loss_chunk_tokens, sharded=is_sharded(model), fused=fused)
    if why:
        say(f"the model computes its own loss, all logits at once (not chunked): {why}")
    return net


def compiled(model, cfg: TrainConfig, say) -> None:
    """--compile: each transformer block of `model` torch.compile'd in place (runtime/compiling.py), saying so."""
    if cfg.compile:
        found = compile_blocks(model)
        say(f"--compile: {len(found)} {type(found[0]).__name__} blocks compile on their first call (the first steps "
            f"wait for the compiler)")


def add_adapter(model, cfg: TrainConfig) -> LoraConfig:
    """Inject the run's adapter into `model`; its LoraConfig. A --targets entry that matches no module of the model
    is named (unless --partial-targets), as when none matches."""
    adapter = lora_config(cfg, default_targets(model))
    if isinstance(adapter.targets, list) and not cfg.partial_targets:
        check_every_target_matches(model, adapter.targets)
    try:
        inject(model, adapter)
    except ValueError as e:
        raise ConfigError(f"--targets: {e}") from None
    return adapter


def check_every_target_matches(model, targets: list[str]) -> None:
    """ConfigError naming the --targets entries that match no module of `model` (a typo would else train fewer
    layers than asked, silently), with the names its adaptable layers have."""
    names = [path for path, _ in base_modules(model)]
    unmatched = [t for t in targets if not any(name_matches(path, [t]) for path in names)]
    if unmatched:
        layers = sorted({path.rsplit(".", 1)[-1] for path, module in base_modules(model) if kind_of(module)})
        raise ConfigError(f"--targets: {', '.join(map(repr, unmatched))} matches no module of this model; its "
                          f"adaptable layers are named {', '.join(layers[:20])}"
                          f"{' ...' if len(layers) > 20 else ''} (--partial-targets trains the entries that match)")


def capped_length(cfg: TrainConfig, say) -> TrainConfig:
    """`cfg` with --max-length no longer than the model's positions, saying so (io.models.within_positions)."""
    return dataclasses.replace(cfg, max_length=within_positions(cfg.max_length, resolve_model(cfg.model), say))


def capped_batch(cfg: TrainConfig, rows: int | None, world: World, say) -> TrainConfig:
    """`cfg` with --batch-size no larger than the training rows each process gets (None: unknown, a stream), saying
    so: a batch the data cannot fill would only repeat rows (and take memory for them)."""
    if rows is None:
        return cfg
    most = max(1, rows // world.size)
    if cfg.batch_size <= most:
        return cfg
    say(f"--batch-size {cfg.batch_size} is more than the {rows} training {'rows' if cfg.packing else 'examples'}"
        f"{f' across {world.size} processes' if world.size > 1 else ''}: batches of {most}")
    return dataclasses.replace(cfg, batch_size=most)


def choose_kernels(cfg: TrainConfig, world: World, say) -> fused_kernels.Kernels:
    """--kernels: the kernels the run uses (runtime/kernels.py), decided from the model's config before any work and
    said once; KernelsError where --kernels liger cannot run."""
    from transformers import AutoConfig

    chosen = fused_kernels.choose(cfg.kernels, world.device, AutoConfig.from_pretrained(resolve_model(cfg.model)))
    if cfg.kernels != "none":
        say(f"kernels: {chosen.name} ({chosen.why})")
    return chosen


def setup_model(cfg: TrainConfig, run_data: RunData, world: World,
                kernels: fused_kernels.Kernels = fused_kernels.Kernels("none", "")):
    """(model with the run's adapter, on this process's device (sharded across the processes with --sharding fsdp);
    the adapter's LoraConfig). The base is held in --dtype (QLoRA: every frozen Linear quantized while loading, the
    rest in the compute dtype); its head is sized for the run's labels, its tokenizer is the run's; `kernels` (Liger's
    or none) patch its blocks."""
    path = resolve_model(cfg.model)
    compute = compute_dtype(cfg.precision, world.device)  # warns when bf16 is asked for where it is slow
    torch.manual_seed(cfg.seed)  # the same head and LoRA A on every process and every resumed run
    # Sharded, the model loads into host memory and fully_shard moves each process's shards to the device: the
    # device never holds the whole model, quantized or not.
    device = torch.device("cpu") if cfg.sharding == "fsdp" else world.device
    model, _ = load_model(path, task_named(cfg.task), run_data.labels, cfg.dtype, cfg.quantize, compute, device,
                          tokenizer=run_data.tokenizer)
    warn_if_slow(model, compute, world.device)
    if task_named(cfg.task).preference:  # with --ref-adapter: its trainable copy beside the frozen reference
        adapter = preference.attach_adapter(model, cfg, add_adapter)
    else:
        adapter = add_adapter(model, cfg)
    fused_kernels.apply(kernels, model)  # Liger patches the blocks' norms, RoPE and MLPs, whose Linears keep LoRA
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.sharding == "fsdp":
        return shard(model, world, cfg.precision), adapter
    return model.to(world.device), adapter


def warn_if_slow(model, compute: torch.dtype, device: torch.device) -> None:
    """Say so when the base is held in bf16 where bf16 multiplies are slow (its checkpoint's dtype with --dtype auto):
    a CPU without AVX-512 BF16 or AMX computes them many times slower than fp32."""
    stored = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.bfloat16 in stored and compute == torch.float32 and not fast_bf16(device):
        warnings.warn(f"the model's weights are bf16 and this {device.type} has no fast bf16 matrix multiplies (no "
                      f"AVX-512 BF16 or AMX): expect it to run many times slower than fp32; --dtype fp32 loads an fp32 "
                      f"copy, --quantize nf4 holds the Linear layers in 4 bits and computes in fp32", stacklevel=2)


def with_output(cfg: TrainConfig, world: World) -> TrainConfig:
    """`cfg` with its output directory: the one given, else a fresh runs/<timestamp> (rank 0's, on every process)."""
    if cfg.output is not None:
        return cfg
    return dataclasses.replace(cfg, output=from_main(str(fresh_run_dir()) if world.main else None, world))


def plan(cfg: TrainConfig, micro_per_epoch: int | None, world: World = World()) -> Loop:
    """How run `cfg` trains: its number of optimizer steps (grad_accum micro-batches each), what its loss is a mean
    over, when it logs, evaluates (5 times by default) and checkpoints, and how it picks its best step."""
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    select = cfg.keep_best or cfg.early_stopping
    return Loop(total_steps=total, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                precision=cfg.precision, seed=cfg.seed, log_every=cfg.log_every,
                eval_every=cfg.eval_every or max(1, total // 5), save_every=cfg.save_every,
                count=task_named(cfg.task).count, select_by=task_named(cfg.task).metric if select else None,
                keep_best=cfg.keep_best, early_stopping=cfg.early_stopping,
                **(preference.loop_hooks(cfg, world) if task_named(cfg.task).preference else {}))


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


def results(cfg: TrainConfig, state: RunState, before, micro_per_epoch: int | None, params: tuple, world: World) -> dict:
    """metrics.json's content (the log-derived entries on the main process only)."""
    trainable, total = params
    records = read_log(Path(cfg.output) / LOG_FILE) if world.main else []
    return {"task": cfg.task, "steps": state.step, "epochs": round(state.micro / micro_per_epoch, 3) if micro_per_epoch else None,
            "train_loss": last_loss(records) if world.main else None, "eval": state.last_eval,
            "eval_before": before if before is not None else first_eval(records) if world.main else None,
            "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
            "seconds": round(state.seconds, 2), "peak_memory_mb": round(peak_memory_mb(world.device), 1),
            "world_size": world.size}


def precisions(cfg: TrainConfig, model, world: World) -> dict:
    """Where and in what the run computed: the device, the compute dtype, the dtypes the weights were held in and
    the bytes the model takes in this process."""
    held = sorted({NAMES.get(p.dtype, str(p.dtype)) for p in model.parameters() if p.is_floating_point()})
    if quantized_weights(model):
        held.append("nf4")
    # Activations run in autocast's dtype, else in the input embeddings' (a bf16 model computes in bf16).
    flowing = model.get_input_embeddings().weight.dtype if hasattr(model, "get_input_embeddings") else torch.float32
    compute = "bf16" if resolve(cfg.precision, world.device) == "bf16" else NAMES.get(flowing, str(flowing))
    # Under FSDP, this process's shards.
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in map(local, [*model.parameters(), *model.buffers()])}
    return {"device": str(world.device), "compute_dtype": compute, "weights": held,
            "model_bytes": sum(tensors.values())}  # parameters and buffers (NF4 codes and scales), each counted once


def selection(cfg: TrainConfig, state: RunState, loop: Loop) -> dict:
    """metrics.json's model-selection entries (with --keep-best or --early-stopping): the best step and its eval,
    whether training stopped early; with --keep-best "eval" is the best step's, that of the adapter saved."""
    if loop.select_by is None:
        return {}
    chosen = {"eval": state.best_eval, "last_eval": state.last_eval} if cfg.keep_best and state.best_eval else {}
    return {"best_step": state.best_step, "best_eval": state.best_eval,
            "early_stopped": state.step < loop.total_steps, **chosen}


def log_record(path: Path, reporter, record: dict) -> None:
    """One log record to log.jsonl, and to --report-to's reporter."""
    append_log(path, record)
    if reporter:
        reporter.log(record)


def save_run(cfg: TrainConfig, out: Path, model, metrics: dict, state: RunState, run_data: RunData,
             world: World) -> None:
    """The adapter (with --keep-best, the best step's), its chat template if the run was trained on conversations,
    metrics.json and training.png; the checkpoints go unless --keep-best or --save-total-limit keeps them. Called on
    every process: a sharded adapter is gathered by all of them; the main process writes."""
    best = from_main(state.best_step, world)  # the main process picks the best step
    if cfg.keep_best and best is not None and best != state.step and (world.main or is_sharded(model)):
        restore_trainable(out / CHECKPOINTS / f"step-{best}", model)
    save_adapter(model, out, base_model_name_or_path=stored_name(cfg.model))
    if not world.main:
        return
    if run_data.chat:
        save_chat_template(out, run_data.tokenizer.chat_template)
    metrics["adapter_bytes"] = (out / "adapter_model.safetensors").stat().st_size
    write_json(out / METRICS_FILE, metrics)
    task = task_named(cfg.task)
    plot(read_log(out / LOG_FILE), out / PLOT_FILE, task.plotted or task.metric, metrics.get("best_step"))
    if not cfg.save_total_limit:  # checkpoints are kept only when asked for: --keep-best has saved the best already
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def summary(say, metrics: dict, task: Task, out: Path, demo: bool) -> None:
    """The end of a run in a few lines: the eval metric before and after, the trainable share, the adapter's size."""
    before, after = metrics.get("eval_before"), metrics.get("eval")
    if task.preference:
        preference.summary(say, before, after, task.plotted)
    elif before and after:
        if task.labelled:
            say(f"accuracy before: {100 * before['accuracy']:.1f}%  after: {100 * after['accuracy']:.1f}%  "
                f"(macro-F1 {after['macro_f1']:.3f})")
        else:
            say(f"eval loss before: {before['loss']:.4f}  after: {after['loss']:.4f}  "
                f"(perplexity {after['perplexity']:.2f})")
    if metrics.get("best_step") is not None:
        kept = ": the adapter saved is that step's" if "last_eval" in metrics else ""
        stopped = f"; stopped early at step {metrics['steps']}" if metrics["early_stopped"] else ""
        say(f"best eval {task.metric} at step {metrics['best_step']}{kept}{stopped}")
    say(f"trainable: {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
        f"({100 * metrics['trainable_share']:.2f}%); adapter file {metrics['adapter_bytes'] / 1024:.0f} KiB")
    say(f"{metrics['steps']} steps in {metrics['seconds']:.1f} s; run directory: {out}")
    if demo:
        say(f"try: lorakit predict --adapter {out} \"Stocks rally as central bank holds rates\"")
